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
    registry.add("lr_schedule", "constant", "mcore.train.schedules:Constant", summary="linear warmup, then constant")
    registry.add("lr_schedule", "cosine", "mcore.train.schedules:Cosine", summary="linear warmup, then cosine decay")
    registry.add("lr_schedule", "wsd", "mcore.train.schedules:WSD", summary="warmup, stable, then linear decay")


@hookimpl
def mcore_cli_commands(add: Any) -> None:
    add("train", "mcore.train.cli:main", help="train a model (no config file: the built-in demo)")
    add("generate", "mcore.train.generate:main", help="generate text from a checkpoint")
    add("export", "mcore.train.export:main", help="export a checkpoint (Hugging Face format)")
    add("plan", "mcore.plan.cli:main", help="estimate per-rank memory of a run before launching it")
    add("data", "mcore.data.cli:main", help="prepare token shards, train a tokenizer")
