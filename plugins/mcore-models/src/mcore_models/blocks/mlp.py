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

from mcore.protocols.block import BlockContext, FlopsShape
from mcore_models.blocks.base import Block, check_positive, init_linear_
from mcore_models.kernels.swiglu import clamped_swiglu_reference, swiglu


@dataclass(kw_only=True, slots=True)
class MLPConfig:
    ffn_hidden_size: int = 1024
    mlp_bias: bool = False
    init_std: float = 0.02
    output_init_std: float | None = None  # None: init_std


class _TwoLayer(Block):
    """``down(act(up(x)))``; subclasses set ``up_factor`` (2 for gated) and ``activation``."""

    up_factor = 1

    def __init__(self, config: MLPConfig, *, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        check_positive("mlp", "ffn_hidden_size", config.ffn_hidden_size)
        self.up = nn.Linear(hidden_size, self.up_factor * config.ffn_hidden_size, bias=config.mlp_bias)
        self.down = nn.Linear(config.ffn_hidden_size, hidden_size, bias=config.mlp_bias)
        self.reset_parameters()

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

    up_factor = 2

    def __init__(self, config: Config | None = None, *, hidden_size: int) -> None:
        config = config or self.Config()
        check_positive("mlp", "clamp_limit", config.clamp_limit)
        self.limit = config.clamp_limit
        super().__init__(config, hidden_size=hidden_size)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return clamped_swiglu_reference(x, self.limit)


class GeluMLP(_TwoLayer):
    """``down(gelu(up(x)))`` (GPT-2 style); ``gelu_approximate`` is ``none`` or ``tanh``."""

    @dataclass(kw_only=True, slots=True)
    class Config(MLPConfig):
        gelu_approximate: str = "none"

    def __init__(self, config: Config | None = None, *, hidden_size: int) -> None:
        config = config or self.Config()
        if config.gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"mlp.gelu_approximate = {config.gelu_approximate!r}: allowed: none, tanh")
        self.approximate = config.gelu_approximate
        super().__init__(config, hidden_size=hidden_size)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)
