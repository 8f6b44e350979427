"""Registers the ``fsdp`` and ``hsdp`` layouts with mcore (lazy references: no torch import)."""

from __future__ import annotations

from typing import Any

from mcore.plugins import hookimpl

MCORE_PLUGIN_API = 1


@hookimpl
def mcore_register(registry: Any) -> None:
    registry.add(
        "layout",
        "fsdp",
        "mcore_fsdp.layout:FSDPLayout",
        summary="fully sharded data parallel over dp_shard (FSDP2-compatible fully_shard per block)",
    )
    registry.add(
        "layout",
        "hsdp",
        "mcore_fsdp.layout:HSDPLayout",
        summary="hybrid sharded data parallel: replicate over dp_replicate x shard over dp_shard",
    )
