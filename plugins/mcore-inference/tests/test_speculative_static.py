"""Static-shape (CUDA-graph) verification and draft steps of speculative decoding (``static_speculative.py``).

On the CPU (fp32, ``static_decode=True``, no graphs): the attention of ``q`` uniform queries per sequence against
the torch reference; the engine with static steps gives the eager speculative engine's tokens and acceptance
counters (greedy, seeded and unseeded sampling with rejection, prefix hits, preemption), and the main cache's real
pages (padding rows write only the scratch block); the static calls trace as one graph each (no host sync, no
data-dependent shape). On the GPU (``gpu``): the captured graphs give the eager static tokens, and a steady-state
step reads the device once (the verdict and the drafts).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from mcore_inference.attention import QUERIES_PER_SEQUENCE, PagedAttention, paged_attention_torch
from mcore_inference.engine import LLMEngine
from mcore_inference.sampling import SamplingParams
from test_speculative_engine import HIDDEN, ToyMTPLM, _prompts, _run, draft_errors
from toy_model import greedy_reference

from mcore.errors import UserError
from mcore.protocols import BlockContext, PagedKV

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _drafter(depths: int) -> ToyMTPLM:
    """The good toy drafter, whose depths also read the previous depth's output (the good toy's projections pass
    only the next token's embedding through, which would leave the hidden-state chain untested)."""
    model = ToyMTPLM(depths, good=True).eval()
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for proj in model.mtp_proj:
            weight: Any = proj.weight
            weight[:, HIDDEN:] = torch.randn(HIDDEN, HIDDEN, generator=gen) * 0.1
    return model


def _engine(model: torch.nn.Module, k: int, **kwargs: Any) -> LLMEngine:
    kwargs = {"block_size": 4, "num_blocks": 64, "max_num_batched_tokens": 64, **kwargs}
    return LLMEngine(model, speculative_tokens=k, **kwargs)


class _Pages:
    """A cache handle that hands out fixed pages (what ``PagedAttention`` reads)."""

    def __init__(self, paged: PagedKV) -> None:
        self.paged = paged

    def gather(self, layer_index: int) -> PagedKV:
        return self.paged


@pytest.mark.parametrize("window", [None, 5])
def test_uniform_queries_take_the_decode_path_and_match_the_reference(window: int | None) -> None:
    gen = torch.Generator().manual_seed(0)
    bs, nkv, group, hd, q_len = 4, 2, 3, 8, 3
    keys, values = torch.randn(12, bs, nkv, hd, generator=gen), torch.randn(12, bs, nkv, hd, generator=gen)
    table = torch.tensor([[3, 7, -1, -1], [9, 0, 5, 2], [4, -1, -1, -1], [11, 6, -1, -1]], dtype=torch.int32)
    lens = torch.tensor([6, 16, 3, 5], dtype=torch.int32)  # the last q_len tokens of each are the step's
    paged = PagedKV(key_cache=keys, value_cache=values, block_table=table, seq_lens=lens, window=window)
    q = torch.randn(1, 4 * q_len, nkv * group, hd, generator=gen)
    cu = torch.arange(5, dtype=torch.int32) * q_len
    pages: Any = _Pages(paged)  # only gather is called
    ctx = BlockContext(cu_seqlens=cu, max_seqlen=q_len, kv_cache=pages, extra={QUERIES_PER_SEQUENCE: q_len})
    got = PagedAttention()(q, q, q, ctx=ctx, scale=0.3, window=window)[0]  # k, v unused: already in the pages
    want = paged_attention_torch(q[0].double(), _double(paged), cu, q_len, hd, 0.3, window)
    err = float((got.double() - want).norm() / want.norm())
    assert err < 1e-5 and got.isfinite().all()
    bad = BlockContext(cu_seqlens=cu, max_seqlen=q_len, kv_cache=pages, extra={QUERIES_PER_SEQUENCE: 2})
    with pytest.raises(UserError, match="queries_per_sequence = 2 but the step has max_seqlen 3"):
        PagedAttention()(q, q, q, ctx=bad, scale=0.3, window=window)


def _double(paged: PagedKV) -> PagedKV:
    assert paged.value_cache is not None
    return PagedKV(
        key_cache=paged.key_cache.double(),
        value_cache=paged.value_cache.double(),
        block_table=paged.block_table,
        seq_lens=paged.seq_lens,
        window=paged.window,
    )


