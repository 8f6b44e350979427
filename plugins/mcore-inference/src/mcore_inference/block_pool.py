"""The block pool of one cache group: free blocks, reference counts and automatic prefix caching.

Why a module of its own: which block a sequence gets, and whether a prompt's block was already computed by an
earlier request, is bookkeeping independent of tensors; the paged cache (``cache.py``) owns the pages and asks
this pool for ids.

Prefix caching: a *full* block is named by a hash chain, ``hash(parent hash, the block's token ids, extra
keys)``, so equal hashes mean equal prefixes and therefore equal keys/values. Every block has a reference
count (the sequences whose table holds it). A block whose count falls to zero goes back to the free list if it
has no hash, or to the tail of an LRU queue of free cached blocks if it has one: it can still be found by its
hash and revived. New blocks come from the free list first; only when it is empty is the least recently used
cached block evicted (its hash forgotten). Hits and misses count looked-up full blocks.

Whoever keeps data per cached block outside the pages (the recurrent state snapshots of ``cache.py``) passes
``on_forget``: it is called with each hash the pool forgets (eviction, ``forget``, ``reset_prefix_cache``), and a
lookup's ``usable`` predicate cuts the hit back to the deepest block whose data is still there.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

#: The parent hash of a sequence's first block.
ROOT_HASH = b"mcore-inference/root"


def block_hash(parent: bytes, token_ids: Sequence[int], extra_key: Hashable = None) -> bytes:
    """The hash of a full block: its parent's hash, its token ids and the request's ``extra_key`` (a LoRA or an
    image id; ``None``: none)."""
    h = hashlib.sha256(parent)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    if extra_key is not None:
        h.update(repr(extra_key).encode())
    return h.digest()


def chain_hashes(token_ids: Sequence[int], block_size: int, extra_key: Hashable = None) -> list[bytes]:
    """The hash of every full block of ``token_ids`` (a partial last block has none)."""
    hashes: list[bytes] = []
    parent = ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start : start + block_size], extra_key)
        hashes.append(parent)
    return hashes


class BlockPool:
    """``num_blocks`` block ids with reference counts, a free list and an LRU queue of free cached blocks;
    ``on_forget(hash)`` is told of every hash the pool forgets."""

    def __init__(self, num_blocks: int, on_forget: Callable[[bytes], None] | None = None) -> None:
        self.num_blocks = num_blocks
        self._on_forget = on_forget
        self.refcounts = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # taken from the end: block 0 first
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # LRU first; blocks with a hash, count 0
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self.hits = 0
        self.misses = 0

    # ----- counting -----

    def num_free(self) -> int:
        """Blocks a sequence can still take: free ones and free cached ones (evicted on demand)."""
        return len(self._free) + len(self._cached_free)

    def num_cached(self) -> int:
        """Blocks that hold a hash (in use or free)."""
        return len(self._hash_of)

    def hit_rate(self) -> float:
        """Hits over looked-up full blocks (0 before any lookup)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    # ----- taking and giving back -----

    def take(self) -> int:
        """A block with reference count 1: from the free list, else the least recently used free cached block
        (forgetting its hash). The caller checks ``num_free()`` first."""
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._cached_free.popitem(last=False)
            self._drop_hash(self._hash_of.pop(block))
        assert self.refcounts[block] == 0, f"block {block} taken while in use"
        self.refcounts[block] = 1
        return block

    def give_back(self, blocks: Sequence[int]) -> None:
        """Drop one reference of each block, in order (a sequence's tail last is evicted first: pass the table
        reversed)."""
        for block in blocks:
            assert self.refcounts[block] > 0, f"block {block} given back more often than taken"
            self.refcounts[block] -= 1
            if self.refcounts[block] == 0:
                if block in self._hash_of:
                    self._cached_free[block] = None
                else:
                    self._free.append(block)

    # ----- prefix caching -----

    def lookup(self, hashes: Sequence[bytes], usable: Callable[[bytes], bool] | None = None) -> list[int]:
        """The longest run of cached blocks for the chain ``hashes`` (with ``usable``: cut back to its deepest
        block whose hash is usable), each with one more reference (revived from the LRU queue when free); counts
        hits and misses over ``hashes``."""
        count = self.peek(hashes)
        if usable is not None:
            while count and not usable(hashes[count - 1]):
                count -= 1
        found: list[int] = []
        for h in hashes[:count]:
            block = self._by_hash[h]
            if self.refcounts[block] == 0:
                del self._cached_free[block]
            self.refcounts[block] += 1
            found.append(block)
        self.hits += len(found)
        self.misses += len(hashes) - len(found)
        return found

    def peek(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of the chain are cached, changing nothing."""
        count = 0
        for h in hashes:
            if h not in self._by_hash:
                break
            count += 1
        return count

    def register(self, block: int, h: bytes) -> None:
        """Name the full, in-use ``block`` by its hash (a hash another block already holds is left to that one)."""
        assert self.refcounts[block] > 0, f"block {block} registered while free"
        if block in self._hash_of or h in self._by_hash:
            return
        self._by_hash[h] = block
        self._hash_of[block] = h

    def has_hash(self, block: int) -> bool:
        return block in self._hash_of

    def is_cached(self, h: bytes) -> bool:
        """Whether some block holds the hash ``h``."""
        return h in self._by_hash

    def forget(self, block: int) -> None:
        """Drop the hash of an in-use block about to be written again (a rollback into it)."""
        h = self._hash_of.pop(block, None)
        if h is not None:
            self._drop_hash(h)

    def reset_prefix_cache(self) -> None:
        """Forget every hash; free cached blocks become plain free blocks."""
        self._free.extend(reversed(self._cached_free))
        self._cached_free.clear()
        for h in list(self._by_hash):
            self._drop_hash(h)
        self._hash_of.clear()

    def _drop_hash(self, h: bytes) -> None:
        del self._by_hash[h]
        if self._on_forget is not None:
            self._on_forget(h)
