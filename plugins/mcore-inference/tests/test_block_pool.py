"""The block pool: reference counts, the LRU queue of free cached blocks, hash chains, hits and misses."""

from __future__ import annotations

from mcore_inference.block_pool import ROOT_HASH, BlockPool, block_hash, chain_hashes


def test_hash_chain_depends_on_every_earlier_token_and_the_extra_key() -> None:
    a = chain_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2, "only full blocks are hashed"
    assert a[0] == block_hash(ROOT_HASH, [1, 2, 3, 4]) and a[1] == block_hash(a[0], [5, 6, 7, 8])
    b = chain_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert b[1] != a[1], "the second block's hash must change with the first block's tokens"
    assert chain_hashes([1, 2, 3, 4], 4, extra_key="lora-a") != chain_hashes([1, 2, 3, 4], 4, extra_key="lora-b")
    assert chain_hashes([1, 2, 3, 4], 4, extra_key=None) == a[:1]


def test_free_blocks_come_before_cached_ones_which_go_least_recently_used_first() -> None:
    pool = BlockPool(4)
    blocks = [pool.take() for _ in range(4)]
    assert sorted(blocks) == [0, 1, 2, 3] and pool.num_free() == 0
    h = chain_hashes(list(range(12)), 4)
    for block, key in zip(blocks[:3], h):
        pool.register(block, key)
    pool.give_back(list(reversed(blocks)))  # a finished sequence: its tail first
    assert pool.num_free() == 4 and pool.num_cached() == 3 and not any(pool.refcounts)
    assert pool.take() == blocks[3], "an uncached free block goes before any cached one"
    assert pool.take() == blocks[2], "then the least recently used cached block: the chain's tail"
    assert pool.num_cached() == 2, "an evicted block forgets its hash"
    assert pool.peek(h) == 2 and pool.lookup(h) == blocks[:2]
    assert (pool.hits, pool.misses) == (2, 1) and pool.hit_rate() == 2 / 3
    assert pool.refcounts[blocks[0]] == 1 and pool.num_free() == 0


def test_shared_blocks_count_every_holder() -> None:
    pool = BlockPool(3)
    block = pool.take()
    key = chain_hashes([5, 5], 2)[0]
    pool.register(block, key)
    assert pool.lookup([key]) == [block] and pool.refcounts[block] == 2
    pool.give_back([block])
    assert pool.num_free() == 2, "a block still held by a sequence is not free"
    pool.give_back([block])
    assert pool.num_free() == 3 and pool.refcounts[block] == 0
    assert pool.lookup([key]) == [block], "a free cached block is revived by a lookup"
    pool.give_back([block])
    pool.reset_prefix_cache()
    assert pool.num_cached() == 0 and pool.lookup([key]) == [] and pool.num_free() == 3


def test_a_hash_already_held_by_another_block_stays_with_it() -> None:
    pool = BlockPool(2)
    first, second = pool.take(), pool.take()
    key = chain_hashes([1, 2], 2)[0]
    pool.register(first, key)
    pool.register(second, key)
    assert pool.has_hash(first) and not pool.has_hash(second)


def test_on_forget_hears_every_forgotten_hash_and_usable_cuts_a_hit_back() -> None:
    forgotten: list[bytes] = []
    pool = BlockPool(3, on_forget=forgotten.append)
    h = chain_hashes(list(range(12)), 4)
    blocks = [pool.take() for _ in range(3)]
    for block, key in zip(blocks, h):
        pool.register(block, key)
    pool.give_back(list(reversed(blocks)))
    assert pool.lookup(h, usable=lambda key: key == h[1]) == blocks[:2], "cut back to the deepest usable block"
    assert (pool.hits, pool.misses) == (2, 1)
    assert pool.lookup(h, usable=lambda key: False) == [] and pool.misses == 4
    pool.give_back(list(reversed(blocks[:2])))
    assert pool.take() == blocks[2] and forgotten == [h[2]], "eviction forgets the evicted block's hash"
    pool.forget(blocks[2])  # not named any more: nothing to tell
    pool.reset_prefix_cache()
    assert sorted(forgotten) == sorted(h)
