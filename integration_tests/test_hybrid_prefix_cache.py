"""Prefix caching for hybrid models (mcore-inference's recurrent-state snapshots) on tiny ``gpt`` models of mcore-ssm's
``gdn`` and ``mamba2`` layers beside attention, and a Nemotron-H-style stack (``test_hybrid_inference.MODELS``), CPU,
fp32.

A cached block holds keys and values; the recurrent layers continue from a snapshot of their states taken when a
sequence's step ended exactly on that block (the scheduler cuts prefill chunks at block boundaries). Greedy output
with prefix caching on equals token-by-token argmax of the full-sequence forward and the engine's output with it
off, for: a second request sharing a 3-block prefix (hit from the deepest block's snapshot), a prefix overlap that
ends inside a block under chunked prefill with a budget that is not a multiple of the block size, a hit lost to
eviction (blocks evicted, or only their snapshots), and preemption with resume. The hit counters show the hits;
every block, state slot and snapshot is free (or belongs to a cached block) after each run.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from engine_helpers import greedy_reference, run_arrivals
from mcore_inference.engine import LLMEngine
from mcore_inference.sampling import SamplingParams
from test_hybrid_inference import COMMON, MODELS, hybrid_model

from mcore_models.gpt import GPT

GREEDY = SamplingParams(max_tokens=5, temperature=0.0)
BS = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> GPT:
    return hybrid_model(request.param)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, COMMON["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _check(model: GPT, prompts: list[list[int]], arrive: list[int], **engine: Any) -> LLMEngine:
    """Run ``prompts`` with prefix caching on and off; both equal the full forward's argmax. The cached engine."""
    want = [greedy_reference(model, p, GREEDY.max_tokens) for p in prompts]
    on = LLMEngine(model, block_size=BS, **engine)
    assert on.cache.prefix_caching and on.cache.snapshots is not None and on.scheduler.align_prefill
    assert run_arrivals(on, prompts, arrive, GREEDY) == want
    off = LLMEngine(model, block_size=BS, enable_prefix_caching=False, **engine)
    assert not off.cache.prefix_caching and off.cache.snapshots is None
    assert run_arrivals(off, prompts, arrive, GREEDY) == want
    return on


def test_a_shared_three_block_prefix_hits_from_its_snapshot(model: GPT) -> None:
    shared = _tokens(12, 1)  # 3 blocks
    first, second = shared + _tokens(3, 2), shared + _tokens(5, 3)
    engine = _check(model, [first, second], [0, 8], num_blocks=32)  # the second arrives after the first finished
    # the first prefill was cut at 12 (its last boundary): one snapshot there, the second request hits all 3 blocks
    assert engine.cache.prefix_hits == 3
    assert engine.num_computed_tokens == len(first) + 4 + len(second) - 12 + 4  # (+4: each one's decode steps)
    assert engine.cache.all_free()


def test_partial_block_overlap_under_chunked_prefill(model: GPT) -> None:
    base = _tokens(17, 4)
    other = base[:10] + _tokens(6, 5)  # shares 2.5 blocks: blocks 1-2 hit, block 3 differs
    engine = _check(model, [base, other], [0, 10], num_blocks=32, max_num_batched_tokens=6)
    # chunks of 6 tokens cut at 4, 8, 12, 16: every block of the first prompt got a snapshot
    assert engine.cache.prefix_hits == 2
    assert engine.cache.num_snapshots >= 4 and engine.cache.all_free()


def test_a_hit_lost_to_eviction_is_a_correct_miss(model: GPT) -> None:
    shared = _tokens(12, 6)
    prompts = [[*shared, 1], _tokens(22, 7), [*shared, 2]]  # the middle one needs every block: evicts the first's
    engine = _check(model, prompts, [0, 8, 16], num_blocks=7)
    assert engine.cache.prefix_hits == 0 and engine.cache.prefix_misses > 0
    few = _check(model, prompts, [0, 8, 16], num_blocks=32, max_num_batched_tokens=6, state_snapshots=2)
    assert few.cache.snapshots is not None and few.cache.snapshots.evicted > 0
    # the shared prefix's blocks stayed cached, but their snapshots went to the middle prompt's: a miss
    assert few.cache.prefix_hits == 0
    assert few.cache.all_free()


def test_preemption_resumes_from_snapshots(model: GPT) -> None:
    shared = _tokens(9, 8)
    prompts = [shared + _tokens(n, 9 + n) for n in (6, 3, 8)]
    engine = _check(model, prompts, [0, 0, 0], num_blocks=9, max_num_batched_tokens=7)
    assert engine.scheduler.num_preemptions > 0
    assert engine.cache.prefix_hits > 0 and engine.cache.all_free()
