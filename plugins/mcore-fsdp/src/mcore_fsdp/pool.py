"""Persistent flat buffers lent to units for gathers and reductions.

Un-sharded parameters, all-gather and reduce-scatter buffers are borrowed from here and
given back, so after the first steps no buffer is allocated per step. Buffers are raw bytes
shared by every kind of request: a request takes the smallest free buffer that fits (viewed
as the dtype it asks for), and only when none fits is a buffer of the requested size made.
The pool therefore holds about the most bytes in flight at once, not one set of buffers per
kind; units of different sizes (a root holding the embedding and the head, small blocks)
each get buffers near their own size. Since every step makes the same requests in the same
order, the pool stops growing; ``allocations`` counts buffers ever made and tests check it
stays flat after the first step.

On CUDA a buffer given back carries an event recorded on the releasing stream; the next
borrower's stream waits on it before writing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

#: buffers are made in multiples of this many bytes, so any dtype can view them
_ALIGN = 16


@dataclass(eq=False)
class Lease:
    """A borrowed buffer: ``tensor`` is the whole buffer in the borrower's dtype; callers
    slice ``[:numel]``."""

    raw: torch.Tensor  # (bytes,) uint8
    kind: str = ""
    tensor: torch.Tensor = field(init=False, repr=False)
    event: torch.cuda.Event | None = field(default=None, repr=False)
    #: views its borrowers made once and reuse (keyed by borrower and purpose; a borrower asks
    #: for the same dtype for the same purpose): a few slices per parameter cost more CPU than
    #: the copies they feed
    views: dict[Any, Any] = field(default_factory=dict, repr=False)

    def lend_as(self, kind: str, dtype: torch.dtype) -> Lease:
        self.kind = kind
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.tensor = self.raw[: self.raw.numel() // itemsize * itemsize].view(dtype)
        return self

    def view(self, numel: int) -> torch.Tensor:
        return self.tensor[:numel]


class BufferPool:
    """Byte buffers of any kind; a request gets the smallest free one that fits (best fit)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.allocations = 0
        self._free: list[Lease] = []  # sorted by size
        self._lent: set[int] = set()

    def acquire(self, kind: str, dtype: torch.dtype, numel: int, stream: torch.cuda.Stream | None = None) -> Lease:
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        fit = next((i for i, lease in enumerate(self._free) if lease.raw.numel() >= nbytes), None)
        if fit is not None:
            lease = self._free.pop(fit)
            if lease.event is not None and stream is not None:
                stream.wait_event(lease.event)
            lease.event = None
        else:
            self.allocations += 1
            size = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
            lease = Lease(torch.empty(size, dtype=torch.uint8, device=self.device))
        self._lent.add(id(lease))
        return lease.lend_as(kind, dtype)

    def release(self, lease: Lease, stream: torch.cuda.Stream | None = None) -> None:
        assert id(lease) in self._lent, "buffer released twice"
        self._lent.discard(id(lease))
        if stream is not None:
            lease.event = torch.cuda.Event()
            lease.event.record(stream)
        self._free.append(lease)
        self._free.sort(key=lambda x: x.raw.numel())

    @property
    def lent(self) -> int:
        return len(self._lent)

    def nbytes(self) -> int:
        """Bytes held in free buffers (lent ones are counted by their users)."""
        return sum(lease.raw.numel() for lease in self._free)
