"""Learning-rate schedules (kind ``lr_schedule``): a multiplier of the base LR for each step.

Schedules are pure functions of the step, so resuming needs no scheduler state beyond the
step itself. ``step`` is the 0-based index of the step about to be taken; warmup is linear
from ``1 / warmup_steps`` to 1.
"""

from __future__ import annotations

import math


class _Schedule:
    def __init__(
        self, *, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0, decay_fraction: float = 0.2
    ) -> None:
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.min_lr_ratio, self.decay_fraction = min_lr_ratio, decay_fraction

    def warmup(self, step: int) -> float | None:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return None

    def factor(self, step: int) -> float:
        raise NotImplementedError


class Constant(_Schedule):
    """Linear warmup, then the base LR."""

    def factor(self, step: int) -> float:
        w = self.warmup(step)
        return 1.0 if w is None else w


class Cosine(_Schedule):
    """Linear warmup, then a cosine from the base LR down to ``min_lr_ratio`` of it at the last step."""

    def factor(self, step: int) -> float:
        w = self.warmup(step)
        if w is not None:
            return w
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WSD(_Schedule):
    """Warmup-stable-decay: warmup, the base LR, then a linear decay to ``min_lr_ratio`` over the last
    ``decay_fraction`` of the steps."""

    def factor(self, step: int) -> float:
        w = self.warmup(step)
        if w is not None:
            return w
        decay_steps = max(1, round(self.total_steps * self.decay_fraction))
        decay_start = self.total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return 1.0 - (1.0 - self.min_lr_ratio) * progress
