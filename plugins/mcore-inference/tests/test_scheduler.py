"""The scheduler without a model: token budget, decodes first, FIFO admission, chunked prefill, preemption by
recompute (latest admitted first, back to the front of the queue) and prefix hits skipping prefill."""

from __future__ import annotations

import torch
from mcore_inference.cache import PagedKVCache
from mcore_inference.scheduler import Scheduler, SchedulerOutput, SequenceState

from mcore.protocols import AttentionCacheSpec

SPEC = AttentionCacheSpec(kv_heads=1, head_dim=2, value_dim=2, dtype=torch.float32)


def _scheduler(num_blocks: int = 32, budget: int = 8, max_seqs: int = 4) -> Scheduler:
    cache = PagedKVCache({0: SPEC}, block_size=4, num_blocks=num_blocks)
    return Scheduler(cache, max_num_seqs=max_seqs, max_num_batched_tokens=budget)


def _run_step(sched: Scheduler) -> SchedulerOutput:
    """What the engine does around the model: schedule, append, count the tokens, add a token when caught up."""
    out = sched.schedule()
    if out.sequences:
        sched.cache.schedule([s.seq_id for s in out.sequences], out.num_tokens)
        n = out.total_tokens
        sched.cache.append(0, torch.zeros(n, 1, 2), torch.zeros(n, 1, 2))
    for seq, count in zip(out.sequences, out.num_tokens):
        seq.num_computed += count
        if seq.num_pending == 0:
            seq.token_ids.append(7)
        sched.cache.cache_prefix(seq.seq_id, seq.token_ids)
    return out


def _plan(out: SchedulerOutput) -> list[tuple[int, int]]:
    return [(s.seq_id, n) for s, n in zip(out.sequences, out.num_tokens)]


def test_budget_decodes_first_then_chunked_prefill_in_fifo_order() -> None:
    sched = _scheduler(budget=8)
    a, b, c = SequenceState(0, [1] * 5), SequenceState(1, [2] * 10), SequenceState(2, [3] * 3)
    for seq in (a, b, c):
        sched.add(seq)
    assert _plan(_run_step(sched)) == [(0, 5), (1, 3)], "a's prompt, then b's first chunk fill the budget"
    assert _plan(_run_step(sched)) == [(0, 1), (1, 7)], "a decodes first, then b's prefill"
    assert _plan(_run_step(sched)) == [(0, 1), (1, 1), (2, 3)]
    assert [s.seq_id for s in sched.running] == [0, 1, 2] and not sched.waiting


def test_max_num_seqs_holds_back_admission() -> None:
    sched = _scheduler(budget=64, max_seqs=2)
    for i in range(3):
        sched.add(SequenceState(i, [i] * 4))
    assert _plan(_run_step(sched)) == [(0, 4), (1, 4)]
    sched.finish(sched.running[0])
    assert _plan(_run_step(sched)) == [(1, 1), (2, 4)]
    for seq in list(sched.running):
        sched.finish(seq)
    assert sched.cache.all_free() and not sched.has_unfinished()


def test_preemption_sends_the_latest_admitted_to_the_front_and_it_recomputes() -> None:
    sched = _scheduler(num_blocks=4, budget=64)  # 16 tokens in all
    a, b, c = SequenceState(0, [1] * 4), SequenceState(1, [2] * 4), SequenceState(2, [3] * 4)
    for seq in (a, b, c):
        sched.add(seq)
    _run_step(sched)  # three prompts of one block each
    d = SequenceState(3, [4] * 3)
    sched.add(d)
    out = _run_step(sched)  # each decode crosses into a new block: 3 needed, 1 free; c's block makes 2
    assert [s.seq_id for s in out.preempted] == [2], "the latest admitted goes"
    assert _plan(out) == [(0, 1), (1, 1)], "nothing new is admitted in a step that preempts"
    assert [s.seq_id for s in sched.waiting] == [2, 3], "the preempted sequence goes ahead of later arrivals"
    assert c.num_computed == 0 and c.token_ids == [3] * 4 + [7], "prompt and generated tokens are recomputed"
    assert sched.num_preemptions == 1
    out = _run_step(sched)  # a and b decode inside their blocks; no block is free for c: it waits (FIFO: d too)
    assert _plan(out) == [(0, 1), (1, 1)] and [s.seq_id for s in sched.waiting] == [2, 3]
    while sched.has_unfinished():  # finish sequences as they reach 8 tokens: everything drains
        _run_step(sched)
        for seq in list(sched.running):
            if len(seq.token_ids) >= 8:
                sched.finish(seq)
    assert sched.cache.all_free()


def test_a_prefix_hit_skips_the_cached_blocks() -> None:
    sched = _scheduler(budget=64)
    first = SequenceState(0, list(range(10)))
    sched.add(first)
    _run_step(sched)
    sched.add(SequenceState(1, [*list(range(9)), 99]))
    assert _plan(_run_step(sched)) == [(0, 1), (1, 2)], "8 of the 10 prompt tokens are cached"
    assert sched.cache.prefix_hits == 2
