"""Prompt logprobs (``SamplingParams.prompt_logprobs``): each prompt token's logprob under the full-sequence forward,
whatever the chunking, batching, preemption or prefix cache (a request asking for them never reuses cached blocks)."""

from __future__ import annotations

import copy

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


class Expected:
    """A prompt's reference logprobs: values from a float64 copy of the model, tokens (top-n, best first) from the
    fp32 model the engine runs, and ``bound``: twice the fp32 model's own error on this prompt (its full-sequence
    fp32 logprobs against the float64 ones, largest absolute difference). The engine runs the same fp32 weights in
    other chunks and batches, so its error is of the same size; the toy model's logits reach ~4e4, where fp32
    rounding alone moves a logprob by ~1e-2, and a fixed relative tolerance would test the CPU's BLAS kernels."""

    def __init__(self, model: ToyLM, prompt: list[int], n: int) -> None:
        tokens = torch.tensor([prompt])
        with torch.no_grad():
            fp32 = torch.log_softmax(model(tokens)[0].double(), dim=-1)  # (T, V)
            exact = torch.log_softmax(copy.deepcopy(model).double()(tokens)[0], dim=-1)  # (T, V)
        self.bound = 2.0 * float((fp32 - exact).abs().max()) + 1e-9
        self.chosen = [float(exact[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
        top = fp32[:-1].topk(n, dim=-1).indices if n else None
        self.tops = [
            {int(j): float(exact[i, j]) for j in top[i]} if top is not None else {} for i in range(len(prompt) - 1)
        ]

    def check(self, got: list[float] | None, want: list[float]) -> None:
        """``got`` finite and within ``bound`` of ``want``, element by element."""
        assert got is not None and len(got) == len(want)
        a, b = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
        assert bool(torch.isfinite(a).all())
        if want:
            assert float((a - b).abs().max()) <= self.bound, (float((a - b).abs().max()), self.bound)


def _expected(model: ToyLM, prompt: list[int], n: int) -> Expected:
    return Expected(model, prompt, n)


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
        expected = _expected(model, prompt, ask.prompt_logprobs)
        assert out.prompt_logprobs is not None and out.prompt_top_logprobs is not None
        assert len(out.prompt_logprobs) == len(prompt) - 1
        expected.check(out.prompt_logprobs, expected.chosen)
        for got, want in zip(out.prompt_top_logprobs, expected.tops):
            assert list(got) == list(want)  # same tokens, best first
            expected.check(list(got.values()), list(want.values()))


def test_prompt_logprobs_skip_prefix_hits_and_survive_preemption() -> None:
    model = ToyLM()
    prompt = _prompts(4, [24])[0]
    ask = SamplingParams(max_tokens=8, temperature=0.0, prompt_logprobs=1)
    engine = LLMEngine(model, block_size=4, num_blocks=64)
    _finish(engine, [prompt], [SamplingParams(max_tokens=2, temperature=0.0)])  # caches the prompt's blocks
    (again,) = _finish(engine, [prompt], [ask])
    expected = _expected(model, prompt, 1)
    expected.check(again.prompt_logprobs, expected.chosen)
    tight = LLMEngine(model, block_size=4, num_blocks=14, max_num_batched_tokens=8)  # forces preemptions
    outs = _finish(tight, _prompts(5, [20, 20, 20]), [ask] * 3)
    assert tight.scheduler.num_preemptions > 0
    for prompt_i, out in zip(_prompts(5, [20, 20, 20]), outs):
        expected = _expected(model, prompt_i, 1)
        assert len(out.prompt_logprobs or []) == len(prompt_i) - 1  # scored once, not again after a preemption
        expected.check(out.prompt_logprobs, expected.chosen)


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
    expected = _expected(model, prompts[1], 1)
    expected.check(outs[1].prompt_logprobs, expected.chosen)
    stats = engine.spec_stats()
    assert stats is not None and sum(stats.proposed) > 0 and sum(stats.accepted) > 0  # drafting really happened
    assert engine.cache.all_free()
