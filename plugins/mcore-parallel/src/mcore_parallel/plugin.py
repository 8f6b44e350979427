"""Registers the ``ddp`` and ``tp`` layouts with mcore (a lazy reference: no torch import)."""

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
