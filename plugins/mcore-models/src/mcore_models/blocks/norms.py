"""Normalisation blocks: RMSNorm and LayerNorm, optionally with zero-centred gamma.

With ``zero_centered_gamma`` the stored weight is ``gamma - 1`` (initialised to zero, so weight
decay pulls towards the identity); the effective scale is ``1 + weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mcore.params import Init, ParamSpec
from mcore.protocols.block import BlockContext, FlopsShape
from mcore_models.blocks.base import Block, check_positive
from mcore_models.kernels.rmsnorm import rms_norm


def _scale_init(zero_centered: bool) -> Init:
    return Init("zeros") if zero_centered else Init("ones")


class RMSNorm(Block):
    """``x / rms(x) * gamma`` over the last dim; fp32 statistics, Triton kernel on CUDA."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        norm_eps: float = 1e-5
        """Epsilon added to the mean square (finite, > 0)."""
        zero_centered_gamma: bool = False
        """Store the scale as gamma - 1 (initialised to 0)."""

        def __post_init__(self) -> None:
            check_positive("norm", "norm_eps", self.norm_eps)

    def __init__(self, config: Config | None = None, *, hidden_size: int) -> None:
        super().__init__()
        self.config = config or self.Config()
        self.eps = self.config.norm_eps
        self.offset = 1.0 if self.config.zero_centered_gamma else 0.0
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def param_specs(self) -> dict[str, ParamSpec]:
        """The scale: ones (zeros when stored as ``gamma - 1``); replicated under tensor parallelism."""
        return {"weight": ParamSpec("norm", init=_scale_init(self.config.zero_centered_gamma), tp="replicate")}

    def forward(self, hidden: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        return rms_norm(hidden, self.weight, self.eps, self.offset)  # (..., H)

    def flops(self, shape: FlopsShape) -> int:
        return 4 * shape.tokens * self.weight.numel()


class LayerNorm(Block):
    """Standard LayerNorm (mean and variance), with bias unless ``norm_bias = false``."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        norm_eps: float = 1e-5
        """Epsilon added to the variance (finite, > 0)."""
        zero_centered_gamma: bool = False
        """Store the scale as gamma - 1 (initialised to 0)."""
        norm_bias: bool = True
        """Learn a bias (False: scale only)."""

        def __post_init__(self) -> None:
            check_positive("norm", "norm_eps", self.norm_eps)

    def __init__(self, config: Config | None = None, *, hidden_size: int) -> None:
        super().__init__()
        self.config = config or self.Config()
        self.offset = 1.0 if self.config.zero_centered_gamma else 0.0
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.bias = nn.Parameter(torch.empty(hidden_size)) if self.config.norm_bias else None
        self.reset_parameters()

    def param_specs(self) -> dict[str, ParamSpec]:
        specs = {"weight": ParamSpec("norm", init=_scale_init(self.config.zero_centered_gamma), tp="replicate")}
        if self.bias is not None:
            specs["bias"] = ParamSpec("bias", init=Init("zeros"), tp="replicate")
        return specs

    def forward(self, hidden: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        weight = self.weight + self.offset if self.offset else self.weight
        return F.layer_norm(hidden, (hidden.shape[-1],), weight, self.bias, self.config.norm_eps)

    def flops(self, shape: FlopsShape) -> int:
        return 6 * shape.tokens * self.weight.numel()
