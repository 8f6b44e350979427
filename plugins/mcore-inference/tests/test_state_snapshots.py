"""Prefix caching with recurrent layers (``PagedKVCache`` + ``StateSnapshots``): a sequence ending exactly on a
named block leaves a snapshot of its recurrent states; a new sequence's hit is cut back to the deepest block with
one and starts from its states; snapshots go with their blocks (eviction, rollback) or least recently used first
when the pool is full. The states here are fake: each step's state is the sequence's token sum so far, so a slot
shows which prefix it continues from."""

from __future__ import annotations

import pytest
import torch
from mcore_inference.block_pool import chain_hashes
from mcore_inference.cache import PagedKVCache
from mcore_inference.engine import LLMEngine

from mcore.errors import UserError
from mcore.protocols import AttentionCacheSpec, RecurrentStateSpec

KV = AttentionCacheSpec(kv_heads=1, head_dim=2, value_dim=2, dtype=torch.float32)
STATE = RecurrentStateSpec(states={"conv": ((2,), torch.float32), "ssm": ((2, 3), torch.float32)})


def _cache(**kwargs: object) -> PagedKVCache:
    return PagedKVCache({0: STATE, 1: KV}, block_size=4, max_seqs=3, **kwargs)  # type: ignore[arg-type]


def _state(cache: PagedKVCache, seq: int) -> float:
    """The sequence's ``conv`` state's first value: the sum of the tokens it continued from."""
    layer = cache.layers[0]
    return float(layer.slots_pool["conv"][layer.slots[seq], 0])  # type: ignore[union-attr]


def _step(cache: PagedKVCache, seq: int, tokens: list[int], start: int, stop: int) -> None:
    """One step of ``tokens[start:stop]``: keys are the ids, the state adds them to the slot's sum."""
    new = tokens[start:stop]
    cache.schedule([seq], [len(new)])
    before = cache.recurrent_state(0)["conv"][0, 0]
    total = before + sum(new)
    cache.set_recurrent_state(0, {"conv": total.expand(1, 2).clone(), "ssm": total.expand(1, 2, 3).clone()})
    kv = torch.tensor(new, dtype=torch.float32)[:, None, None].expand(len(new), 1, 2).contiguous()
    cache.append(1, kv, kv)
    cache.cache_prefix(seq, tokens)


def test_a_hit_starts_from_the_snapshot_of_its_deepest_snapshotted_block() -> None:
    cache = _cache(num_blocks=16)
    assert cache.prefix_caching and cache.snapshots is not None
    prompt = list(range(1, 15))  # 14 tokens: 3 full blocks
    assert cache.start_sequence(0, prompt) == 0
    _step(cache, 0, prompt, 0, 5)  # ends mid-block: no snapshot
    _step(cache, 0, prompt, 5, 8)  # ends on block 2
    assert cache.num_snapshots == 1
    _step(cache, 0, prompt, 8, 14)  # crosses block 3's end without stopping there: block 3 has none
    assert cache.num_snapshots == 1
    assert cache.cached_prefix_tokens(prompt) == 8, "3 blocks cached, the deepest with a snapshot is block 2"
    assert cache.start_sequence(1, [*prompt, 99]) == 8
    assert _state(cache, 1) == sum(prompt[:8]), "the new sequence's slot holds the state after 8 tokens"
    layer = cache.layers[0]
    assert torch.equal(layer.slots_pool["ssm"][layer.slots[1]], torch.full((2, 3), float(sum(prompt[:8]))))  # type: ignore[union-attr]
    assert (cache.prefix_hits, cache.prefix_misses) == (2, 3 + 1)  # sequence 0 missed all 3 blocks
    _step(cache, 1, [*prompt, 99], 8, 12)  # continues: its block 3 ends here, a snapshot for that hash
    assert _state(cache, 1) == sum(prompt[:12]) and cache.num_snapshots == 2
    assert cache.start_sequence(2, prompt) == 12 and _state(cache, 2) == sum(prompt[:12])
    for seq in (0, 1, 2):
        cache.release(seq)
    assert cache.all_free()


def _two_blocks(cache: PagedKVCache, seq: int, prompt: list[int]) -> None:
    cache.start_sequence(seq, prompt)
    _step(cache, seq, prompt, 0, 4)
    _step(cache, seq, prompt, 4, 8)
    cache.release(seq)


def test_snapshots_go_least_recently_used_first_when_the_pool_is_full() -> None:
    cache = _cache(num_blocks=4, state_snapshots=2)
    a, b = [1] * 9, [2] * 9
    _two_blocks(cache, 0, a)
    _two_blocks(cache, 1, b)  # its two snapshots push a's out
    assert cache.num_snapshots == 2 and cache.snapshots is not None and cache.snapshots.evicted == 2
    assert cache.groups[None].pool.peek(chain_hashes(a[:8], 4)) == 2, "a's blocks are still cached"
    assert cache.cached_prefix_tokens(a) == 0 and cache.cached_prefix_tokens(b) == 8
    assert cache.start_sequence(2, a) == 0, "no snapshot: a miss, computed from zero state"
    assert _state(cache, 2) == 0
    cache.release(2)
    assert cache.all_free()


