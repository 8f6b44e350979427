"""Persistent flat buffers lent to units for gathers and reductions.

Un-sharded parameters and reduce-scatter inputs are borrowed from here and given back, so
after the first step no buffer is allocated per step: the pool grows to the largest number
of buffers in flight at once (two when consecutive units double-buffer) and every buffer
has the size of the largest request of its kind. ``allocations`` counts buffers ever made;
tests check it stays flat after step 1.

On CUDA a buffer given back carries an event recorded on the releasing stream; the next
borrower's stream waits on it before writing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class Lease:
    """A borrowed buffer: ``tensor`` is the whole base buffer; callers slice ``[:numel]``."""

    tensor: torch.Tensor
    kind: str
    event: torch.cuda.Event | None = field(default=None, repr=False)

    def view(self, numel: int) -> torch.Tensor:
        return self.tensor[:numel]


class BufferPool:
    """Buffers by (kind, dtype), all of one size per key (``reserve`` raises it before use)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.allocations = 0
        self._free: dict[tuple[str, torch.dtype], list[Lease]] = {}
        self._size: dict[tuple[str, torch.dtype], int] = {}
        self._lent: set[int] = set()

    def reserve(self, kind: str, dtype: torch.dtype, numel: int) -> None:
        """Make every future buffer of this key at least ``numel`` elements."""
        key = (kind, dtype)
        if numel > self._size.get(key, 0):
            self._size[key] = numel
            self._free[key] = []  # smaller buffers are dropped; new ones get the new size

    def acquire(self, kind: str, dtype: torch.dtype, numel: int, stream: torch.cuda.Stream | None = None) -> Lease:
        self.reserve(kind, dtype, numel)
        key = (kind, dtype)
        free = self._free.setdefault(key, [])
        if free:
            lease = free.pop()
            if lease.event is not None and stream is not None:
                stream.wait_event(lease.event)
            lease.event = None
        else:
            self.allocations += 1
            lease = Lease(torch.empty(self._size[key], dtype=dtype, device=self.device), kind)
        self._lent.add(id(lease))
        return lease

    def release(self, lease: Lease, stream: torch.cuda.Stream | None = None) -> None:
        assert id(lease) in self._lent, "buffer released twice"
        self._lent.discard(id(lease))
        if stream is not None:
            lease.event = torch.cuda.Event()
            lease.event.record(stream)
        key = (lease.kind, lease.tensor.dtype)
        if lease.tensor.numel() >= self._size.get(key, 0):
            self._free.setdefault(key, []).append(lease)

    @property
    def lent(self) -> int:
        return len(self._lent)

    def nbytes(self) -> int:
        """Bytes held in free buffers (lent ones are counted by their users)."""
        return sum(lease.tensor.numel() * lease.tensor.element_size() for free in self._free.values() for lease in free)
