"""Prefix caching in ``PagedKVCache``: a new sequence starts from the cached blocks of its prefix (shared, with
reference counts), always computes at least one token, and a rollback into a shared block copies it first."""

from __future__ import annotations

import pytest
import torch
from mcore_inference.cache import PagedKVCache

from mcore.errors import UserError
from mcore.protocols import AttentionCacheSpec, RecurrentStateSpec

SPEC = AttentionCacheSpec(kv_heads=1, head_dim=2, value_dim=2, dtype=torch.float32)


def _fill(cache: PagedKVCache, seq: int, tokens: list[int], start: int = 0) -> None:
    """One step of ``tokens[start:]``, each token's key/value its id (so pages show which token they hold)."""
    new = tokens[start:]
    cache.schedule([seq], [len(new)])
    kv = torch.tensor(new, dtype=torch.float32)[:, None, None].expand(len(new), 1, 2).contiguous()
    for layer in (0, 1):
        cache.append(layer, kv, kv)


def _held_tokens(cache: PagedKVCache, seq: int, layer: int) -> list[int]:
    cache.schedule([seq], [1])  # gather needs a step; the layer has not appended yet
    paged = cache.gather(layer)
    bs, length = cache.block_size, int(paged.seq_lens[0])
    return [int(paged.key_cache[int(paged.block_table[0, p // bs]), p % bs, 0, 0]) for p in range(length)]


def test_a_cached_prefix_is_shared_not_recomputed() -> None:
    cache = PagedKVCache({0: SPEC, 1: SPEC}, block_size=4, num_blocks=10)
    prompt = list(range(1, 12))  # 11 tokens: 2 full blocks and a partial one
    assert cache.start_sequence(0, prompt) == 0
    _fill(cache, 0, prompt)
    cache.cache_prefix(0, prompt)
    assert cache.cached_prefix_tokens([*prompt, 99]) == 8
    assert cache.start_sequence(1, [*prompt[:8], 50, 51]) == 8, "both full blocks are found"
    assert cache.num_free_blocks() == 10 - 3, "the hit blocks are shared, not copied"
    _fill(cache, 1, [*prompt[:8], 50, 51], start=8)
    assert _held_tokens(cache, 1, 1) == [*prompt[:8], 50, 51]
    assert cache.start_sequence(2, prompt[:8]) == 4, "a fully cached prompt still computes its last block"
    assert (cache.prefix_hits, cache.prefix_misses) == (3, 2), "sequence 0 missed its 2 blocks"
    for seq in (0, 1, 2):
        cache.release(seq)
    assert cache.all_free()


def test_blocks_of_a_released_sequence_stay_findable_until_evicted() -> None:
    cache = PagedKVCache({0: SPEC, 1: SPEC}, block_size=4, num_blocks=4)
    prompt = list(range(1, 10))
    cache.start_sequence(0, prompt)
    _fill(cache, 0, prompt)
    cache.cache_prefix(0, prompt)
    cache.release(0)
    assert cache.all_free() and cache.cached_prefix_tokens(prompt) == 8
    other = list(range(20, 36))  # 16 tokens: takes every block, evicting the cached ones
    cache.start_sequence(1, other)
    _fill(cache, 1, other)
    assert cache.cached_prefix_tokens(prompt) == 0
    cache.release(1)


def test_rollback_into_a_shared_block_copies_it() -> None:
    cache = PagedKVCache({0: SPEC, 1: SPEC}, block_size=4, num_blocks=8)
    prompt = list(range(1, 10))
    cache.start_sequence(0, prompt)
    _fill(cache, 0, prompt)
    cache.cache_prefix(0, prompt)
    follower = [*prompt[:8], 60]
    assert cache.start_sequence(1, follower) == 8  # shares sequence 0's two full blocks
    cache.rollback(0, 3)  # sequence 0 keeps 6 tokens: its second block, shared, becomes partial
    _fill(cache, 0, [*prompt[:6], 70, 71, 72], start=6)
    assert _held_tokens(cache, 0, 0) == [*prompt[:6], 70, 71, 72]
    assert _held_tokens(cache, 1, 1) == prompt[:8], "the shared block was written through another sequence"
    assert cache.cached_prefix_tokens(prompt) == 8, "the cached blocks still hold the original prefix"
    cache.release(1)
    cache.rollback(0, 1)  # not shared: sequence 0's own second block keeps no hash once partial
    cache.release(0)
    assert cache.all_free()


def test_rollback_into_an_unshared_cached_block_forgets_its_hash() -> None:
    cache = PagedKVCache({0: SPEC, 1: SPEC}, block_size=4, num_blocks=8)
    prompt = list(range(1, 10))
    cache.start_sequence(0, prompt)
    _fill(cache, 0, prompt)
    cache.cache_prefix(0, prompt)
    cache.rollback(0, 3)
    assert cache.cached_prefix_tokens(prompt) == 4, "the second block will be rewritten: it is no longer cached"
    _fill(cache, 0, [*prompt[:6], 70, 71, 72], start=6)
    cache.cache_prefix(0, [*prompt[:6], 70, 71, 72])
    assert cache.cached_prefix_tokens([*prompt[:6], 70, 71, 72, 73]) == 8
    cache.release(0)
    assert cache.all_free()


def test_prefix_caching_is_off_with_windows_or_without_state_snapshots() -> None:
    """Sliding windows turn it off; recurrent layers need state snapshots (``test_state_snapshots.py``): with none
    (``state_snapshots=0``), or with no attention layer at all, it is off."""
    window = AttentionCacheSpec(kv_heads=1, head_dim=2, value_dim=2, dtype=torch.float32, window=4)
    state = RecurrentStateSpec(states={"s": ((2,), torch.float32)})
    for specs, snapshots in (({0: SPEC, 1: window}, None), ({0: SPEC, 1: state}, 0), ({0: state}, None)):
        cache = PagedKVCache(specs, block_size=4, num_blocks=8, max_seqs=2, state_snapshots=snapshots)
        assert not cache.prefix_caching and cache.start_sequence(0, list(range(12))) == 0
        assert cache.snapshots is None
        cache.release(0)
        assert cache.all_free()


def test_sizing_errors_are_one_line() -> None:
    for kwargs in ({}, {"num_blocks": 0}, {"num_blocks": 4, "memory_bytes": 10}, {"memory_bytes": 1}):
        with pytest.raises(UserError) as info:
            PagedKVCache({0: SPEC}, block_size=4, **kwargs)  # type: ignore[arg-type]
        assert "\n" not in str(info.value)
    with pytest.raises(UserError):
        PagedKVCache({}, num_blocks=4)
