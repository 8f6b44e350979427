"""Overlapped decode (``overlap.py``) on the CPU, fp32: every request gets the tokens, logprobs and finish reasons
of plain static decoding (greedy, seeded random, logprobs, stop ids hit mid-run, ``max_tokens`` and the context's
end, arrivals, a full ``max_num_seqs``, preemption, prefix hits, aborts), decode steps do launch before the step
before them is read, and every block is free afterwards."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from mcore_inference.engine import LLMEngine, RequestOutput
from mcore_inference.sampling import SamplingParams
from toy_model import ToyLM, greedy_reference

from mcore.errors import UserError


def _prompts(seed: int, lengths: list[int], vocab: int = 50) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _soft_model(**kwargs: object) -> ToyLM:
    """A toy model whose logits are O(1) (the plain one's are ~1e4: sampling at any temperature is its argmax)."""
    model = ToyLM(**kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        model.head.weight.mul_(1e-4)
    return model


def _engine(model: ToyLM, overlap: bool, **kwargs: object) -> LLMEngine:
    options: dict[str, object] = dict(block_size=4, num_blocks=64, max_num_batched_tokens=64, static_decode=True)
    options.update(kwargs)
    return LLMEngine(model, overlap_decode=overlap, **options)  # type: ignore[arg-type]


def _run(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: list[SamplingParams],
    arrive: list[int],
    abort_at: dict[int, int] | None = None,
) -> dict[int, RequestOutput]:
    """Add request i at step ``arrive[i]`` (abort it at step ``abort_at[i]``); the finished outputs by index."""
    ids: dict[int, int] = {}
    done: dict[int, RequestOutput] = {}
    step = 0
    while len(done) < len(prompts):
        for i, when in enumerate(arrive):
            if when == step:
                ids[engine.add_request(prompts[i], params[i])] = i
        for i, when in (abort_at or {}).items():
            engine_id = next((e for e, j in ids.items() if j == i), None)
            if when == step and engine_id is not None and i not in done:
                out = engine.abort(engine_id)
                if out is not None:
                    done[i] = out
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out
        step += 1
        assert step < 500
    assert not engine.has_unfinished()
    assert engine.cache.all_free()
    return done


def _same(plain: dict[int, RequestOutput], overlapped: dict[int, RequestOutput]) -> None:
    assert plain.keys() == overlapped.keys()
    for i, want in plain.items():
        got = overlapped[i]
        assert got.token_ids == want.token_ids, f"request {i}"
        assert (got.finish_reason, got.stop_reason) == (want.finish_reason, want.stop_reason), f"request {i}"
        if want.logprobs is not None:
            assert got.logprobs is not None and got.top_logprobs is not None and want.top_logprobs is not None
            torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs))
            assert [sorted(t) for t in got.top_logprobs] == [sorted(t) for t in want.top_logprobs]


def _both(
    model: ToyLM, run: Callable[[LLMEngine], dict[int, RequestOutput]], **kwargs: object
) -> tuple[dict[int, RequestOutput], dict[int, RequestOutput], LLMEngine]:
    plain = run(_engine(model, False, **kwargs))
    engine = _engine(model, True, **kwargs)
    return plain, run(engine), engine


def test_overlapped_decode_gives_plain_tokens_logprobs_and_finishes() -> None:
    model = _soft_model()
    prompts = _prompts(1, [5, 17, 1, 9, 4, 11, 6])
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    probe = _run(_engine(model, False), prompts, [greedy] * 7, [0] * 7)
    stop_id = probe[3].token_ids[4]  # request 3 meets it mid-run: the host learns of it a step late
    params = [
        greedy,
        SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=7),
        SamplingParams(max_tokens=15, temperature=0.0, logprobs=3),
        SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_id]),
        SamplingParams(max_tokens=1, temperature=0.0),  # ends on its prefill token
        SamplingParams(max_tokens=14, temperature=1.1, top_k=5, seed=3, logprobs=2),
        SamplingParams(max_tokens=3, temperature=0.0),
    ]
    arrive = [0, 0, 2, 3, 3, 5, 9]
    plain, overlapped, engine = _both(
        model, lambda e: _run(e, prompts, params, arrive), graph_batch_sizes=(1, 2, 4, 8), max_num_seqs=8
    )
    _same(plain, overlapped)
    assert plain[3].finish_reason == "stop" and plain[3].token_ids[-1] == stop_id
    assert len(plain[3].token_ids) < params[3].max_tokens
    assert plain[0].token_ids == greedy_reference(model, prompts[0], 12)
    assert engine.num_overlapped_steps >= 10
    sampled = [t for i in (1, 5) for t in plain[i].token_ids]
    greedy_ids = [t for i in (1, 5) for t in greedy_reference(model, prompts[i], len(plain[i].token_ids))]
    assert sampled != greedy_ids  # the seeded rows really sample (their positions matter)


