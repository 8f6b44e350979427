"""Static decode steps of a ``PagedKVCache`` with recurrent layers (hybrid models), without a model: the rows' states
are gathered by the step's device slot index and written back with one ``index_copy_`` (padding rows: the scratch
state slot only), one slot per sequence serves every recurrent layer, the lengths count the step, a snapshot taken
after a static step holds its states, and what static steps cannot do (per-token states for a rollback, more than
one token per row) is refused in one line."""

from __future__ import annotations

import pytest
import torch
from mcore_inference.cache import PagedKVCache
from mcore_inference.static_decode import DecodeBuffers, StaticStep, checked_sizes, static_decode_supported

from mcore.errors import UserError
from mcore.protocols.block import AttentionCacheSpec, RecurrentStateSpec

BS, NKV, HD = 4, 2, 3
ATTN = AttentionCacheSpec(kv_heads=NKV, head_dim=HD, value_dim=HD, dtype=torch.float32)
STATES = {"conv": ((3, 2), torch.float32), "ssm": ((2, 2, 2), torch.float32)}
SPECS = {0: RecurrentStateSpec(states=STATES), 1: ATTN, 2: RecurrentStateSpec(states=STATES)}
RECURRENT = (0, 2)


def _cache(**kwargs: object) -> PagedKVCache:
    options: dict[str, object] = {"block_size": BS, "num_blocks": 16, "max_seqs": 4, "scratch_block": True}
    return PagedKVCache(SPECS, **(options | kwargs))  # type: ignore[arg-type]


