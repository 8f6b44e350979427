"""Per-run metric sinks: ``metrics.jsonl`` (one object per logged step) and TensorBoard events.

Only rank 0 writes. TensorBoard is optional at run time: without the ``tensorboard``
package the run warns once and writes the JSONL file only.
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
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}" if not k.startswith("eval") else f"eval/{k}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
