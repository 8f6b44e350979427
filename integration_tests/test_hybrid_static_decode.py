"""Static-shape decode steps (what CUDA graphs capture) of hybrid ``gpt`` models in the inference engine: mcore-ssm's
``gdn`` and ``mamba2`` layers beside attention, and a Nemotron-H-style stack (``test_hybrid_inference.MODELS``), CPU,
fp32.

Greedy tokens of ``LLMEngine(static_decode=True)`` equal the eager engine's and the full forward's argmax under
ragged arrivals, chunked prefill, preemption, prefix-cache hits from recurrent-state snapshots and several padded
sizes; every block and state slot is free after each run. A static step gives the eager step's logits and states,
and its padding rows write only the cache's scratch block and scratch state slot. The static decode forward traces
as one graph (no host sync, no data-dependent shape); overlapped decode gives the plain static tokens; rollback
after a static step and static speculative steps on recurrent caches are refused in one line. On CUDA (``gpu``):
graph-replayed tokens equal the eager static ones in bf16, and ``LLM`` turns graphs on for hybrid models.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from engine_helpers import greedy_reference, run_arrivals
from mcore_inference.cache import PagedKVCache
from mcore_inference.engine import LLMEngine
from mcore_inference.sampling import SamplingParams
from mcore_inference.static_decode import checked_sizes, static_decode_supported
from test_hybrid_inference import COMMON, MODELS, hybrid_model

from mcore.errors import UserError
from mcore_models.gpt import GPT
from mcore_testing.numerics import rel_error

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
STATIC: dict[str, Any] = {"static_decode": True, "graph_batch_sizes": (1, 2, 4)}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> GPT:
    return hybrid_model(request.param)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, COMMON["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _recurrent(engine: LLMEngine) -> dict[int, Any]:
    return {i: x for i, x in engine.cache.layers.items() if type(x).__name__ == "_RecurrentLayer"}


def _states(engine: LLMEngine) -> dict[tuple[int, str], torch.Tensor]:
    """Every recurrent layer's state pools, copied: ``{(layer, name): (slots, *shape)}``."""
    return {(i, n): p.clone() for i, x in _recurrent(engine).items() for n, p in x.slots_pool.items()}


@pytest.mark.usefixtures("one_thread")
def test_static_decode_tokens_equal_eager_and_full_forward(model: GPT) -> None:
    """Ragged arrivals, prefill chunked to 9 tokens a step, decode padded to 1, 2 or 4 rows (more run eagerly); a
    cache short of blocks (preemption: the recomputed prompt starts from zero states); one padded size of 8."""
    prompts = [_tokens(n, seed) for seed, n in enumerate((7, 19, 1, 12, 5))]
    arrive = [0, 0, 1, 3, 3]
    want = [greedy_reference(model, p, GREEDY.max_tokens) for p in prompts]
    eager = LLMEngine(model, block_size=4, num_blocks=48, max_num_batched_tokens=9)
    assert run_arrivals(eager, prompts, arrive, GREEDY) == want
    static = LLMEngine(model, block_size=4, num_blocks=48, max_num_batched_tokens=9, **STATIC)
    assert static.cache.scratch_state == static.cache.max_seqs
    assert run_arrivals(static, prompts, arrive, GREEDY) == want
    assert static.decoder is not None and static.decoder.num_static >= 5
    tight = LLMEngine(model, block_size=4, num_blocks=9, max_num_batched_tokens=64, static_decode=True)
    assert run_arrivals(tight, prompts, [0, 0, 0, 0, 0], GREEDY) == want
    assert tight.scheduler.num_preemptions > 0 and tight.decoder is not None and tight.decoder.num_static > 0
    wide = LLMEngine(model, block_size=4, num_blocks=48, static_decode=True, graph_batch_sizes=(8,))
    assert run_arrivals(wide, prompts, arrive, GREEDY) == want
    assert wide.decoder is not None and wide.decoder.num_static >= 5


@pytest.mark.usefixtures("one_thread")
def test_static_decode_with_prefix_hits_from_state_snapshots(model: GPT) -> None:
    """The first request (15 tokens) decodes statically across a block boundary: its snapshot at 16 tokens is taken
    after a static step. A second request shares its 3-block prompt prefix (the snapshot of the aligned prefill), a
    third its first 16 tokens and more (the static step's snapshot): 3 + 4 hits, the reference's tokens."""
    shared = _tokens(12, 1)
    first, second = shared + _tokens(3, 2), shared + _tokens(5, 3)
    first_out = greedy_reference(model, first, GREEDY.max_tokens)
    third = first + first_out[:3]  # 18 tokens: 4 full blocks of the first sequence are looked up
    prompts = [first, second, third]
    want = [first_out, *(greedy_reference(model, p, GREEDY.max_tokens) for p in (second, third))]
    engine = LLMEngine(model, block_size=4, num_blocks=32, **STATIC)
    assert engine.cache.prefix_caching and engine.cache.snapshots is not None
    assert run_arrivals(engine, prompts, [0, 10, 20], GREEDY) == want
    assert engine.cache.prefix_hits == 7 and engine.decoder is not None and engine.decoder.num_static >= 10


