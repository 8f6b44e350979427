"""The core's own plugin: registered through the ``mcore`` entry point like any other."""

from __future__ import annotations

from typing import Any

from mcore.plugins.hookspecs import hookimpl

MCORE_PLUGIN_API = 1


@hookimpl
def mcore_register(registry: Any) -> None:
    registry.add("layout", "single", "mcore.layouts.single:SingleLayout", summary="one process, model unchanged")
    registry.add("precision", "fp32", "mcore.precision.basic:FP32", summary="fp32 parameters and compute")
    registry.add("precision", "bf16", "mcore.precision.basic:BF16", summary="bf16 compute, fp32 master weights")
