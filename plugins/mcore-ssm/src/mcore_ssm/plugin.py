"""Registers the ``gdn`` and ``mamba2`` token-mixer blocks and the hybrid presets with mcore (lazy references: no
torch import)."""

from __future__ import annotations

from typing import Any

from mcore.plugins import hookimpl

MCORE_PLUGIN_API = 1


@hookimpl
def mcore_register(registry: Any) -> None:
    registry.add(
        "block",
        "gdn",
        "mcore_ssm.gdn:GatedDeltaNet",
        summary="Gated DeltaNet mixer (Qwen3-Next linear attention): gated delta rule, packed documents, decode state",
    )
    registry.add(
        "block",
        "mamba2",
        "mcore_ssm.mamba2:Mamba2",
        summary="Mamba2 (SSD) mixer: chunked state-space scan, conv1d, gated RMSNorm, packed documents, decode state",
    )
    from mcore_ssm.presets import PRESETS  # names and summaries only: no torch

    for name, (attr, summary) in PRESETS.items():
        registry.add("preset", name, f"mcore_ssm.presets:{attr}", summary=summary)
    return None
