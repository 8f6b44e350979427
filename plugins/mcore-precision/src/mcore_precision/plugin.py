"""Registers the ``fp16``, ``fp8-current`` and ``fp8-delayed`` precision recipes with mcore (lazy
references: no torch import)."""

from __future__ import annotations

from typing import Any

from mcore.plugins import hookimpl

MCORE_PLUGIN_API = 1


@hookimpl
def mcore_register(registry: Any) -> None:
    registry.add(
        "precision",
        "fp16",
        "mcore_precision.fp16:FP16",
        summary="fp16 parameters (or fp32 under fp16 autocast) with dynamic loss scaling; inf/NaN steps skipped",
    )
    registry.add(
        "precision",
        "fp8-current",
        "mcore_precision.fp8:FP8Current",
        summary="FP8 GEMMs of the matrix linears, per-tensor scales from each tensor's current amax",
    )
    registry.add(
        "precision",
        "fp8-delayed",
        "mcore_precision.fp8:FP8Delayed",
        summary="FP8 GEMMs of the matrix linears, per-tensor scales from an amax history (window, max/most_recent)",
    )
