"""``logit_bias`` and ``min_tokens`` through ``LLMEngine`` on the CPU, fp32: greedy tokens with a bias are the
full-forward argmax of the biased logits, eagerly, through static decode, overlapped decode and speculative
decoding (eager and static); ``min_tokens`` holds back the end-of-document token, stop ids and stop strings on
every path; a bias on an id past the vocabulary is a one-line error for that request only."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from mcore_inference.engine import LLMEngine, RequestOutput
from mcore_inference.sampling import SamplingParams
from test_speculative_engine import ToyMTPLM
from toy_model import ToyLM

from mcore.data.tokenizer import ByteTokenizer
from mcore.errors import UserError

EOS = 3


def _soft_model(vocab: int = 50) -> ToyLM:
    """A toy model whose logits are O(1) (the plain one's are ~1e4: a bias of 100 would change nothing)."""
    model = ToyLM(vocab=vocab)
    with torch.no_grad():
        model.head.weight.mul_(1e-4)
    return model.eval()


def _prompts(seed: int, lengths: list[int], vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def biased_greedy_reference(
    model: torch.nn.Module, prompt: list[int], params: SamplingParams, eos: int | None = None
) -> list[int]:
    """Token-by-token argmax of the full-sequence forward plus ``params.logit_bias``, the end-of-document token and
    the stop ids at -inf before ``params.min_tokens`` output tokens; stops as the engine does."""
    ids, out = list(prompt), []
    bias = dict(params.logit_bias or ())
    stops = {*params.stop_token_ids, *([eos] if eos is not None and not params.ignore_eos else [])}
    with torch.no_grad():
        while len(out) < params.max_tokens:
            logits = model(torch.tensor([ids]))[0, -1].float()  # (V,)
            for token, value in bias.items():
                logits[token] += value
            if len(out) < params.min_tokens:
                logits[list(stops)] = -math.inf
            token = int(logits.argmax())
            ids.append(token)
            out.append(token)
            if token in stops:
                break
    return out


def _run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
    """Requests added at steps 0, 0, 1, 2, ...; run to the end; the finished outputs in prompt order."""
    ids: dict[int, int] = {}
    done: dict[int, RequestOutput] = {}
    step = 0
    while len(done) < len(prompts):
        for i in range(len(prompts)):
            if max(0, i - 1) == step:
                ids[engine.add_request(prompts[i], params[i])] = i
        done.update({ids[o.request_id]: o for o in engine.step() if o.finished})
        step += 1
        assert step < 400
    assert not engine.has_unfinished() and engine.cache.all_free()
    return [done[i] for i in range(len(prompts))]


_ENGINES: dict[str, Callable[[torch.nn.Module], LLMEngine]] = {
    "eager": lambda m: LLMEngine(m, block_size=4, num_blocks=64, max_num_batched_tokens=16, eos_token_id=EOS),
    "static": lambda m: LLMEngine(m, block_size=4, num_blocks=64, static_decode=True, eos_token_id=EOS),
    "overlap": lambda m: LLMEngine(
        m, block_size=4, num_blocks=64, static_decode=True, overlap_decode=True, eos_token_id=EOS
    ),
}


def _mixed_params(max_tokens: int = 10) -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=max_tokens, temperature=0.0, logit_bias={7: 0.5, 11: 0.4, 20: -1.0}),
        SamplingParams(max_tokens=max_tokens, temperature=0.0),
        SamplingParams(max_tokens=max_tokens, temperature=0.0, logit_bias={30: 100.0}),  # forced every step
        SamplingParams(max_tokens=max_tokens, temperature=0.0, logit_bias={43: -0.5, 23: 0.3, 2: 0.2}, logprobs=2),
    ]


@pytest.mark.parametrize("kind", list(_ENGINES))
def test_greedy_with_a_bias_is_the_biased_full_forward(kind: str) -> None:
    model = _soft_model()
    prompts = _prompts(0, [5, 13, 2, 8], vocab=50)
    params = _mixed_params()
    want = [biased_greedy_reference(model, p, q, EOS) for p, q in zip(prompts, params)]
    unbiased = [biased_greedy_reference(model, p, SamplingParams(max_tokens=10, temperature=0.0), EOS) for p in prompts]
    assert want[0] != unbiased[0] and want[3] != unbiased[3]  # the small biases change the output
    assert want[2] == [30] * 10
    engine = _ENGINES[kind](model)
    outs = _run(engine, prompts, params)
    assert [o.token_ids for o in outs] == want
    if kind == "overlap":
        assert engine.num_overlapped_steps > 0
    eager = _run(_ENGINES["eager"](model), prompts, params)
    lp, lp_eager = outs[3].logprobs, eager[3].logprobs
    assert lp is not None and lp_eager is not None
    torch.testing.assert_close(torch.tensor(lp), torch.tensor(lp_eager), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(_ENGINES))
