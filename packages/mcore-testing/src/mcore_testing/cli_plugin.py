"""An mcore plugin for tests that launch ``python -m mcore train`` on several processes, as torchrun would.

Load it with ``MCORE_PLUGINS=mcore_testing.plugin,mcore_testing.cli_plugin``. It registers the
stand-in data-parallel layouts (``test-ddp``, ``test-fsdp``) and ``sleepy-tiny``:
``reference-tiny`` whose forward sleeps where ``MCORE_TEST_SLEEP`` says, so a test can make one
rank fall behind, or every rank sit in one long phase, without patching a running process:

    MCORE_TEST_SLEEP="RANKS:CALL:SECONDS"   # RANKS "*" or "0,2"; CALL counts forwards from 1
"""

from __future__ import annotations

import os
import time
from typing import Any

from mcore.plugins import hookimpl
from mcore_testing.reference import TinyModelFactory

MCORE_PLUGIN_API = 1


def sleep_plan(text: str) -> tuple[set[int] | None, int, float]:
    """``(ranks or None for every rank, forward call, seconds)`` from ``MCORE_TEST_SLEEP``."""
    ranks, call, seconds = text.split(":")
    return (None if ranks == "*" else {int(r) for r in ranks.split(",")}), int(call), float(seconds)


class SleepyTinyFactory(TinyModelFactory):
    """``reference-tiny``, with the sleep of ``MCORE_TEST_SLEEP`` in one forward call."""

    @staticmethod
    def build(config: Any, *, seed: int, device: Any = "cpu", block_lookup: Any = None) -> Any:
        model = TinyModelFactory.build(config, seed=seed, device=device)
        plan = os.environ.get("MCORE_TEST_SLEEP")
        if str(device) == "meta" or not plan:
            return model
        ranks, call, seconds = sleep_plan(plan)
        rank = int(os.environ.get("RANK", "0"))
        inner, calls = model.forward, [0]

        def forward(tokens: Any, *, labels: Any = None, ctx: Any = None) -> Any:
            calls[0] += 1
            if calls[0] == call and (ranks is None or rank in ranks):
                time.sleep(seconds)
            return inner(tokens, labels=labels, ctx=ctx)

        model.forward = forward
        return model


@hookimpl
def mcore_register(registry: Any) -> None:
    registry.add("layout", "test-ddp", "mcore_testing.layouts:AllReduceLayout", summary="tests: all-reduce DP")
    registry.add("layout", "test-fsdp", "mcore_testing.layouts:TorchShardLayout", summary="tests: torch fully_shard")
    registry.add("model", "sleepy-tiny", "mcore_testing.cli_plugin:SleepyTinyFactory", summary="tests: sleeps")
