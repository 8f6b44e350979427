"""Feed-forward blocks: SwiGLU, GeLU MLP and clamped SwiGLU.

Shape legend: B rows, T tokens, H hidden, F ``ffn_hidden_size``.

The gated MLPs use one fused ``[gate | up]`` projection ``(H -> 2F)`` so the two input GEMMs are
one; the activation runs as one kernel on CUDA (``kernels.swiglu``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mcore.params import ParamSpec
from mcore.protocols.block import BlockContext, FlopsShape
from mcore_models.blocks.base import Block, check_choice, check_non_negative, check_positive, init_linear_
from mcore_models.kernels.swiglu import clamped_swiglu_reference, swiglu

#: Values of ``gelu_approximate`` (``torch.nn.functional.gelu``'s ``approximate``).
GELU_APPROXIMATIONS = ("none", "tanh")


@dataclass(kw_only=True, slots=True)
class MLPConfig:
    """Settings every MLP here shares (a subclass's ``__post_init__`` calls ``check_mlp`` too)."""

    ffn_hidden_size: int = 1024
    """Hidden size of the MLP (per branch for the gated ones)."""
    mlp_bias: bool = False
    """Biases on the projections."""
    init_std: float = 0.02
    """Std of the normal init of the input projection."""
    output_init_std: float | None = None
    """Std of the normal init of the output projection (none: init_std)."""

    def __post_init__(self) -> None:
        check_mlp(self)


def check_mlp(config: MLPConfig) -> None:
    check_positive("mlp", "ffn_hidden_size", config.ffn_hidden_size)
    check_non_negative("mlp", "init_std", config.init_std)
    if config.output_init_std is not None:
        check_non_negative("mlp", "output_init_std", config.output_init_std)


class _TwoLayer(Block):
    """``down(act(up(x)))``; subclasses set ``up_factor`` (2 for gated) and ``activation``."""

    up_factor = 1

    def __init__(self, config: MLPConfig, *, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.up = nn.Linear(hidden_size, self.up_factor * config.ffn_hidden_size, bias=config.mlp_bias)
        self.down = nn.Linear(config.ffn_hidden_size, hidden_size, bias=config.mlp_bias)
        self.reset_parameters()

    def param_specs(self) -> dict[str, ParamSpec]:
        """A gated MLP's ``up`` rows are ``[gate | up]`` (``mcore.params``)."""
        ffn = self.config.ffn_hidden_size
        splits = (("gate", ffn), ("up", ffn)) if self.up_factor == 2 else ()
        specs = {"up.weight": ParamSpec("matrix", splits=splits), "down.weight": ParamSpec("matrix")}
        if self.up.bias is not None:
            specs["up.bias"] = ParamSpec("bias", splits=splits)
        if self.down.bias is not None:
            specs["down.bias"] = ParamSpec("bias")
        return specs

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        return self.down(self.activation(self.up(hidden)))  # (B, T, up_factor*F) -> (B, T, F) -> (B, T, H)

    def flops(self, shape: FlopsShape) -> int:
        return (
            2
            * shape.tokens
            * (self.up.in_features * self.up.out_features + self.down.in_features * self.down.out_features)
        )

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        init_linear_(self.up, self.config.init_std, generator)
        init_linear_(self.down, self.config.output_init_std or self.config.init_std, generator)


class SwiGLU(_TwoLayer):
    """``down(silu(gate(x)) * up(x))`` (Llama, Qwen, Mistral)."""

    @dataclass(kw_only=True, slots=True)
    class Config(MLPConfig):
        pass

    up_factor = 2

    def __init__(self, config: Config | None = None, *, hidden_size: int) -> None:
        super().__init__(config or self.Config(), hidden_size=hidden_size)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)


class ClampedSwiGLU(_TwoLayer):
    """``down(silu(min(gate, a)) * clamp(up, -a, a))`` with ``a = clamp_limit`` (DeepSeek-V4 style)."""

    @dataclass(kw_only=True, slots=True)
    class Config(MLPConfig):
        clamp_limit: float = 7.0
        """The gate is clamped to at most this and the up branch to [-clamp_limit, clamp_limit] (finite, > 0)."""

        def __post_init__(self) -> None:
            check_mlp(self)
            check_positive("mlp", "clamp_limit", self.clamp_limit)

    up_factor = 2

    def __init__(self, config: Config | None = None, *, hidden_size: int) -> None:
        config = config or self.Config()
        self.limit = config.clamp_limit
        super().__init__(config, hidden_size=hidden_size)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return clamped_swiglu_reference(x, self.limit)


class GeluMLP(_TwoLayer):
    """``down(gelu(up(x)))`` (GPT-2 style); ``gelu_approximate`` is ``none`` or ``tanh``."""

    @dataclass(kw_only=True, slots=True)
    class Config(MLPConfig):
        gelu_approximate: str = "none"
        """'none' (exact GeLU) or 'tanh' (the tanh approximation)."""

        def __post_init__(self) -> None:
            check_mlp(self)
            check_choice("mlp", "gelu_approximate", self.gelu_approximate, GELU_APPROXIMATIONS)

    def __init__(self, config: Config | None = None, *, hidden_size: int) -> None:
        config = config or self.Config()
        self.approximate = config.gelu_approximate
        super().__init__(config, hidden_size=hidden_size)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)
