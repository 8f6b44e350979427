"""Registers the ``ddp``, ``tp``, ``cp`` and ``pp`` layouts with mcore (a lazy reference: no torch import)."""

from __future__ import annotations

from typing import Any

from mcore.plugins import hookimpl

MCORE_PLUGIN_API = 1


@hookimpl
def mcore_register(registry: Any) -> None:
    registry.add(
        "layout",
        "ddp",
        "mcore_parallel.ddp:DDPLayout",
        summary="replicated data parallel over dp_replicate: bucketed gradients reduced during backward (ZeRO-1 base)",
    )
    registry.add(
        "layout",
        "tp",
        "mcore_parallel.tp:TPLayout",
        summary="tensor parallel over tp: column/row linears, vocab-parallel embedding and loss, from ParamSpec.tp",
    )
    registry.add(
        "layout",
        "cp",
        "mcore_parallel.cp:CPLayout",
        summary="context parallel over cp: zig-zag split, ring (P2P, log-sum-exp merge) or all-gather K/V attention",
    )
    registry.add(
        "layout", "pp", "mcore_parallel.pp:PPLayout", summary="pipeline parallel over pp: 1F1B, interleaved, ZB-H1"
    )
