"""Prompt logprobs (``SamplingParams.prompt_logprobs``): each prompt token's logprob under the full-sequence forward,
whatever the chunking, batching, preemption or prefix cache (a request asking for them never reuses cached blocks)."""

from __future__ import annotations

import pytest
import torch
from mcore_inference.engine import LLMEngine, RequestOutput
from mcore_inference.sampling import SamplingParams
from toy_model import ToyLM

from mcore.errors import UserError


def _prompts(seed: int, lengths: list[int], vocab: int = 50) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _finish(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
    ids = [engine.add_request(p, q) for p, q in zip(prompts, params)]
    done: dict[int, RequestOutput] = {}
    for _ in range(500):
        done |= {out.request_id: out for out in engine.step() if out.finished}
        if len(done) == len(ids):
            break
    assert engine.cache.all_free()
    return [done[i] for i in ids]


def _close(got: list[float] | None, want: list[float]) -> None:
    """Relative error under 1e-5 (the engine scores in fp32; the reference in float64)."""
    assert got is not None and len(got) == len(want)
    if not want:
        return
    a, b = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
    assert bool(torch.isfinite(a).all()) and float((a - b).norm() / b.norm()) < 1e-5


def _expected(model: ToyLM, prompt: list[int], n: int) -> tuple[list[float], list[dict[int, float]]]:
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt]))[0].double(), dim=-1)  # (T, V)
    chosen = [float(logprobs[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    top = logprobs[:-1].topk(n, dim=-1) if n else None
    tops = [dict(zip(top.indices[i].tolist(), top.values[i].tolist())) if top else {} for i in range(len(prompt) - 1)]
    return chosen, tops


@pytest.mark.parametrize("budget", [512, 5])
def test_prompt_logprobs_equal_the_full_forward(budget: int) -> None:
    model = ToyLM()
    prompts = _prompts(3, [13, 1, 22, 6])
    asks = [SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=n) for n in (2, 0, 4, None)]
    engine = LLMEngine(model, block_size=4, num_blocks=64, max_num_batched_tokens=budget)
    outs = _finish(engine, prompts, asks)
    for prompt, ask, out in zip(prompts, asks, outs):
        if ask.prompt_logprobs is None:
            assert out.prompt_logprobs is None and out.prompt_top_logprobs is None
            continue
        chosen, tops = _expected(model, prompt, ask.prompt_logprobs)
        assert out.prompt_logprobs is not None and out.prompt_top_logprobs is not None
        assert len(out.prompt_logprobs) == len(prompt) - 1
        _close(out.prompt_logprobs, chosen)
        for got, want in zip(out.prompt_top_logprobs, tops):
            assert list(got) == list(want)  # same tokens, best first
            _close(list(got.values()), list(want.values()))


def test_prompt_logprobs_skip_prefix_hits_and_survive_preemption() -> None:
    model = ToyLM()
    prompt = _prompts(4, [24])[0]
    ask = SamplingParams(max_tokens=8, temperature=0.0, prompt_logprobs=1)
    engine = LLMEngine(model, block_size=4, num_blocks=64)
    _finish(engine, [prompt], [SamplingParams(max_tokens=2, temperature=0.0)])  # caches the prompt's blocks
    (again,) = _finish(engine, [prompt], [ask])
    chosen, _ = _expected(model, prompt, 1)
    _close(again.prompt_logprobs, chosen)
    tight = LLMEngine(model, block_size=4, num_blocks=14, max_num_batched_tokens=8)  # forces preemptions
    outs = _finish(tight, _prompts(5, [20, 20, 20]), [ask] * 3)
    assert tight.scheduler.num_preemptions > 0
    for prompt_i, out in zip(_prompts(5, [20, 20, 20]), outs):
        chosen, _ = _expected(model, prompt_i, 1)
        assert len(out.prompt_logprobs or []) == len(prompt_i) - 1  # scored once, not again after a preemption
        _close(out.prompt_logprobs, chosen)


def test_prompt_logprobs_out_of_range_is_refused() -> None:
    with pytest.raises(UserError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


def test_prompt_logprobs_beside_speculating_requests() -> None:
    """A request scoring its prompt shares steps with requests that draft and verify (speculative decoding): its
    prompt logprobs are the full forward's and the drafting requests' tokens are the plain engine's."""
    from test_speculative_engine import VOCAB, ToyMTPLM

    model = ToyMTPLM(depths=1, good=True)
    prompts = _prompts(6, [9, 14, 11], vocab=VOCAB)
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    scored = SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=1)
    asks = [greedy, scored, greedy]
    plain = _finish(LLMEngine(model, block_size=4, num_blocks=64, max_num_batched_tokens=16), prompts, asks)
    engine = LLMEngine(model, block_size=4, num_blocks=64, max_num_batched_tokens=16, speculative_tokens=2)
    ids = [engine.add_request(prompts[0], greedy)]
    engine.step()  # the first request decodes (and drafts) while the others prefill
    ids += [engine.add_request(p, q) for p, q in zip(prompts[1:], asks[1:])]
    done: dict[int, RequestOutput] = {}
    for _ in range(200):
        done |= {out.request_id: out for out in engine.step() if out.finished}
        if len(done) == len(ids):
            break
    outs = [done[i] for i in ids]
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    chosen, _ = _expected(model, prompts[1], 1)
    _close(outs[1].prompt_logprobs, chosen)
    stats = engine.spec_stats()
    assert stats is not None and sum(stats.proposed) > 0 and sum(stats.accepted) > 0  # drafting really happened
    assert engine.cache.all_free()
