"""``logit_bias`` and ``min_tokens`` in ``SamplingParams``, the sampler, the speculative target distribution, the
stop decision and the detokeniser's stop strings (CPU, fp32, exact where the arithmetic allows)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from mcore_inference.detokenize import IncrementalDetokenizer
from mcore_inference.rejection import target_distribution
from mcore_inference.sampling import MAX_LOGIT_BIAS, Sampler, SamplingParams, SamplingState, token_stop

from mcore.data.tokenizer import ByteTokenizer
from mcore.errors import UserError

V = 32


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3  # (S, V)


def _biased(logits: torch.Tensor, biases: list[dict[int, float]]) -> torch.Tensor:
    """The reference: each row's bias added on the host, (S, V)."""
    out = logits.clone()
    for row, bias in enumerate(biases):
        for token, value in bias.items():
            out[row, token] += value
    return out


def _states(params: list[SamplingParams], outputs: int = 0) -> list[SamplingState]:
    return [SamplingState(p, [1, 2], [3] * outputs) for p in params]


# ----- SamplingParams -----


def test_logit_bias_is_kept_sorted_frozen_and_hashable() -> None:
    p = SamplingParams(logit_bias={7: 1.5, 2: -100, 30: 100})
    assert p.logit_bias == ((2, -100.0), (7, 1.5), (30, 100.0))
    assert hash(p) == hash(SamplingParams(logit_bias=[(30, 100), (2, -100), (7, 1.5)]))  # the wire's pairs
    assert dataclasses.replace(p, seed=3).logit_bias == p.logit_bias
    assert SamplingParams(logit_bias={}).logit_bias is None and SamplingParams().logit_bias is None
    assert SamplingParams(logit_bias={i: 1.0 for i in range(MAX_LOGIT_BIAS)}).logit_bias is not None
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"logit_bias": {True: 1.0}}, "logit_bias"),
        ({"logit_bias": [(3, 1.0), (3, 2.0)]}, "logit_bias"),
        ({"logit_bias": {3: 101}}, "logit_bias[3]"),
        ({"logit_bias": {3: -100.5}}, "logit_bias[3]"),
        ({"logit_bias": {3: math.nan}}, "logit_bias[3]"),
        ({"logit_bias": {3: math.inf}}, "logit_bias[3]"),
        ({"logit_bias": {3: "1"}}, "logit_bias[3]"),
        ({"logit_bias": {i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias has 301 entries"),
        ({"logit_bias": 5}, "logit_bias"),
        ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": True}, "min_tokens"),
        ({"min_tokens": 1.0}, "min_tokens"),
    ],
)
def test_bad_values_are_one_line_user_errors(kwargs: dict[str, object], names: str) -> None:
    with pytest.raises(UserError) as caught:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message and f"SamplingParams.{names}" in message


# ----- the sampler -----


def test_plus_100_forces_a_token_and_minus_100_bans_the_argmax() -> None:
    logits = _logits(3)
    top = logits.argmax(-1).tolist()
    forced = [SamplingParams(temperature=0.0, logit_bias={5: 100.0}) for _ in range(3)]
    assert Sampler().sample(logits, _states(forced), logprobs=False).token_ids.tolist() == [5, 5, 5]
    banned = [SamplingParams(temperature=0.0, logit_bias={t: -100.0}) for t in top]
    second = logits.topk(2, dim=-1).indices[:, 1].tolist()
    assert Sampler().sample(logits, _states(banned)).token_ids.tolist() == second
    hot = [SamplingParams(temperature=1.0, seed=9, logit_bias={t: -100.0}) for t in top]  # sampled: never drawn
    positions = torch.arange(3, dtype=torch.int64)
    for step in range(50):
        drawn = Sampler().sample(logits, _states(hot), positions + 3 * step).token_ids.tolist()
        assert all(d != t for d, t in zip(drawn, top))


def test_each_row_takes_its_own_bias_beside_plain_and_penalised_rows() -> None:
    logits = _logits(4, seed=1)
    biases = [{1: 2.5, 7: -1.0}, {}, {3: 4.0, 1: -2.0, 30: 1.0}, {0: 6.0}]
    params = [SamplingParams(temperature=0.0, logit_bias=b) for b in biases]
    params[3] = dataclasses.replace(params[3], frequency_penalty=0.5)  # penalties come after the bias
    states = _states(params, outputs=2)  # output [3, 3]: token 3 penalised by 1.0 in row 3
    want = _biased(logits, biases)
    want[3, 3] -= 1.0
    out = Sampler().sample(logits, states)
    assert torch.equal(out.token_ids, want.argmax(-1))
    assert out.logprob is not None
    ref = torch.log_softmax(want.double(), -1).gather(1, out.token_ids[:, None])[:, 0]
    assert float((out.logprob.double() - ref).norm() / ref.norm()) < 1e-5


def test_logprobs_are_of_the_biased_distribution() -> None:
    logits = _logits(2, seed=2)
    biases = [{4: 3.0, 9: -5.0}, {11: 1.0}]
    params = [SamplingParams(temperature=0.7, seed=1, logprobs=5, logit_bias=b) for b in biases]
    out = Sampler().sample(logits, _states(params))
    ref = torch.log_softmax(_biased(logits, biases).double() / 0.7, -1)  # (S, V)
    assert out.logprob is not None and out.top_logprobs is not None
    chosen = ref.gather(1, out.token_ids[:, None])[:, 0]
    assert float((out.logprob.double() - chosen).norm() / chosen.norm()) < 1e-5
    values, ids = ref.topk(5, dim=-1)
    assert torch.equal(out.top_logprobs.ids, ids)
    assert float((out.top_logprobs.values.double() - values).norm() / values.norm()) < 1e-5


def test_seeded_sampling_with_a_bias_is_reproducible_and_is_sampling_the_biased_logits() -> None:
    logits = _logits(3, seed=3)
    biases = [{2: 1.5}, {8: -2.0, 9: 2.0}, {}]
    with_bias = [SamplingParams(temperature=0.9, top_k=10, seed=40 + i, logit_bias=b) for i, b in enumerate(biases)]
    without = [dataclasses.replace(p, logit_bias=None) for p in with_bias]
    positions = torch.tensor([5, 6, 7])
    first = Sampler(seed=1).sample(logits, _states(with_bias), positions).token_ids
    again = Sampler(seed=2).sample(logits, _states(with_bias), positions).token_ids
    same = Sampler().sample(_biased(logits, biases), _states(without), positions).token_ids
    assert torch.equal(first, again) and torch.equal(first, same)
    alone = Sampler().sample(logits[1:2], _states(with_bias[1:2]), positions[1:2]).token_ids  # another batch
    assert alone.item() == first[1].item()


def test_a_bias_on_an_id_past_the_vocabulary_is_left_out() -> None:
    logits = _logits(1, seed=4)
    params = [SamplingParams(temperature=0.0, logit_bias={V + 5: 100.0})]
    assert Sampler().sample(logits, _states(params)).token_ids.item() == logits.argmax().item()


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    eos, stop = 7, 12
    logits = _logits(3, seed=5)
    bias = {eos: 100.0, stop: 50.0}  # without the mask: eos, then the stop id
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(stop,), logit_bias=bias, logprobs=2)
    sampler = Sampler(eos_token_id=eos)
    masked = _biased(logits, [bias] * 3)
    masked[:, [eos, stop]] = -math.inf
    for outputs, want in ((0, masked.argmax(-1)), (2, masked.argmax(-1)), (3, torch.full((3,), eos))):
        out = sampler.sample(logits, _states([params] * 3, outputs))
        assert torch.equal(out.token_ids, want), outputs
    out = sampler.sample(logits, _states([params] * 3, 1))
    assert out.top_logprobs is not None and not bool(torch.isin(out.top_logprobs.ids, torch.tensor([eos, stop])).any())
    free = dataclasses.replace(params, ignore_eos=True)  # eos does not stop it: not masked
    assert sampler.sample(logits[:1], _states([free], 0)).token_ids.item() == eos
    random = dataclasses.replace(params, temperature=1.0, seed=3, logprobs=None)
    for step in range(30):
        got = sampler.sample(logits, _states([random] * 3, 2), torch.arange(3) + 3 * step).token_ids
        assert not bool(torch.isin(got, torch.tensor([eos, stop])).any())


