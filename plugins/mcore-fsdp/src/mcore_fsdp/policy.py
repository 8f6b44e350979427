"""The FSDP2 policy objects, with the same names and fields, so scripts switch by import.

``MixedPrecisionPolicy``: dtype of the gathered (compute) parameters, of gradient reduction
and of the module's outputs. ``OffloadPolicy()`` means "no offload"; ``CPUOffloadPolicy`` is
accepted by name but refused by ``fully_shard`` (not implemented here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MixedPrecisionPolicy:
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    output_dtype: torch.dtype | None = None
    cast_forward_inputs: bool = True


@dataclass(frozen=True)
class OffloadPolicy:
    """No offloading (FSDP2's default)."""


@dataclass(frozen=True)
class CPUOffloadPolicy(OffloadPolicy):
    pin_memory: bool = True
