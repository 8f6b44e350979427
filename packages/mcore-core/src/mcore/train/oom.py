"""Running out of device memory is one line: where, how much, what to change, and the plan's estimate.

torch's ``OutOfMemoryError`` is a page of allocator statistics. The run loop turns it into
``OutOfMemory`` (a ``UserError``: one line, exit code 2) naming the step, the allocation that
failed ("Tried to allocate 2.00 GiB" in torch's text), the settings that lower the peak with
their current values, and ``mcore plan``'s per-rank estimate for the same config when the
planner can make one.
"""

from __future__ import annotations

import re
from typing import Any

from mcore.config import RunConfig
from mcore.errors import UserError

_ASKED = re.compile(r"Tried to allocate ([\d.]+ ?[KMGTP]?i?B)")


class OutOfMemory(UserError):
    """The device ran out of memory; the message says what to change."""


def planned_peak(config: RunConfig, host: Any, world_size: int) -> str | None:
    """``mcore plan``'s per-rank peak for ``config``, formatted; ``None`` when the planner cannot tell."""
    try:
        from mcore.plan.estimate import plan_memory

        plan = plan_memory(config, host, world_size=world_size)
    except Exception:  # the estimate is a hint; never let it hide the real error
        return None
    return f"{plan.peak / 2**30:.2f} GiB" if plan.peak >= 2**30 / 10 else f"{plan.peak / 2**20:.1f} MiB"


def oom_message(
    exc: BaseException, *, where: str, config: RunConfig, host: Any, world_size: int, micro_rows: int
) -> str:
    """The one-line explanation of ``exc`` (a ``torch.OutOfMemoryError``) raised during ``where``."""
    found = _ASKED.search(str(exc))
    asked = f"could not allocate {found.group(1)}" if found else "ran out of memory"
    train = config.train
    micro = f"{train.micro_batch_size}" if train.micro_batch_size is not None else f"none: {micro_rows} rows"
    layouts = ", ".join(config.parallel.layouts)
    advice = (
        f"lower train.micro_batch_size (now {micro}), set train.recompute = 'selective' or 'full' (now "
        f"{train.recompute!r}), or shard the model with a layout such as fsdp (parallel.layouts now [{layouts}])"
    )
    peak = planned_peak(config, host, world_size)
    estimate = f"; `mcore plan` estimates a peak of {peak} per rank for this run" if peak else ""
    return f"out of memory in {where}: the device {asked}; {advice}{estimate}"