@pytest.mark.usefixtures("one_thread")
def test_static_step_gives_the_eager_logits_and_states_and_padding_touches_only_scratch(model: GPT) -> None:
    """Decode steps of three sequences run in lockstep eagerly and statically (padded to 8 rows): the same logits and
    the same states in the sequences' slots; every other state slot but the scratch one, and every block but the
    scratch block, stays as it was."""
    prompts = [_tokens(n, 10 + n) for n in (3, 8, 13)]
    eager = LLMEngine(model, block_size=4, num_blocks=48)
    static = LLMEngine(model, block_size=4, num_blocks=48, static_decode=True, graph_batch_sizes=(2, 8))
    for engine in (eager, static):
        for prompt in prompts:
            engine.add_request(prompt, GREEDY)
        engine.step()  # one prefill step (eager) of every prompt
    decoder, cache = static.decoder, static.cache
    assert decoder is not None and cache.scratch_block == 48 and cache.scratch_state is not None
    scratch = cache.scratch_state
    for _ in range(3):
        seqs = list(eager.scheduler.running)
        ids, tokens = [s.seq_id for s in seqs], [s.token_ids[-1] for s in seqs]
        positions = [len(s.token_ids) - 1 for s in seqs]
        for engine in (eager, static):
            engine.cache.schedule(ids, [1] * len(ids))
        before = _states(static)
        pages = {i: x.key_pages.clone() for i, x in cache.layers.items() if hasattr(x, "key_pages")}
        want = eager._forward(tokens, positions, [1] * len(ids))[0]
        got = decoder.run(tokens)
        assert torch.isfinite(got).all() and rel_error(got, want) < 1e-5
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        owned = {cache._slots[s] for s in ids}
        assert owned == {eager.cache._slots[s] for s in ids}
        after = _states(static)
        for (index, name), pool in after.items():
            eager_pool = eager.cache.layers[index].slots_pool[name]  # type: ignore[union-attr]
            for slot in owned:
                assert rel_error(pool[slot], eager_pool[slot]) < 1e-5, (index, name, slot)
            untouched = [s for s in range(pool.shape[0]) if s not in owned and s != scratch]
            assert torch.equal(pool[untouched], before[index, name][untouched]), "padding wrote a real state slot"
            assert not torch.equal(pool[scratch], before[index, name][scratch]), "padding rows wrote no scratch state"
        for index, old in pages.items():
            changed = (cache.layers[index].key_pages != old).flatten(2).any(-1).nonzero().tolist()  # type: ignore[union-attr]
            assert len({(b, o) for b, o in changed if b != 48}) <= len(ids), "padding rows wrote real pages"
        chosen = dict(zip(ids, want.argmax(-1).tolist()))
        for engine in (eager, static):  # the step's tokens join both engines' sequences
            for seq in engine.scheduler.running:
                seq.token_ids.append(chosen[seq.seq_id])
                seq.num_computed += 1
    assert decoder.num_static == 3 and decoder.num_replays == 0


@pytest.mark.usefixtures("one_thread")
def test_static_hybrid_decode_step_traces_as_one_graph(model: GPT) -> None:
    """No host sync and no data-dependent shape in the static decode step of a hybrid model: dynamo traces it
    whole (the recurrent layers gather and write their states by the step's device slot index)."""
    engine = LLMEngine(model, block_size=4, num_blocks=32, static_decode=True, graph_batch_sizes=(4,))
    decoder = engine.decoder
    assert decoder is not None
    step = decoder.buffers.step(4)
    decoder._padding_only(step)  # no step scheduled: padding rows only
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(decoder.forward)(step)
    engine.cache.end_static_decode()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.usefixtures("one_thread")
def test_overlapped_static_decode_of_a_hybrid_model_gives_the_plain_tokens(model: GPT) -> None:
    prompts = [_tokens(n, 30 + n) for n in (5, 14, 1, 9)]
    arrive = [0, 0, 2, 3]
    want = [greedy_reference(model, p, GREEDY.max_tokens) for p in prompts]
    plain = LLMEngine(model, block_size=4, num_blocks=48, **STATIC)
    assert run_arrivals(plain, prompts, arrive, GREEDY) == want
    overlapped = LLMEngine(model, block_size=4, num_blocks=48, overlap_decode=True, **STATIC)
    assert run_arrivals(overlapped, prompts, arrive, GREEDY) == want
    assert overlapped.num_overlapped_steps >= 3