def _states(rows: int, seed: int) -> dict[int, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {i: {n: torch.randn(rows, *s, generator=gen) for n, (s, _) in STATES.items()} for i in RECURRENT}


def _eager_step(
    cache: PagedKVCache, ids: list[int], counts: list[int], seed: int
) -> dict[int, dict[str, torch.Tensor]]:
    """An eager step: keys for the attention layer, final states (one per sequence) for the recurrent ones."""
    cache.schedule(ids, counts)
    cache.append(1, torch.randn(sum(counts), NKV, HD), torch.randn(sum(counts), NKV, HD))
    states = _states(len(ids), seed)
    for index in RECURRENT:
        cache.set_recurrent_state(index, states[index])
    return states


def _static_step(
    cache: PagedKVCache, buffers: DecodeBuffers, ids: list[int], rows: int, seed: int
) -> tuple[StaticStep, dict[int, dict[str, torch.Tensor]], dict[int, dict[str, torch.Tensor]]]:
    """A static step of ``ids`` padded to ``rows``: the states the layers read, and the ones they write."""
    cache.schedule(ids, [1] * len(ids))
    step = buffers.step(rows)
    tables, lens, slots = cache.begin_static_decode(step)
    assert cache.scratch_block is not None and cache.scratch_state is not None
    buffers.fill(
        rows,
        list(range(len(ids))),
        tables,
        lens,
        slots,
        cache.scratch_block,
        BS,
        cache.static_state_slots(),
        cache.scratch_state,
    )
    cache.append(1, torch.randn(rows, NKV, HD), torch.randn(rows, NKV, HD))
    read = {i: cache.recurrent_state(i) for i in RECURRENT}
    written = _states(rows, seed)
    for index in RECURRENT:
        cache.set_recurrent_state(index, written[index])
    return step, read, written


def test_a_static_step_gathers_and_writes_back_the_rows_states_by_slot() -> None:
    cache, buffers = _cache(), DecodeBuffers(4, 8, torch.device("cpu"))
    assert cache.static_decode_ok and cache.has_recurrent_state and cache.scratch_state == 4
    assert all(pool.shape[0] == 5 for i in RECURRENT for pool in cache.layers[i].slots_pool.values())  # type: ignore[union-attr]
    prefill = _eager_step(cache, [7, 9, 11], [3, 5, 2], seed=1)
    slot = {seq: cache._slots[seq] for seq in (7, 9, 11)}
    assert all(cache.layers[i].slots is cache._slots for i in RECURRENT)  # type: ignore[union-attr]
    before = {(i, n): p.clone() for i in RECURRENT for n, p in cache.layers[i].slots_pool.items()}  # type: ignore[union-attr]
    step, read, written = _static_step(cache, buffers, [9, 7], rows=4, seed=2)
    assert step.state_slots is not None
    assert step.state_slots.tolist() == [slot[9], slot[7], 4, 4]
    for index in RECURRENT:
        pools = cache.layers[index].slots_pool  # type: ignore[union-attr]
        for name, pool in pools.items():
            assert torch.equal(read[index][name][0], prefill[index][name][1])  # sequence 9 (second in the prefill)
            assert torch.equal(read[index][name][1], prefill[index][name][0])  # sequence 7
            assert torch.equal(read[index][name][2:], before[index, name][[4, 4]])  # padding: the scratch slot
            assert torch.equal(pool[slot[9]], written[index][name][0])
            assert torch.equal(pool[slot[7]], written[index][name][1])
            assert torch.equal(pool[slot[11]], before[index, name][slot[11]])  # not in the step: untouched
            free = [s for s in range(4) if s not in slot.values()]
            assert torch.equal(pool[free], before[index, name][free])  # free slots: untouched
            assert not torch.equal(pool[4], before[index, name][4])  # the padding rows wrote the scratch slot
        assert cache.layers[index].lengths == {7: 4, 9: 6, 11: 2}
    assert cache.layers[1].lengths == {7: 4, 9: 6, 11: 2}
    for seq in (7, 9, 11):
        cache.release(seq)
    assert cache.all_free()


def test_a_snapshot_after_a_static_step_holds_its_states() -> None:
    cache, buffers = _cache(), DecodeBuffers(2, 8, torch.device("cpu"))
    assert cache.snapshots is not None
    tokens = list(range(20, 24))
    _eager_step(cache, [5], [3], seed=3)
    _, _, written = _static_step(cache, buffers, [5], rows=2, seed=4)  # length 4: on the first block's end
    cache.cache_prefix(5, tokens)
    assert cache.num_snapshots == 1
    (h,) = cache.snapshots.hashes()
    for index, states in cache.snapshots.load(h).items():
        for name, value in states.items():
            assert torch.equal(value, written[index][name][0])
    cache.release(5)
    assert cache.start_sequence(6, [*tokens, 99]) == 4  # a new sequence continues from the snapshot
    slot = cache._slots[6]
    for index in RECURRENT:
        for name, pool in cache.layers[index].slots_pool.items():  # type: ignore[union-attr]
            assert torch.equal(pool[slot], written[index][name][0])
    cache.release(6)
    assert cache.all_free()


def test_rollback_after_static_steps_is_refused_and_eager_rollback_still_works() -> None:
    cache, buffers = _cache(), DecodeBuffers(2, 8, torch.device("cpu"))
    _eager_step(cache, [3], [4], seed=5)
    cache.schedule([3], [3])  # a verify step of 3 tokens with per-token states
    cache.append(1, torch.randn(3, NKV, HD), torch.randn(3, NKV, HD))
    per_token = _states(3, 6)
    for index in RECURRENT:
        cache.set_recurrent_state(index, per_token[index], per_token=True)
    cache.rollback(3, 2)  # to 5 tokens: the state after the verify step's first token
    for index in RECURRENT:
        for name, pool in cache.layers[index].slots_pool.items():  # type: ignore[union-attr]
            assert torch.equal(pool[cache._slots[3]], per_token[index][name][0])
    _static_step(cache, buffers, [3], rows=2, seed=7)
    _static_step(cache, buffers, [3], rows=2, seed=8)  # 7 tokens: the rolled-back verify step's length again
    with pytest.raises(UserError, match=r"^rollback of sequence 3: layer 0's last step was a static decode step"):
        cache.rollback(3, 1)
    cache.rollback(3, 0)  # nothing to undo: fine
    cache.release(3)
    assert cache.all_free()


def test_what_static_steps_of_recurrent_caches_cannot_do_is_refused() -> None:
    cache, buffers = _cache(), DecodeBuffers(2, 8, torch.device("cpu"))
    with pytest.raises(UserError, match="static speculative steps need caches without recurrent layers"):
        checked_sizes([2], [cache], False, "static speculative steps")
    assert checked_sizes([2, 1], [cache], False, "static decode", recurrent=True) == [1, 2]
    _eager_step(cache, [1], [2], seed=9)
    cache.schedule([1], [2])
    step = buffers.step(2)
    for bad in (StaticStep(**{**step.__dict__, "queries": 2}), StaticStep(**{**step.__dict__, "state_slots": None})):
        with pytest.raises(UserError, match="one token per row with a state slot index"):
            cache.begin_static_decode(bad)
    assert not _cache(scratch_block=False).static_decode_ok
    assert _cache(scratch_block=False).scratch_state is None


def test_static_decode_supported_takes_recurrent_layers_beside_one_attention_group() -> None:
    assert static_decode_supported(SPECS)
    assert not static_decode_supported({0: SPECS[0]})  # no attention group
    windowed = AttentionCacheSpec(kv_heads=NKV, head_dim=HD, value_dim=HD, dtype=torch.float32, window=8)
    assert not static_decode_supported({**SPECS, 3: windowed})  # two groups