def test_min_tokens_holds_back_eos_and_stop_ids(kind: str) -> None:
    model = _soft_model()
    prompts = _prompts(1, [6, 3, 9, 4], vocab=50)
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, logit_bias={EOS: 100.0}, min_tokens=5),  # eos at once, but
        SamplingParams(max_tokens=12, temperature=0.0, logit_bias={EOS: 100.0}),
        SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(17,), logit_bias={17: 100.0}, min_tokens=4),
        SamplingParams(max_tokens=12, temperature=0.8, seed=5, logit_bias={EOS: 100.0}, min_tokens=3),
    ]
    outs = _run(_ENGINES[kind](model), prompts, params)
    first, plain, stop, seeded = outs
    assert first.token_ids == biased_greedy_reference(model, prompts[0], params[0], EOS)
    assert len(first.token_ids) == 6 and EOS not in first.token_ids[:5] and first.token_ids[5] == EOS
    assert (first.finish_reason, first.stop_reason) == ("stop", None)
    assert plain.token_ids == [EOS] and plain.finish_reason == "stop"
    assert stop.token_ids == biased_greedy_reference(model, prompts[2], params[2], EOS)
    assert len(stop.token_ids) == 5 and 17 not in stop.token_ids[:4]
    assert (stop.finish_reason, stop.stop_reason) == ("stop", 17)
    assert len(seeded.token_ids) == 4 and EOS not in seeded.token_ids[:3] and seeded.token_ids[3] == EOS
    eager = _run(_ENGINES["eager"](model), prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in eager]


def test_overlap_with_min_tokens_reads_first_until_reached_then_overlaps() -> None:
    model = _soft_model()
    prompts = _prompts(2, [4, 7], vocab=50)
    params = [SamplingParams(max_tokens=16, temperature=0.0, logit_bias={EOS: 100.0}, min_tokens=8)] * 2
    engine = _ENGINES["overlap"](model)
    outs = _run(engine, prompts, params)
    assert [len(o.token_ids) for o in outs] == [9, 9] and all(o.token_ids[8] == EOS for o in outs)
    assert [o.token_ids for o in outs] == [biased_greedy_reference(model, p, params[0], EOS) for p in prompts]
    assert engine.num_overlapped_steps > 0


def test_a_stop_string_is_not_honoured_before_min_tokens() -> None:
    model = _soft_model(vocab=257)
    x = ord("x")
    engine = LLMEngine(model, tokenizer=ByteTokenizer(), block_size=4, num_blocks=64)
    forced = SamplingParams(max_tokens=10, temperature=0.0, logit_bias={x: 100.0}, stop=["xx"])
    early = _run(engine, [[104, 105]], [forced])[0]
    assert (early.text, early.finish_reason, early.stop_reason) == ("", "stop", "xx")
    late = _run(engine, [[104, 105]], [SamplingParams(**{**_fields(forced), "min_tokens": 3})])[0]
    assert (late.text, late.finish_reason, late.stop_reason, len(late.token_ids)) == ("xx", "stop", "xx", 4)
    eos = SamplingParams(max_tokens=10, temperature=0.0, logit_bias={256: 100.0}, min_tokens=2)  # the tokenizer's
    held = _run(engine, [[104, 105]], [eos])[0]
    assert len(held.token_ids) == 3 and held.token_ids[2] == 256 and held.finish_reason == "stop"


def _fields(params: SamplingParams) -> dict[str, Any]:
    return {name: getattr(params, name) for name in params.__dataclass_fields__}


def test_a_bias_past_the_vocabulary_is_refused_and_the_engine_goes_on() -> None:
    model = _soft_model()
    engine = _ENGINES["eager"](model)
    with pytest.raises(UserError) as caught:
        engine.add_request([1, 2, 3], SamplingParams(logit_bias={50: 1.0}))
    assert "\n" not in str(caught.value) and "logit_bias key 50" in str(caught.value) and "[0, 50)" in str(caught.value)
    params = SamplingParams(max_tokens=4, temperature=0.0, logit_bias={49: 100.0})
    assert _run(engine, [[1, 2, 3]], [params])[0].token_ids == [49] * 4


@pytest.mark.parametrize("static", [False, True])
def test_speculative_greedy_with_a_bias_is_the_plain_biased_run(static: bool) -> None:
    model = ToyMTPLM(1, good=True).eval()
    vocab = 40
    prompts = _prompts(4, [6, 17, 3, 9], vocab=vocab)
    params = [
        SamplingParams(max_tokens=24, temperature=0.0, logit_bias={23: 3.0, 29: -2.0, 1: -4.0}),
        SamplingParams(max_tokens=24, temperature=0.0),
        SamplingParams(max_tokens=24, temperature=0.0, logit_bias={EOS: 100.0}, min_tokens=6),
        SamplingParams(max_tokens=24, temperature=0.0, logit_bias={13: 2.5, 22: 1.5}),
    ]
    want = [biased_greedy_reference(model, p, q, EOS) for p, q in zip(prompts, params)]
    unbiased = biased_greedy_reference(model, prompts[0], SamplingParams(max_tokens=24, temperature=0.0), EOS)
    assert want[0] != unbiased and len(want[2]) == 7 and want[2][6] == EOS
    options: dict[str, Any] = {"block_size": 4, "num_blocks": 64, "max_num_batched_tokens": 64, "eos_token_id": EOS}
    plain = LLMEngine(model, **options)
    assert [o.token_ids for o in _run(plain, prompts, params)] == want
    if static:
        options.update(static_decode=True, graph_batch_sizes=(1, 2, 4))
    engine = LLMEngine(model, speculative_tokens=2, **options)
    assert [o.token_ids for o in _run(engine, prompts, params)] == want
    stats = engine.spec_stats()
    assert stats is not None and stats.accepted[0] > 0
    spec = engine.speculator
    assert spec is not None and (not static or (spec.static is not None and spec.static.num_verify > 0))
    assert engine.num_steps < plain.num_steps
