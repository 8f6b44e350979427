"""Feed-forward blocks: SwiGLU, GeLU MLP (or squared ReLU) and clamped SwiGLU.

Shape legend: B rows, T tokens, H hidden, F ``ffn_hidden_size``.

The gated MLPs have separate ``gate`` and ``up`` projections ``(H -> F)`` each (as Hugging Face
stores them), so tensor parallelism shards each by rows and every rank holds matching gate and
up columns of the FFN (a fused ``[gate | up]`` weight split by ``Shard(0)`` would give rank 0 all
of gate). While the weights are plain tensors both run as one GEMM and the activation reads its
``(..., 2F)`` output in place; either way it runs as one kernel on CUDA (``kernels.swiglu``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mcore.params import ParamSpec
from mcore.protocols.block import BlockContext, BlockShared, FlopsShape
from mcore_models.blocks.base import (
    Block,
    check_choice,
    check_positive,
    fused_projection,
    linear_specs,
    prefixed,
    project,
)
from mcore_models.kernels.swiglu import clamped_swiglu_reference, swiglu, swiglu_packed

#: Values of ``gelu_approximate`` (``torch.nn.functional.gelu``'s ``approximate``).
GELU_APPROXIMATIONS = ("none", "tanh")
#: Values of ``gelu-mlp``'s ``activation``: GeLU, or squared ReLU ``relu(x)^2`` (Nemotron-H's MLPs).
TWO_LAYER_ACTIVATIONS = ("gelu", "relu2")


@dataclass(kw_only=True, slots=True)
class MLPConfig:
    """Settings every MLP here shares (a subclass's ``__post_init__`` calls ``check_mlp`` too)."""

    ffn_hidden_size: int = 1024
    """Hidden size of the MLP (per branch for the gated ones)."""
    mlp_bias: bool = False
    """Biases on the projections."""

    def __post_init__(self) -> None:
        check_mlp(self)


def check_mlp(config: MLPConfig) -> None:
    check_positive("mlp", "ffn_hidden_size", config.ffn_hidden_size)


def _specs(block: Any, inputs: tuple[str, ...]) -> dict[str, ParamSpec]:
    """Each projection a plain ``matrix`` (no fused rows), its bias (if any) a zero ``bias``; the input
    projections start normal(``init_std``), ``down`` normal(``output_init_std``). Tensor parallelism:
    the input projections ``column`` (each rank its own F features), ``down`` ``row``."""
    specs: dict[str, ParamSpec] = {}
    for name in inputs:
        specs |= prefixed(name, linear_specs(getattr(block, name), "matrix", block.shared.init_std, tp="column"))
    return specs | prefixed("down", linear_specs(block.down, "matrix", block.shared.out_std, tp="row"))


def _matmul_size(linear: nn.Linear) -> int:
    return linear.in_features * linear.out_features


class _Gated(Block):
    """``down(act(gate(x), up(x)))``; subclasses set ``activation`` (two ``(..., F)`` tensors -> one)."""

    def __init__(self, config: MLPConfig, *, hidden_size: int, shared: BlockShared | None = None) -> None:
        super().__init__()
        self.config = config
        self.shared = shared or BlockShared(hidden_size=hidden_size)
        self.gate = nn.Linear(hidden_size, config.ffn_hidden_size, bias=config.mlp_bias)
        self.up = nn.Linear(hidden_size, config.ffn_hidden_size, bias=config.mlp_bias)
        self.down = nn.Linear(config.ffn_hidden_size, hidden_size, bias=config.mlp_bias)
        self.reset_parameters()

    def param_specs(self) -> dict[str, ParamSpec]:
        """``gate`` and ``up`` are separate ``(F, H)`` matrices, so ``Shard(0)`` gives each rank its own F columns."""
        return _specs(self, ("gate", "up"))

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fused_groups(self) -> list[tuple[nn.Linear, ...]]:
        """The linears projected in one GEMM (``GPT.pack_for_inference`` lays them out back to back)."""
        return [(self.gate, self.up)]

    def packed_activation(self, packed: torch.Tensor) -> torch.Tensor:
        """``activation`` of ``(..., 2F)`` rows ``[gate | up]`` (views of one GEMM's output)."""
        gate, up = packed.chunk(2, dim=-1)
        return self.activation(gate, up)

    def forward(self, hidden: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        packed = fused_projection(hidden, (self.gate, self.up))  # (B, T, 2F): [gate | up], one GEMM
        if packed is not None:
            return self.down(self.packed_activation(packed))  # (B, T, F) -> (B, T, H)
        gate, up = project(hidden, (self.gate, self.up))  # (B, T, F) each: sharded or quantized weights
        return self.down(self.activation(gate, up))

    def flops(self, shape: FlopsShape) -> int:
        return 2 * shape.tokens * sum(_matmul_size(m) for m in (self.gate, self.up, self.down))


class SwiGLU(_Gated):
    """``down(silu(gate(x)) * up(x))`` (Llama, Qwen, Mistral)."""

    @dataclass(kw_only=True, slots=True)
    class Config(MLPConfig):
        pass

    def __init__(self, config: Config | None = None, *, hidden_size: int, shared: BlockShared | None = None) -> None:
        super().__init__(config or self.Config(), hidden_size=hidden_size, shared=shared)

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate, up)

    def packed_activation(self, packed: torch.Tensor) -> torch.Tensor:
        return swiglu_packed(packed)  # reads [gate | up] in place; one (..., 2F) gradient


class ClampedSwiGLU(_Gated):
    """``down(silu(min(gate, a)) * clamp(up, -a, a))`` with ``a = clamp_limit`` (DeepSeek-V4 style)."""

    @dataclass(kw_only=True, slots=True)
    class Config(MLPConfig):
        clamp_limit: float = 7.0
        """The gate is clamped to at most this and the up branch to [-clamp_limit, clamp_limit] (finite, > 0)."""

        def __post_init__(self) -> None:
            check_mlp(self)
            check_positive("mlp", "clamp_limit", self.clamp_limit)

    def __init__(self, config: Config | None = None, *, hidden_size: int, shared: BlockShared | None = None) -> None:
        config = config or self.Config()
        self.limit = config.clamp_limit
        super().__init__(config, hidden_size=hidden_size, shared=shared)

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return clamped_swiglu_reference(gate, up, self.limit)


class GeluMLP(Block):
    """``down(gelu(up(x)))`` (GPT-2 style); ``gelu_approximate`` is ``none`` or ``tanh``. With ``activation =
    "relu2"``: ``down(relu(up(x))^2)`` (squared ReLU, Nemotron-H's MLP layers)."""

    @dataclass(kw_only=True, slots=True)
    class Config(MLPConfig):
        gelu_approximate: str = "none"
        """'none' (exact GeLU) or 'tanh' (the tanh approximation)."""
        activation: str = "gelu"
        """'gelu', or 'relu2' (squared ReLU, as Nemotron-H's MLPs; gelu_approximate must then be 'none')."""

        def __post_init__(self) -> None:
            check_mlp(self)
            check_choice("mlp", "gelu_approximate", self.gelu_approximate, GELU_APPROXIMATIONS)
            check_choice("mlp", "activation", self.activation, TWO_LAYER_ACTIVATIONS)
            if self.activation == "relu2" and self.gelu_approximate != "none":
                raise ValueError(
                    f"gelu_approximate = {self.gelu_approximate!r} with activation = 'relu2': allowed only 'none'"
                )

    def __init__(self, config: Config | None = None, *, hidden_size: int, shared: BlockShared | None = None) -> None:
        super().__init__()
        config = self.config = config or self.Config()
        self.shared = shared or BlockShared(hidden_size=hidden_size)
        self.approximate = config.gelu_approximate
        self.squared_relu = config.activation == "relu2"
        self.up = nn.Linear(hidden_size, config.ffn_hidden_size, bias=config.mlp_bias)
        self.down = nn.Linear(config.ffn_hidden_size, hidden_size, bias=config.mlp_bias)
        self.reset_parameters()

    def param_specs(self) -> dict[str, ParamSpec]:
        return _specs(self, ("up",))

    def forward(self, hidden: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        up = self.up(hidden)  # (B, T, F)
        if self.squared_relu:
            return self.down(torch.square(F.relu(up)))  # (B, T, H)
        return self.down(F.gelu(up, approximate=self.approximate))

    def flops(self, shape: FlopsShape) -> int:
        return 2 * shape.tokens * (_matmul_size(self.up) + _matmul_size(self.down))
