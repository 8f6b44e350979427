"""A deterministic, resumable, distributed sampler over blended datasets.

The global stream of rows is a pure function of ``(seed, step)``: slot ``k`` of the stream
is drawn from dataset ``d`` chosen by a deterministic weighted interleave (the dataset
furthest below its share ``weight_d * (k + 1)`` takes the slot), and the ``c``-th row drawn
from a dataset is row ``perm_e[c mod n]`` of its epoch ``e = c div n``, where ``perm_e`` is
a seeded permutation. A global batch is ``G`` consecutive slots; data-parallel rank ``r``
of ``R`` takes the ``r``-th contiguous ``G / R`` of them, so ranks never share a row within
a step. The sampler's only state is the step, which is why a resumed run sees exactly the
batch it would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class BlendedSampler:
    """Maps ``(step, dp_rank)`` to the ``(dataset, row)`` pairs of that rank's share of the batch."""

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        *,
        global_batch: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        assert len(sizes) == len(weights) and all(n > 0 for n in sizes)
        assert global_batch % dp_size == 0 and 0 <= dp_rank < dp_size
        self.sizes = [int(n) for n in sizes]
        total = float(sum(weights))
        self.weights = np.asarray([w / total for w in weights], dtype=np.float64)
        self.global_batch, self.seed = global_batch, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._choice = np.empty(0, dtype=np.int64)  # dataset of each slot so far
        self._draw = np.empty(0, dtype=np.int64)  # how many rows that dataset gave before the slot
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _extend(self, slots: int) -> None:
        done = len(self._choice)
        if slots <= done:
            return
        if len(self.sizes) == 1:  # one dataset: slot k is its k-th row
            self._choice = np.zeros(slots, dtype=np.int64)
            self._draw = np.arange(slots, dtype=np.int64)
            return
        counts = np.bincount(self._choice, minlength=len(self.sizes)).astype(np.float64)
        choice = np.empty(slots - done, dtype=np.int64)
        draw = np.empty(slots - done, dtype=np.int64)
        for k in range(done, slots):
            d = int(np.argmax(self.weights * (k + 1) - counts))
            choice[k - done], draw[k - done] = d, counts[d]
            counts[d] += 1
        self._choice = np.concatenate([self._choice, choice])
        self._draw = np.concatenate([self._draw, draw])

    def _perm(self, dataset: int, epoch: int) -> np.ndarray:
        key = (dataset, epoch)
        if key not in self._perms:
            rng = np.random.default_rng([self.seed, dataset, epoch])
            self._perms = {k: v for k, v in self._perms.items() if k[0] != dataset or k[1] >= epoch - 1}
            self._perms[key] = rng.permutation(self.sizes[dataset])
        return self._perms[key]

    def global_slots(self, step: int) -> list[tuple[int, int]]:
        """All ``G`` ``(dataset, row)`` pairs of global batch ``step``."""
        first = step * self.global_batch
        self._extend(first + self.global_batch)
        out = []
        for k in range(first, first + self.global_batch):
            d, c = int(self._choice[k]), int(self._draw[k])
            n = self.sizes[d]
            out.append((d, int(self._perm(d, c // n)[c % n])))
        return out

    def local_slots(self, step: int) -> list[tuple[int, int]]:
        """This data-parallel rank's ``G / R`` pairs of batch ``step``."""
        share = self.global_batch // self.dp_size
        return self.global_slots(step)[self.dp_rank * share : (self.dp_rank + 1) * share]
