"""An mcore plugin registering ``reference-tiny`` (model) and ``reference-adamw`` (optimizer), for tests.

Not installed as an entry point: tests load it explicitly through ``isolated_host``.
"""

from __future__ import annotations

from typing import Any

from mcore.plugins import hookimpl

MCORE_PLUGIN_API = 1


@hookimpl
def mcore_register(registry: Any) -> None:
    registry.add("model", "reference-tiny", "mcore_testing.reference:TinyModelFactory", summary="tiny test transformer")
    registry.add(
        "optimizer", "reference-adamw", "mcore_testing.reference_optim:ReferenceAdamW", summary="torch AdamW, tests"
    )
