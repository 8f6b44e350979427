"""Profile a few training steps with ``torch.profiler``: where a step's time goes, per rank.

``[log] profile_from = N`` records steps ``N .. N + profile_steps - 1`` (1-based, as the metrics count
them) and writes, per rank, ``out_dir/profile/rank<r>/trace.json`` (Chrome/Perfetto trace) and
``top_ops.txt`` (operators by their own device time, then by host time). Nothing is recorded when
``profile_from`` is 0 (the default) or the run ends or resumes past the window.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

TOP_OPS = 40


class StepProfiler:
    """``begin(step)`` before and ``end(step)`` after each step (``step`` 1-based); records the window."""

    def __init__(self, out_dir: Path, *, first: int, steps: int, rank: int, device: torch.device) -> None:
        self.first, self.last = first, first + steps - 1
        self.dir = out_dir / "profile" / f"rank{rank}"
        self.cuda = device.type == "cuda"
        self._profiler: Any = None

    @property
    def enabled(self) -> bool:
        return self.first > 0

    def begin(self, step: int) -> None:
        if not self.enabled or step != self.first or self._profiler is not None:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._profiler = profile(activities=activities, record_shapes=True)
        self._profiler.__enter__()

    def end(self, step: int) -> None:
        if self._profiler is None or step < self.last:
            return
        self.close()

    def close(self) -> None:
        """Stop recording (also when the run stops inside the window) and write the files."""
        prof, self._profiler = self._profiler, None
        if prof is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.dir / "trace.json"))
        table = prof.key_averages()
        device_key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        text = [
            f"steps {self.first}-{self.last}: operators by own {'device' if self.cuda else 'host'} time",
            table.table(sort_by=device_key, row_limit=TOP_OPS),
        ]
        if self.cuda:
            text += ["operators by own host time", table.table(sort_by="self_cpu_time_total", row_limit=TOP_OPS)]
        (self.dir / "top_ops.txt").write_text("\n".join(text))
