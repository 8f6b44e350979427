"""``StateSnapshots``: recurrent states kept at block boundaries, so prefix caching works for hybrid models.

Why it exists: a cached block holds keys and values, which is all an attention layer needs to continue from a
prefix; a recurrent layer (GDN, Mamba2) needs its state right after the prefix's last token instead. This pool
keeps copies of every recurrent layer's state (conv state and SSM / delta state alike: whatever the layer's
``RecurrentStateSpec`` names) taken when a sequence's length was exactly a multiple of the block size, keyed by
the hash of the block that ended there. A new sequence whose prefix hits cached blocks starts from the snapshot
of its deepest hit block (``PagedKVCache.start_sequence`` cuts the hit back to a block that has one).

Lifetime: ``count`` snapshots live on the cache's device, each one state per recurrent layer. A snapshot goes
when its block's hash is forgotten (the block pool evicts the block, a rollback rewrites it, the prefix cache is
reset: ``BlockPool(on_forget=...)``), or, when all ``count`` are in use and a new one is wanted, the least
recently used one goes (its block stays cached, for attention, but no longer starts a hit by itself).

Shape legend: C snapshots; each state ``(C, *shape)`` of its spec.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch

from mcore.protocols.block import RecurrentStateSpec


class StateSnapshots:
    """``count`` snapshots of every recurrent layer of ``specs`` (``{layer_index: spec}``), keyed by block hash."""

    def __init__(self, specs: Mapping[int, RecurrentStateSpec], count: int, device: torch.device | str = "cpu") -> None:
        self.count = count
        #: layer -> state name -> (C, *shape)
        self.pools: dict[int, dict[str, torch.Tensor]] = {
            index: {
                name: torch.zeros(count, *shape, dtype=dtype, device=device)
                for name, (shape, dtype) in s.states.items()
            }
            for index, s in specs.items()
        }
        self._slot_of: OrderedDict[bytes, int] = OrderedDict()  # hash -> snapshot slot, least recently used first
        self._free: list[int] = list(range(count - 1, -1, -1))
        self.evicted = 0  # snapshots dropped to make room (not counting those whose block went)

    def __contains__(self, h: object) -> bool:
        return h in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def hashes(self) -> list[bytes]:
        return list(self._slot_of)

    def save(self, h: bytes, states: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Keep ``states`` (``{layer: {name: (*shape)}}``, e.g. views of the sequence's slots) as the snapshot of
        block hash ``h``; a hash already kept only becomes the most recently used (its states are the same)."""
        if h in self._slot_of:
            self._slot_of.move_to_end(h)
            return
        if not self._free:
            _, slot = self._slot_of.popitem(last=False)
            self._free.append(slot)
            self.evicted += 1
        slot = self._free.pop()
        for index, named in self.pools.items():
            for name, pool in named.items():
                pool[slot].copy_(states[index][name])
        self._slot_of[h] = slot

    def load(self, h: bytes) -> dict[int, dict[str, torch.Tensor]]:
        """The snapshot of ``h`` (``{layer: {name: (*shape)}}`` views: copy them out), now most recently used."""
        slot = self._slot_of[h]
        self._slot_of.move_to_end(h)
        return {index: {name: pool[slot] for name, pool in named.items()} for index, named in self.pools.items()}

    def forget(self, h: bytes) -> None:
        """Drop the snapshot of ``h`` (its block's hash was forgotten); nothing when there is none."""
        slot = self._slot_of.pop(h, None)
        if slot is not None:
            self._free.append(slot)

    def num_free(self) -> int:
        return len(self._free)