@pytest.mark.parametrize(("depths", "k"), [(1, 2), (2, 3)])
def test_static_greedy_gives_the_eager_tokens_counters_and_pages(depths: int, k: int) -> None:
    model = _drafter(depths)
    prompts = _prompts((6, 17, 1, 9, 3), seed=4)
    prompts.append([*prompts[1][:12], 1, 2])  # a prefix-cache hit of 3 blocks
    arrive = [0, 0, 0, 0, 9, 12]
    greedy = [SamplingParams(max_tokens=24, temperature=0.0)] * len(prompts)
    want = [greedy_reference(model, p, 24) for p in prompts]
    eager = _engine(model, k)
    static = _engine(model, k, static_decode=True, graph_batch_sizes=(1, 2, 4))
    assert _run(eager, prompts, arrive, greedy) == want
    assert _run(static, prompts, arrive, greedy) == want
    assert static.spec_stats() == eager.spec_stats() and static.num_steps == eager.num_steps
    spec = static.speculator
    assert spec is not None and spec.static is not None and static.decoder is None
    assert spec.static.num_verify >= 8 and spec.static.num_draft >= 5 and spec.static.num_replays == 0
    assert static.cache.prefix_hits > 0
    # the same slots hold the same keys/values; padding rows wrote only the scratch block (not compared)
    for index, layer in static.cache.layers.items():
        got, ref = layer.key_pages[: static.cache.num_blocks], eager.cache.layers[index].key_pages  # type: ignore[union-attr]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_static_sampling_with_rejection_gives_the_eager_tokens_and_counters() -> None:
    model = _drafter(2)
    prompts = _prompts((5, 13, 2, 8), seed=9)
    arrive = [0, 0, 0, 6]
    seeded = [
        SamplingParams(max_tokens=20, temperature=0.8, seed=11),
        SamplingParams(max_tokens=20, temperature=1.0, top_k=8, seed=12),
        SamplingParams(max_tokens=20, temperature=0.7, top_p=0.9, min_p=0.02, seed=13),
        SamplingParams(max_tokens=20, temperature=0.0),
    ]
    unseeded = [SamplingParams(max_tokens=20, temperature=0.9)] * 4  # the engine's generator, drawn in one order
    for params in (seeded, unseeded):
        eager = _engine(model, 2, seed=5)
        static = _engine(model, 2, seed=5, static_decode=True, graph_batch_sizes=(2, 4))
        assert _run(static, prompts, arrive, params) == _run(eager, prompts, arrive, params)
        stats = static.spec_stats()
        assert stats == eager.spec_stats() and stats is not None and 0 < sum(stats.accepted) < sum(stats.proposed)
        assert static.speculator is not None and static.speculator.static is not None
        assert static.speculator.static.num_draft >= 5


def test_static_drafts_are_the_float64_full_forward_of_the_depths() -> None:
    model = _drafter(2)
    reference = copy.deepcopy(model).double()
    params = SamplingParams(max_tokens=30, temperature=0.8, seed=5)  # drawn drafts: their distributions compare
    engine = _engine(model, 3, enable_prefix_caching=False, static_decode=True, graph_batch_sizes=(1, 2, 4))
    assert engine.speculator is not None and engine.speculator.static is not None
    for prompt in _prompts((6, 17, 1, 11), seed=1):
        engine.add_request(prompt, params)
    checked, worst = 0, 0.0
    while engine.has_unfinished():
        before = engine.speculator.static.num_draft
        engine.step()
        if engine.speculator.static.num_draft == before:
            continue
        errors = draft_errors(engine, range(4), reference, 2, params.temperature)
        worst, checked = max([worst, *errors]), checked + len(errors)
    assert worst < 1e-5 and checked >= 60, (worst, checked)
    assert engine.speculator.static.num_draft >= 5


def test_static_drafts_are_the_eager_ones_step_by_step_with_prefix_hits() -> None:
    model = _drafter(2)
    params = SamplingParams(max_tokens=30, temperature=0.8, seed=5)
    prompts = _prompts((6, 17, 1, 11), seed=1)
    prompts.append([*prompts[1][:16], 3, 4])  # a prefix-cache hit: its draft caches begin at the hit
    static = _engine(model, 3, static_decode=True, graph_batch_sizes=(1, 2, 4, 8))
    eager = _engine(model, 3)
    assert static.speculator is not None and static.speculator.static is not None and eager.speculator is not None
    checked = 0
    for step in range(60):
        for engine in (static, eager):
            if step == 0:
                for prompt in prompts[:4]:
                    engine.add_request(prompt, params)
            if step == 2:
                engine.add_request(prompts[4], params)
        got, want = static.step(), eager.step()
        assert [(o.request_id, o.token_ids) for o in got] == [(o.request_id, o.token_ids) for o in want], step
        for request_id in range(len(prompts)):
            drafts, _ = static.speculator.drafts(request_id)
            assert drafts == eager.speculator.drafts(request_id)[0], (step, request_id)
            checked += bool(drafts)
    assert not static.has_unfinished() and checked >= 40
    assert static.speculator.static.num_draft >= 5 and static.cache.prefix_hits > 0


