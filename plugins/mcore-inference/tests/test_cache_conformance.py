"""``PagedKVCache`` passes the core's ``KVCacheConformance`` suite (with and without a memory budget)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mcore_inference.cache import PagedKVCache, bytes_per_block

from mcore.protocols import LayerCacheSpec
from mcore_testing.conformance.kv_cache import KVCacheConformance


class TestPagedKVCacheConformance(KVCacheConformance):
    def make_cache(
        self, specs: Mapping[int, LayerCacheSpec], *, block_size: int, num_blocks: int, max_seqs: int
    ) -> Any:
        return PagedKVCache(specs, block_size=block_size, num_blocks=num_blocks, max_seqs=max_seqs)


class TestPagedKVCacheFromMemoryBudget(KVCacheConformance):
    """Sized by bytes: exactly ``num_blocks`` blocks' worth (no recurrent-state snapshots for prefix caching, whose
    bytes would come out of the budget first)."""

    def make_cache(
        self, specs: Mapping[int, LayerCacheSpec], *, block_size: int, num_blocks: int, max_seqs: int
    ) -> Any:
        budget = bytes_per_block(specs, block_size) * num_blocks
        cache = PagedKVCache(specs, block_size=block_size, memory_bytes=budget, max_seqs=max_seqs, state_snapshots=0)
        assert cache.num_blocks == num_blocks
        return cache
