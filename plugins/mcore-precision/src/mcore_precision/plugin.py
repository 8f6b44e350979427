"""Registers the ``fp16``, ``fp8-current``, ``fp8-delayed``, ``fp8-rowwise``, ``fp8-blockwise``, ``mxfp8`` and
``nvfp4`` precision recipes with mcore (lazy references: no torch import)."""

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
    registry.add(
        "precision",
        "fp8-rowwise",
        "mcore_precision.fp8:FP8Rowwise",
        summary="FP8 GEMMs of the matrix linears, one scale per row of each operand along the reduction dim",
    )
    registry.add(
        "precision",
        "torchao-float8",
        "mcore_precision.torchao_float8:TorchaoFloat8",
        summary="torchao's float8 training on the same linears as fp8-current (needs torchao: the [torchao] extra)",
    )
    registry.add(
        "precision",
        "fp8-blockwise",
        "mcore_precision.fp8:FP8Blockwise",
        summary="FP8 GEMMs of the matrix linears, DeepSeek-V3 blocks: 1x128 activation/gradient tiles, 128x128 weights",
    )
    registry.add(
        "precision",
        "mxfp8",
        "mcore_precision.microscaling:MXFP8",
        summary="MXFP8 GEMMs of the matrix linears: 1x32 blocks, E8M0 power-of-two scales (emulated)",
    )
    registry.add(
        "precision",
        "nvfp4",
        "mcore_precision.microscaling:NVFP4",
        summary="NVFP4 GEMMs of the matrix linears: E2M1, E4M3 block + fp32 tensor scales, RHT, stochastic grads (emulated)",
    )
