"""Registers mcore-inference with mcore (lazy references: no torch import)."""

from __future__ import annotations

from typing import Any

from mcore.plugins import hookimpl

MCORE_PLUGIN_API = 1


@hookimpl
def mcore_register(registry: Any) -> None:
    registry.add(
        "engine",
        "paged",
        "mcore_inference.generation:PagedEngine",
        summary="paged KV cache, continuous batching, prefix caching: serves `mcore generate`",
    )


@hookimpl
def mcore_cli_commands(add: Any) -> None:
    add("serve", "mcore_inference.server.cli:main", help="serve a model over an OpenAI-compatible HTTP API")