def test_snapshots_go_with_their_blocks() -> None:
    cache = _cache(num_blocks=4, state_snapshots=4)
    a, b, c = [1] * 9, [2] * 9, [3] * 9
    _two_blocks(cache, 0, a)
    _two_blocks(cache, 1, b)
    assert cache.num_snapshots == 4 and cache.cached_prefix_tokens(a) == 8
    _two_blocks(cache, 2, c)  # takes the least recently used cached blocks, a's: their snapshots go with them
    assert cache.snapshots is not None and cache.snapshots.evicted == 0 and cache.num_snapshots == 4
    assert cache.cached_prefix_tokens(a) == 0 and a[:8] != b[:8]
    assert cache.cached_prefix_tokens(b) == 8 and cache.cached_prefix_tokens(c) == 8
    assert cache.all_free()
    cache.groups[None].pool.reset_prefix_cache()
    assert cache.num_snapshots == 0 and cache.all_free()


def test_a_layer_that_sat_the_step_out_leaves_no_snapshot() -> None:
    cache = _cache(num_blocks=8)
    prompt = list(range(1, 10))
    cache.start_sequence(0, prompt)
    cache.schedule([0], [4])
    kv = torch.ones(4, 1, 2)
    cache.append(1, kv, kv)  # the recurrent layer does not write this step
    cache.cache_prefix(0, prompt)
    assert cache.num_snapshots == 0 and cache.cached_prefix_tokens(prompt) == 0
    cache.release(0)
    assert cache.all_free()


def test_snapshots_come_out_of_a_byte_budget() -> None:
    each = (2 + 6) * 4  # conv (2,) + ssm (2, 3), fp32
    per_block = 4 * 1 * (2 + 2) * 4  # bs 4, one head, key and value dim 2, fp32
    cache = _cache(memory_bytes=3 * each + 5 * per_block, state_snapshots=3)
    assert cache.num_blocks == 5 and cache.snapshots is not None and cache.snapshots.count == 3
    with pytest.raises(UserError, match="state snapshots") as info:
        _cache(memory_bytes=3 * each + per_block - 1, state_snapshots=3)
    assert "\n" not in str(info.value)
    assert _cache(memory_bytes=5 * per_block, state_snapshots=0).num_blocks == 5


def test_bad_snapshot_count_is_one_line() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(UserError, match="state_snapshots") as info:
            _cache(num_blocks=4, state_snapshots=bad)
        assert "\n" not in str(info.value)


class _SumModel(torch.nn.Module):
    """A one-layer recurrent 'model': the next token is the running token sum mod 7 (state in the cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def cache_specs(self) -> dict[int, object]:
        return {0: RecurrentStateSpec(states={"sum": ((), torch.float64)}), 1: KV}

    def forward(self, tokens: torch.Tensor, ctx: object) -> torch.Tensor:
        cache, cu = ctx.kv_cache, ctx.cu_seqlens.tolist()  # type: ignore[attr-defined]
        state = cache.recurrent_state(0)["sum"]  # (S,)
        sums = torch.stack([state[i] + tokens[0, cu[i] : cu[i + 1]].double().sum() for i in range(len(cu) - 1)])
        cache.set_recurrent_state(0, {"sum": sums})
        kv = tokens[0].float()[:, None, None].expand(-1, 1, 2).contiguous()
        cache.append(1, kv, kv)
        return torch.nn.functional.one_hot(sums.long() % 7, 7).float()[None]  # (1, S, V)


def test_engine_cuts_prefill_chunks_at_block_boundaries_and_hits() -> None:
    from mcore_inference.sampling import SamplingParams

    params = SamplingParams(max_tokens=3, temperature=0.0)
    prompt = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5]  # 11 tokens
    expected = []
    total = sum(prompt)
    for _ in range(3):
        expected.append(total % 7)
        total += total % 7

    def run(engine: LLMEngine) -> list[int]:
        request = engine.add_request(prompt, params)
        out: list[int] = []
        while engine.has_unfinished():
            out += [t for o in engine.step() if o.request_id == request for t in o.new_token_ids]
        return out

    engine = LLMEngine(_SumModel(), block_size=4, num_blocks=16, max_num_batched_tokens=7)
    assert engine.scheduler.align_prefill
    assert run(engine) == expected
    # chunks: 0..4 (budget 7 cut to the boundary at 4), 4..8, 8..11, then decodes
    assert engine.num_steps == 3 + 2 and engine.cache.num_snapshots >= 2
    assert run(engine) == expected and engine.cache.prefix_hits == 2
    assert engine.cache.all_free()