@pytest.mark.usefixtures("one_thread")
def test_rollback_after_a_static_step_and_static_speculation_on_recurrent_caches_are_refused(model: GPT) -> None:
    engine = LLMEngine(model, block_size=4, num_blocks=32, static_decode=True, graph_batch_sizes=(2,))
    engine.add_request(_tokens(3, 40), GREEDY)
    engine.step()  # prefill
    engine.step()  # a static decode step
    assert engine.decoder is not None and engine.decoder.num_static == 1
    (seq,) = engine.scheduler.running
    with pytest.raises(UserError, match=r"^rollback of sequence \d+: layer \d+'s last step was a static decode step"):
        engine.cache.rollback(seq.seq_id, 1)
    with pytest.raises(UserError, match="static speculative steps / CUDA graphs need caches without recurrent"):
        checked_sizes([2], [engine.cache], False, "static speculative steps / CUDA graphs")
    step = engine.decoder.buffers.step(2)
    with pytest.raises(UserError, match="one token per row"):
        engine.cache.begin_static_decode(type(step)(**{**step.__dict__, "queries": 2}))


def test_a_second_engine_on_the_model_leaves_the_weights_where_the_first_captured_them(model: GPT) -> None:
    """Each engine packs the model's jointly projected weights; packing again must not move them: a first engine's
    CUDA graphs read them by address (the GPU test's graphs-vs-eager engines, and bench_decode's two engines on
    one model, replayed over freed weights when the second engine repacked)."""
    LLMEngine(model, block_size=4, num_blocks=16, **STATIC)
    where = {name: p.data_ptr() for name, p in model.named_parameters()}
    LLMEngine(model, block_size=4, num_blocks=16, **STATIC)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == where


def test_hybrid_specs_support_static_decode(model: GPT) -> None:
    specs = {i: x.spec for i, x in LLMEngine(model, block_size=4, num_blocks=8).cache.layers.items()}
    assert static_decode_supported(specs)
    recurrent = {i: s for i, s in specs.items() if type(s).__name__ == "RecurrentStateSpec"}
    assert recurrent and not static_decode_supported(recurrent)  # no attention group
    assert not PagedKVCache(specs, block_size=4, num_blocks=8).static_decode_ok  # no scratch block


def _first_difference(got: list[list[int]], want: list[list[int]]) -> str:
    """Which prompt's tokens differ first, and where: a GPU failure read from one line of the log."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g != w:
            at = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            return f"prompt {i}: token {at} differs: got {g} want {w}"
    return "equal"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", sorted(MODELS))
def test_hybrid_cuda_graph_tokens_equal_eager_static_tokens(name: str) -> None:
    """bf16 on CUDA: graphs captured per padded size replay the tokens of the same static steps run eagerly;
    ``LLM`` captures them for the hybrid model by default (``cuda_graphs=False`` keeps them off)."""
    from mcore_inference.llm import LLM

    model = hybrid_model(name).to(device="cuda", dtype=torch.bfloat16)
    prompts = [_tokens(n, 50 + n) for n in (5, 40, 1, 17, 33, 2)]
    arrive = [0, 0, 1, 3, 3, 8]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    kwargs: dict[str, Any] = {
        "block_size": 16,
        "num_blocks": 64,
        "max_num_batched_tokens": 64,
        "graph_batch_sizes": (1, 2, 4, 8),
        "max_model_len": 256,
    }
    graphs = LLMEngine(model, cuda_graphs=True, **kwargs)
    eager = LLMEngine(model, static_decode=True, **kwargs)
    want = run_arrivals(eager, prompts, arrive, params)
    got = run_arrivals(graphs, prompts, arrive, params)
    assert got == want, f"graphs vs eager static steps:\n{_first_difference(got, want)}"
    assert graphs.decoder is not None and graphs.decoder.num_replays >= 5
    assert eager.decoder is not None and eager.decoder.num_replays == 0 and eager.decoder.num_static >= 5
    overlapped = LLMEngine(model, cuda_graphs=True, overlap_decode=True, **kwargs)
    got = run_arrivals(overlapped, prompts, arrive, params)
    assert got == want, f"overlapped graphs vs eager static steps:\n{_first_difference(got, want)}"
    # LLM schedules with its own defaults (a 2048-token budget: every prompt prefilled in one step, prefix caching,
    # overlapped decode): its eager twin is an engine with the same settings stepping statically without graphs
    llm_settings: dict[str, Any] = {"block_size": 16, "num_blocks": 64, "max_model_len": 256}
    llm = LLM(model, **llm_settings)  # graphs by default
    assert llm.engine.decoder is not None and llm.engine.decoder.cuda_graphs
    twin = LLMEngine(model, static_decode=True, max_num_batched_tokens=2048, enable_prefix_caching=True, **llm_settings)
    got = [c.token_ids for c in llm.generate(prompts, params)]
    want = run_arrivals(twin, prompts, [0] * len(prompts), params)
    assert got == want, f"LLM(cuda_graphs=True) vs its eager static twin:\n{_first_difference(got, want)}"
    off = LLM(model, block_size=16, num_blocks=64, max_model_len=256, cuda_graphs=False)
    assert off.engine.decoder is None
