"""What every block of this package shares: seeded init helpers and parameter counting.

Weights are drawn on the CPU from a ``torch.Generator`` in fp32 and copied to the parameter's
device and dtype, so a seed gives the same weights on every device.
"""

from __future__ import annotations

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
    if value is not None and value <= 0:
        raise ValueError(f"{owner}.{key} = {value!r}: must be a positive number")
