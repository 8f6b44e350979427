"""A small per-backend cache of the masks of one model call, so every layer of a forward reuses one mask.

Masks depend on the call's document boundaries (``ctx.cu_seqlens``, the same tensor object in every
layer's view of the call), the shapes and the window. An entry is keyed on the identity and version of
that tensor and lives only as long as the tensor: when the batch's ``cu_seqlens`` is freed its masks go
too, so the cache neither grows with the steps nor returns a mask for a later tensor that reuses the
address. Entries without documents (a window over plain rows) depend on shapes only; the cache keeps at
most ``max_entries`` entries, least recently used first out. Copies and pickles of a backend start empty.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch


class MaskCache:
    """``get(cu_seqlens, key, build)``: the value ``build()`` made for this tensor and ``key``, built once."""

    def __init__(self, max_entries: int = 8) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries = {max_entries}: must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[weakref.ref[torch.Tensor] | None, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, cu_seqlens: torch.Tensor | None, key: Hashable, build: Callable[[], Any]) -> Any:
        """The cached value for ``(cu_seqlens, key)``, or ``build()`` stored for later calls."""
        full_key = (key,) if cu_seqlens is None else (id(cu_seqlens), cu_seqlens._version, key)
        hit = self._entries.get(full_key)
        if hit is not None and (hit[0] is None or hit[0]() is cu_seqlens):
            self._entries.move_to_end(full_key)
            return hit[1]
        value = build()
        ref = None
        if cu_seqlens is not None:
            ref = weakref.ref(cu_seqlens)
            weakref.finalize(cu_seqlens, self._entries.pop, full_key, None)  # dies with the batch's documents
        self._entries[full_key] = (ref, value)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __deepcopy__(self, memo: dict[int, Any]) -> MaskCache:
        return MaskCache(self.max_entries)

    def __reduce__(self) -> tuple[Any, ...]:
        return (MaskCache, (self.max_entries,))
