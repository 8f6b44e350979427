"""The ``KVCacheHandle`` conformance suite on the reference cache, and proof that it fails broken caches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch

from mcore.protocols import AttentionCacheSpec, KVCacheHandle, LayerCacheSpec, PagedKV
from mcore_testing.conformance import KVCacheConformance
from mcore_testing.reference_kv import ReferenceKVCache


class TestReferenceKVCache(KVCacheConformance):
    def make_cache(
        self, specs: Mapping[int, LayerCacheSpec], *, block_size: int, num_blocks: int, max_seqs: int
    ) -> ReferenceKVCache:
        return ReferenceKVCache(specs, block_size=block_size, num_blocks=num_blocks, max_seqs=max_seqs)


def test_reference_is_a_handle_for_mypy() -> None:
    """mypy checks this assignment structurally; the suite checks the behaviour."""
    cache: KVCacheHandle = ReferenceKVCache(
        {0: AttentionCacheSpec(kv_heads=1, head_dim=2, value_dim=2, dtype=torch.float32)}
    )
    assert isinstance(cache, KVCacheHandle)


class RollbackKeepsLength(ReferenceKVCache):
    """Forgets to shrink the sequence's length on rollback (the layers are truncated)."""

    def rollback(self, seq_id: int, k: int) -> None:
        length = self._lengths.get(seq_id)
        super().rollback(seq_id, k)
        if length is not None:
            self._lengths[seq_id] = length


class GatherDropsFirstBlock(ReferenceKVCache):
    """Hands out block tables without their first block."""

    def gather(self, layer_index: int) -> PagedKV:
        paged = super().gather(layer_index)
        table = paged.block_table.roll(-1, dims=1)
        table[:, -1] = -1
        return PagedKV(
            key_cache=paged.key_cache,
            value_cache=paged.value_cache,
            block_table=table,
            seq_lens=paged.seq_lens,
            window=paged.window,
        )


class NeverFreesWindow(ReferenceKVCache):
    """Keeps every block of a sliding-window layer."""

    def _free_outside_window(self, layer: Any, seq: int) -> None:
        pass


class RollbackKeepsState(ReferenceKVCache):
    """Truncates the pages on rollback but leaves the recurrent state after the rejected tokens."""

    def rollback(self, seq_id: int, k: int) -> None:
        pools = [p.clone() for layer in self.layers.values() for p in getattr(layer, "pools", {}).values()]
        super().rollback(seq_id, k)
        live = [p for layer in self.layers.values() for p in getattr(layer, "pools", {}).values()]
        for pool, saved in zip(live, pools):
            pool.copy_(saved)


class OneSharedSlot(ReferenceKVCache):
    """Every sequence reads and writes the same recurrent state slot."""

    def schedule(self, seq_ids: Any, num_tokens: Any) -> None:
        super().schedule(seq_ids, num_tokens)
        for layer in self.layers.values():
            if hasattr(layer, "slots"):
                for seq in layer.slots:
                    layer.slots[seq] = 0


class AcceptsAnyTokenCount(ReferenceKVCache):
    """Does not check that append brings one row per scheduled token (truncates or leaves garbage)."""

    def append(self, layer_index: int, key: Any, value: Any) -> None:
        n = sum(self._step[1]) if self._step else 0
        if key.shape[0] != n and key.shape[0] > 0:
            key = key[:1].expand(n, *key.shape[1:]).clone()
            value = None if value is None else value[:1].expand(n, *value.shape[1:]).clone()
        super().append(layer_index, key, value)


def _suite(cache_cls: type[ReferenceKVCache]) -> KVCacheConformance:
    class Suite(KVCacheConformance):
        def make_cache(
            self, specs: Mapping[int, LayerCacheSpec], *, block_size: int, num_blocks: int, max_seqs: int
        ) -> ReferenceKVCache:
            return cache_cls(specs, block_size=block_size, num_blocks=num_blocks, max_seqs=max_seqs)

    return Suite()


@pytest.mark.parametrize(
    ("cache_cls", "test", "message"),
    [
        (RollbackKeepsLength, "test_seq_lens_follow_the_schedule", "seq_lens after rollback"),
        (RollbackKeepsLength, "test_rollback_then_reappend_equals_never_appended", "seq_lens"),
        (GatherDropsFirstBlock, "test_append_gather_in_order_across_blocks_and_sequences", "freed block"),
        (NeverFreesWindow, "test_sliding_window_frees_blocks_and_keeps_the_window", "was not freed"),
        (
            RollbackKeepsState,
            "test_rollback_then_reappend_equals_never_appended",
            "not the state after its last kept token",
        ),
        (OneSharedSlot, "test_recurrent_state_slots_are_per_sequence_and_persist", "sequence 4: state"),
        (AcceptsAnyTokenCount, "test_bad_input_raises_one_line_user_error", "wrong token count: no error raised"),
    ],
)
def test_suite_catches_broken_cache(cache_cls: type[ReferenceKVCache], test: str, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        getattr(_suite(cache_cls), test)()