def test_static_speculation_with_preemption_matches_full_forward() -> None:
    model = _drafter(1)
    prompts = _prompts((6, 11, 3, 9), seed=2)
    greedy = [SamplingParams(max_tokens=14, temperature=0.0)] * 4
    want = [greedy_reference(model, p, 14) for p in prompts]
    tight = _engine(model, 2, num_blocks=14, static_decode=True, graph_batch_sizes=(4,))
    assert _run(tight, prompts, [0, 0, 0, 0], greedy) == want
    assert tight.scheduler.num_preemptions > 0
    assert tight.speculator is not None and tight.speculator.static is not None
    assert tight.speculator.static.num_verify > 0


def test_static_calls_trace_as_one_graph_each() -> None:
    """What CUDA graphs need, checked on the CPU: the verification and draft calls have no host sync and no
    data-dependent shape, so dynamo traces each whole."""
    engine = _engine(_drafter(2), 2, static_decode=True, graph_batch_sizes=(2,))
    assert engine.speculator is not None and engine.speculator.static is not None
    static = engine.speculator.static
    runners = [(static.verifier, static._verify_call), *((d, d.call) for d in static.depths)]
    for runner, call in runners:
        runner.fill(2, [])  # no step scheduled: padding rows only
        with torch.no_grad():
            explained = torch._dynamo.explain(call)(runner.buffers.step(2))
        runner.cache.end_static_decode()
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        assert explained.graph_count == 1


def test_bad_static_speculation_settings_are_refused() -> None:
    model = _drafter(1)
    with pytest.raises(UserError, match="CUDA"):
        _engine(model, 2, cuda_graphs=True)
    with pytest.raises(UserError, match="graph_batch_sizes"):
        _engine(model, 2, static_decode=True, graph_batch_sizes=(0,))


# ----- GPU -----


def _cuda_model() -> torch.nn.Module:
    return _drafter(2).cuda()


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_give_the_eager_static_tokens_on_gpu() -> None:
    model = _cuda_model()
    prompts = _prompts((5, 30, 1, 17, 9, 2), seed=3)
    arrive = [0, 0, 1, 3, 3, 8]
    for params in (
        [SamplingParams(max_tokens=24, temperature=0.0)] * 6,
        [SamplingParams(max_tokens=24, temperature=0.8, seed=s) for s in range(6)],
    ):
        graphs = _engine(model, 2, cuda_graphs=True, graph_batch_sizes=(1, 2, 4, 8))
        eager = _engine(model, 2, static_decode=True, graph_batch_sizes=(1, 2, 4, 8))
        assert _run(graphs, prompts, arrive, params) == _run(eager, prompts, arrive, params)
        assert graphs.spec_stats() == eager.spec_stats()
        assert graphs.speculator is not None and graphs.speculator.static is not None
        assert graphs.speculator.static.num_replays >= 10


@pytest.mark.gpu
@needs_cuda
def test_a_steady_graph_step_reads_the_device_once() -> None:
    """Once every sequence verifies and drafts with graphs, a step syncs the host once: the read of the accepted
    tokens, next tokens and drafts (``torch.cuda.set_sync_debug_mode`` warns at every synchronising call)."""
    engine = _engine(_cuda_model(), 2, cuda_graphs=True, graph_batch_sizes=(4,))
    spec = engine.speculator
    assert spec is not None and spec.static is not None
    for prompt in _prompts((5, 9, 3, 12), seed=6):
        engine.add_request(prompt, SamplingParams(max_tokens=40, temperature=0.0))
    checked = 0
    for _ in range(12):
        verify, draft = spec.static.num_verify, spec.static.num_draft
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                engine.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        if spec.static.num_verify > verify and spec.static.num_draft > draft:
            assert len(syncs) == 1, [str(w.message) for w in syncs]
            checked += 1
    assert checked >= 3
