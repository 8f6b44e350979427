"""The live progress display: step, loss (and eval loss when computed), lr, tokens/s, MFU, memory and ETA.

``bar`` draws a rich progress bar (a terminal is needed), ``lines`` prints one line per
logged step (for log files), ``none`` is quiet; ``auto`` picks ``bar`` on a terminal.
Only rank 0 displays.
"""

from __future__ import annotations

import sys
from typing import Any


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def describe(metrics: dict[str, Any], total: int) -> str:
    parts = [f"step {metrics['step']}/{total}", f"loss {metrics['loss']:.4f}"]
    if metrics.get("eval_loss") is not None:
        parts.append(f"eval loss {metrics['eval_loss']:.4f}")
    parts.append(f"lr {metrics['lr']:.2e}")
    parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
    if metrics.get("mfu") is not None:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    if metrics.get("memory_gb") is not None:
        parts.append(f"mem {metrics['memory_gb']:.2f} GB")
    if metrics.get("eta_s") is not None:
        parts.append(f"ETA {_fmt_eta(metrics['eta_s'])}")
    return " | ".join(parts)


class Progress:
    def __init__(self, mode: str, total: int, start: int, *, enabled: bool = True) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.total = total
        self._bar: Any = None
        if self.mode == "bar":
            try:
                from rich.progress import BarColumn, TextColumn
                from rich.progress import Progress as RichProgress

                self._bar = RichProgress(
                    TextColumn("[bold]train"), BarColumn(), TextColumn("{task.description}"), transient=False
                )
                self._task = self._bar.add_task("starting", total=total, completed=start)
                self._bar.start()
            except ImportError:
                self.mode = "lines"

    def update(self, metrics: dict[str, Any]) -> None:
        if self.mode == "bar":
            self._bar.update(self._task, completed=metrics["step"], description=describe(metrics, self.total))
        elif self.mode == "lines":
            print(describe(metrics, self.total), file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.mode == "bar":
            self._bar.console.print(text)
        elif self.mode == "lines":
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
