"""What every block of this package shares: seeded init helpers, parameter counting, config checks.

Weights are drawn on the CPU from a ``torch.Generator`` in fp32 and copied to the parameter's
device and dtype, so a seed gives the same weights on every device.
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def normal_(param: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    if param.is_meta:
        return
    values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
    param.copy_(values)


@torch.no_grad()
def fill_(param: torch.Tensor, value: float) -> None:
    if not param.is_meta:
        param.fill_(value)


def init_linear_(linear: nn.Linear, std: float, generator: torch.Generator | None) -> None:
    """Normal(0, std) weight, zero bias."""
    normal_(linear.weight, std, generator)
    if linear.bias is not None:
        fill_(linear.bias, 0.0)


class Block(nn.Module):
    """Base class: ``num_parameters`` counts what the block owns (works on the meta device)."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_positive(owner: str, key: str, value: int | float | None) -> None:
    """``ValueError`` naming ``owner.key`` unless ``value`` is ``None`` or finite and > 0 (NaN is not)."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{owner}.{key} = {value!r}: must be a finite number > 0")


def check_non_negative(owner: str, key: str, value: int | float) -> None:
    """``ValueError`` naming ``owner.key`` unless ``value`` is finite and >= 0 (NaN is not)."""
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{owner}.{key} = {value!r}: must be a finite number >= 0")


def check_choice(owner: str, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{key} = {value!r}: allowed: {', '.join(allowed)}")
