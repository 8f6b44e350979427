"""Per-run metric sinks: ``metrics.jsonl`` (one object per logged step) and TensorBoard events.

Only rank 0 writes. TensorBoard is optional at run time: without the ``tensorboard``
package the run warns once and writes the JSONL file only. Metrics never end a run: a write
that fails (a full disk) warns once, naming the file, and the run goes on without metrics.
Reading skips lines that are not JSON objects (a line cut short by a crash, NUL bytes left by
a file system) and warns once with their count.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(
        self, out_dir: Path, *, tensorboard: bool, enabled: bool = True, append: bool = False, resumed_at: int = 0
    ) -> None:
        """``resumed_at``: the step a resumed run continues from; TensorBoard drops the events logged after it."""
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._file = None
        self._tb: Any = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if append else "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = resumed_at + 1 if append and resumed_at > 0 else None
                self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge)
            except ImportError:
                warnings.warn(
                    "log.tensorboard = true but the tensorboard package is missing; pip install tensorboard",
                    stacklevel=2,
                )

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        try:
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        except OSError as exc:
            self._give_up(self.path, exc)
            return
        if self._tb is not None:
            step = int(record["step"])
            try:
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                        self._tb.add_scalar(f"train/{k}" if not k.startswith("eval") else f"eval/{k}", v, step)
            except OSError as exc:
                self._give_up(self.path.parent / "tensorboard", exc)

    def _give_up(self, where: Path, exc: OSError) -> None:
        """Stop writing metrics (both sinks) after a failed write; warn once; never raise."""
        warnings.warn(
            f"writing metrics to {where} failed ({exc.strerror or exc}); the run goes on without writing metrics "
            "(free disk space to get them back on the next run)",
            stacklevel=3,
        )
        file, tb = self._file, self._tb
        self._file = self._tb = None
        for sink in (file, tb):
            try:
                if sink is not None:
                    sink.close()  # may flush the same unwritable bytes again: that error is already reported
            except OSError:
                pass

    def close(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._tb is not None:
                self._tb.close()
                self._tb = None
        except OSError as exc:
            self._give_up(self.path, exc)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one a line; other lines (cut short, NUL bytes, not objects) skipped with a warning."""
    if not path.is_file():
        return []
    records: list[dict[str, Any]] = []
    bad = 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    if bad:
        warnings.warn(
            f"{path}: skipped {bad} line(s) that are not JSON objects (cut short by a crash, or corrupted)",
            stacklevel=2,
        )
    return records