def test_overlapped_decode_at_the_context_end_with_a_full_batch_preemption_and_prefix_hits() -> None:
    model = ToyLM(max_len=24)
    shared = _prompts(4, [12])[0]
    prompts = [[*shared, 1], [*shared, 2, 3], *_prompts(5, [6, 9, 3, 7])]
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (20, 6, 9, 7, 30, 5)]  # 20, 30: context end
    arrive = [0, 2, 2, 3, 4, 4]

    def run(engine: LLMEngine) -> dict[int, RequestOutput]:
        return _run(engine, prompts, params, arrive)

    for kwargs in (
        dict(max_num_seqs=3, graph_batch_sizes=(1, 2, 4)),  # waiting requests behind a full batch
        dict(num_blocks=12, graph_batch_sizes=(4,)),  # blocks run short: preemption from the complete state
    ):
        plain, overlapped, engine = _both(model, run, **kwargs)
        _same(plain, overlapped)
        assert {plain[0].finish_reason, plain[4].finish_reason} == {"length"}
        assert len(prompts[4]) + len(plain[4].token_ids) == 24  # stopped by the context, not max_tokens
        assert engine.num_overlapped_steps > 0
        for i, prompt in enumerate(prompts):
            assert plain[i].token_ids == greedy_reference(model, prompt, len(plain[i].token_ids)), f"prompt {i}"
        if "num_blocks" in kwargs:
            assert engine.scheduler.num_preemptions > 0
        else:
            assert engine.cache.prefix_hits > 0


def test_an_abort_while_a_step_is_in_flight_drops_its_row_and_frees_its_blocks() -> None:
    model = ToyLM()
    prompts = _prompts(6, [5, 8, 3])
    params = [SamplingParams(max_tokens=20, temperature=0.0)] * 3
    plain = _run(_engine(model, False), prompts, params, [0, 0, 0])
    engine = _engine(model, True)
    done = _run(engine, prompts, params, [0, 0, 0], abort_at={1: 6})
    assert done[1].finish_reason == "abort"
    assert 0 < len(done[1].token_ids) < 20 and done[1].token_ids == plain[1].token_ids[: len(done[1].token_ids)]
    for i in (0, 2):
        assert done[i].token_ids == plain[i].token_ids
    assert engine.num_overlapped_steps > 0


def test_penalised_requests_are_read_before_the_next_step() -> None:
    model = ToyLM()
    prompts = _prompts(7, [4, 6])
    params = [
        SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(max_tokens=10, temperature=0.0),
    ]
    plain, overlapped, engine = _both(model, lambda e: _run(e, prompts, params, [0, 0]))
    _same(plain, overlapped)
    assert engine.num_overlapped_steps == 0  # the penalised request shares every decode step
    solo = _engine(model, True)
    _same(_run(_engine(model, False), prompts[1:], params[1:], [0]), _run(solo, prompts[1:], params[1:], [0]))
    assert solo.num_overlapped_steps > 0


def test_overlap_decode_needs_static_steps_and_no_speculation() -> None:
    with pytest.raises(UserError, match="overlap_decode"):
        LLMEngine(ToyLM(), num_blocks=16, overlap_decode=True)


@pytest.mark.gpu
def test_overlapped_cuda_graph_decode_gives_the_plain_graph_tokens_on_gpu() -> None:
    model = _soft_model().cuda()
    prompts = _prompts(8, [5, 17, 1, 9, 4, 11])
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    probe = _run(_engine(model, False, cuda_graphs=True), prompts, [greedy] * 6, [0] * 6)
    params = [
        greedy,
        SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7),
        SamplingParams(max_tokens=16, temperature=0.0, logprobs=3),
        SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[probe[3].token_ids[5]]),
        SamplingParams(max_tokens=16, temperature=1.1, top_k=5, seed=3),
        SamplingParams(max_tokens=4, temperature=0.0),
    ]
    arrive = [0, 0, 1, 4, 4, 6]
    plain, overlapped, engine = _both(
        model,
        lambda e: _run(e, prompts, params, arrive),
        cuda_graphs=True,
        graph_batch_sizes=(1, 2, 4, 8),
        max_num_seqs=8,
    )
    _same(plain, overlapped)
    assert engine.num_overlapped_steps >= 8 and engine.decoder is not None and engine.decoder.num_replays > 0


def test_llm_overlaps_by_default_only_where_graphs_run() -> None:
    """``LLM(overlap_decode=None)``: on with CUDA graphs (and no speculation), so off on the CPU; ``True`` without graphs
    stays off too (nothing to overlap)."""
    from mcore_inference.llm import LLM

    for overlap in (None, True, False):
        llm = LLM(ToyLM(), device="cpu", block_size=4, num_blocks=16, overlap_decode=overlap)  # type: ignore[arg-type]
        assert not llm.engine.overlap_decode and llm.engine.decoder is None


@pytest.mark.gpu
def test_llm_overlaps_cuda_graph_decode_by_default_on_gpu() -> None:
    from mcore_inference.llm import LLM

    model = _soft_model().cuda()
    options = {"block_size": 4, "num_blocks": 64, "max_model_len": 64, "cuda_graphs": True}
    assert LLM(model, **options).engine.overlap_decode  # type: ignore[arg-type]
    assert not LLM(model, overlap_decode=False, **options).engine.overlap_decode  # type: ignore[arg-type]


@pytest.mark.gpu
def test_a_replay_after_the_model_moved_is_refused_on_gpu() -> None:
    """Graphs read the weights where they were at capture: weights moved after the engine was built (a load that
    assigns ``.data``; ``model.to(dtype)`` does the same) are refused in one line at the next replay instead of
    decoding over freed memory."""
    from mcore.errors import UserError

    model = _soft_model().cuda()
    engine = _engine(model, False, cuda_graphs=True, graph_batch_sizes=(1, 2))
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    _run(engine, _prompts(3, [5]), [greedy], [0])  # replays fine
    for param in model.parameters():
        param.data = param.data.clone()
    with pytest.raises(UserError, match="tensors moved since"):
        _run(engine, _prompts(4, [5]), [greedy], [0])
