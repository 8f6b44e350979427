"""The NaN/Inf and loss-spike policy of a run.

A step is bad when its loss or any gradient is not finite (on any rank), or when the loss
exceeds ``spike_factor`` times the running mean of recent good losses (after
``spike_warmup_steps``). ``skip`` drops the update with a warning (and stops after
``max_skipped_steps`` bad steps in a row); ``stop`` ends the run with an error saying what
happened and which checkpoint to go back to.

Nothing is saved when a run stops for a bad step: a step is a function of the state before it
and its (fixed) batch, so the state before a bad step replays it on every resume, whatever
the learning rate. The checkpoint to go back to is the newest one a good step followed
(checkpoints never hold inf/nan: a save refuses them). The count of bad steps in a row is
saved with each checkpoint and starts again at 0 when a resume changes the optimizer or
training settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mcore.errors import UserError


class TrainingHalted(UserError):
    """The run stopped itself (NaN/Inf or a loss spike under ``train.nan_policy``)."""


def _malformed(why: str) -> UserError:
    return UserError(f"the checkpoint's meta.json 'health' is malformed ({why}); use another checkpoint")


@dataclass
class Health:
    spike_factor: float
    spike_warmup_steps: int
    max_skipped: int
    ema: float | None = None
    good_steps: int = 0
    skipped_in_row: int = 0
    skipped_total: int = 0

    def verdict(self, loss: float, grads_finite: bool) -> str | None:
        """``None`` for a good step, else why it is bad."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if not grads_finite:
            return "a gradient is NaN or Inf"
        if (
            self.spike_factor > 0
            and self.ema is not None
            and self.good_steps >= self.spike_warmup_steps
            and loss > self.spike_factor * self.ema
        ):
            return f"the loss {loss:.4f} spiked above {self.spike_factor} x its running mean {self.ema:.4f}"
        return None

    def device_ok(self, loss: torch.Tensor, bad_ranks: torch.Tensor) -> torch.Tensor:
        """``verdict(loss, bad_ranks == 0) is None`` computed on the device (a 0-d bool tensor, no host sync), from
        the mean loss and the count of ranks with non-finite gradients as 0-d fp64 tensors: the same comparisons
        in the same float64 arithmetic, the spike threshold from this host's running mean. An optimizer that can
        skip on the device (``GuardedStep``) is handed it before the host reads the step's numbers."""
        ok = torch.isfinite(loss) & (bad_ranks == 0)
        if self.spike_factor > 0 and self.ema is not None and self.good_steps >= self.spike_warmup_steps:
            ok = ok & ~(loss > self.spike_factor * self.ema)
        return ok

    def good(self, loss: float) -> None:
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        self.good_steps += 1
        self.skipped_in_row = 0

    def bad(self) -> None:
        self.skipped_in_row += 1
        self.skipped_total += 1

    def state(self) -> dict[str, Any]:
        return {
            "ema": self.ema,
            "good_steps": self.good_steps,
            "skipped_in_row": self.skipped_in_row,
            "skipped_total": self.skipped_total,
        }

    def load(self, state: Any, *, fresh_counter: bool = False) -> None:
        """Restore ``state``; ``fresh_counter`` starts the count of bad steps in a row at 0 (the run's
        settings changed since the checkpoint, so the bad steps before it say nothing about now)."""
        if not isinstance(state, dict):
            raise _malformed(f"not an object: {state!r:.40}")
        ema = state.get("ema")
        if ema is not None and (isinstance(ema, bool) or not isinstance(ema, (int, float)) or not math.isfinite(ema)):
            raise _malformed(f"'ema' = {ema!r:.40}, expected a finite number or null")
        counts: dict[str, int] = {}
        for key in ("good_steps", "skipped_in_row", "skipped_total"):  # only these: nothing else is read
            value = state.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _malformed(f"{key!r} = {value!r:.40}, expected an int >= 0")
            counts[key] = value
        self.ema = None if ema is None else float(ema)
        self.good_steps, self.skipped_in_row = counts["good_steps"], counts["skipped_in_row"]
        self.skipped_total = counts["skipped_total"]
        if fresh_counter:
            self.skipped_in_row = 0