def test_the_speculative_target_distribution_takes_the_bias() -> None:
    logits = _logits(3, seed=6)
    biases = [{3: 100.0}, {int(logits[1].argmax()): -100.0}, {5: 1.0, 6: -1.0}]
    params = [
        SamplingParams(temperature=0.0, logit_bias=biases[0]),
        SamplingParams(temperature=0.0, logit_bias=biases[1]),
        SamplingParams(temperature=0.5, logit_bias=biases[2]),
    ]
    probs = target_distribution(logits, params)  # (3, V)
    want = _biased(logits, biases)
    assert torch.equal(probs[:2], torch.nn.functional.one_hot(want[:2].argmax(-1), V).float())
    ref = torch.softmax(want[2].double() / 0.5, -1)
    assert float((probs[2].double() - ref).norm() / ref.norm()) < 1e-5


# ----- the stop decision -----


def test_no_stop_token_ends_a_request_before_min_tokens() -> None:
    params = SamplingParams(max_tokens=8, min_tokens=3, stop_token_ids=(5,))
    assert [token_stop(params, 9, n, eos_id=9) for n in (1, 2, 3)] == [None, None, None]
    assert token_stop(params, 9, 4, eos_id=9) == ("stop", 9)
    assert token_stop(params, 5, 3, eos_id=9) is None and token_stop(params, 5, 4, eos_id=9) == ("stop", 5)
    short = SamplingParams(max_tokens=3, min_tokens=3)
    assert token_stop(short, 9, 3, eos_id=9) == ("length", 9)


def _push(params: SamplingParams, text: str) -> IncrementalDetokenizer:
    detok = IncrementalDetokenizer(ByteTokenizer(), [104, 105], params)
    for byte in text.encode():
        detok.push(byte)
        if detok.finished:
            break
    return detok


def test_stop_strings_are_not_honoured_before_min_tokens() -> None:
    assert _push(SamplingParams(stop=("ab",)), "abcab").text == ""
    late = _push(SamplingParams(stop=("ab",), min_tokens=3), "abcabz")
    assert (late.text, late.finish_reason, late.stop_reason, len(late.token_ids)) == ("abc", "stop", "ab", 5)
    across = _push(SamplingParams(stop=("ab",), min_tokens=2), "xab")  # begins in exempt text, ends after it
    assert (across.text, across.finish_reason) == ("x", "stop")
    kept = _push(SamplingParams(stop=("ab",), min_tokens=2, include_stop_str_in_output=True), "abab")
    assert (kept.text, kept.finish_reason) == ("abab", "stop")
    never = _push(SamplingParams(stop=("ab",), min_tokens=5, max_tokens=5), "ababa")
    assert (never.text, never.finish_reason) == ("ababa", "length")
