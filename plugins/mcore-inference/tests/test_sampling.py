"""Sampling: validation, greedy, seeded reproducibility, truncation supports and frequencies, penalties, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from mcore_inference.sampling import Sampler, SamplingParams, SamplingState, seeded_log_exponentials, token_stop

from mcore.errors import UserError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# Hand-made distribution: probabilities 0.5, 0.25, 0.15, 0.1 (sorted), then two impossible tokens.
PROBS = [0.5, 0.25, 0.15, 0.1]
LOGITS = [math.log(p) for p in PROBS] + [-math.inf, -math.inf]
DRAWS = 4000


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.5),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.01),
        ("top_k", -2),
        ("top_k", 2.5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("max_tokens", 0),
        ("max_tokens", True),
        ("logprobs", -1),
        ("logprobs", 21),
        ("seed", 1.5),
        ("stop", ["ok", ""]),
        ("stop_token_ids", [-1]),
        ("ignore_eos", "yes"),
    ],
)
def test_invalid_values_are_one_line_user_errors(field: str, value: object) -> None:
    with pytest.raises(UserError) as err:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    message = str(err.value)
    assert "\n" not in message and f"SamplingParams.{field} = {value!r}" in message
    assert "must be" in message


def test_params_normalise_and_compare() -> None:
    params = SamplingParams(stop="END", stop_token_ids=[3, 4], top_k=-1, seed=-5)  # type: ignore[arg-type]
    assert params.stop == ("END",) and params.stop_token_ids == (3, 4)
    assert params == SamplingParams(stop=("END",), stop_token_ids=(3, 4), top_k=-1, seed=-5)
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-7).greedy
    assert not SamplingParams().penalised and SamplingParams(presence_penalty=0.1).penalised
    with pytest.raises(TypeError):
        SamplingParams(0.5)  # type: ignore[misc]  # keyword-only


def test_token_stop() -> None:
    params = SamplingParams(max_tokens=3, stop_token_ids=(7,))
    assert token_stop(params, 7, 1, eos_id=9) == ("stop", 7)
    assert token_stop(params, 9, 1, eos_id=9) == ("stop", 9)
    assert token_stop(SamplingParams(ignore_eos=True), 9, 1, eos_id=9) is None
    assert token_stop(params, 5, 2, eos_id=9) is None
    assert token_stop(params, 5, 3, eos_id=9) == ("length", 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_exact_argmax_in_a_mixed_batch(device: str, dtype: torch.dtype) -> None:
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    states = [
        SamplingState(SamplingParams(temperature=0.0 if i % 2 == 0 else 0.8, seed=i if i % 4 == 1 else None), [1])
        for i in range(8)
    ]
    out = Sampler(seed=0).sample(logits, states)
    assert out.token_ids.dtype == torch.int64 and out.token_ids.device.type == device
    greedy = torch.arange(0, 8, 2)
    assert torch.equal(out.token_ids[greedy].cpu(), logits.float().argmax(-1)[greedy].cpu())
    everyone_greedy = [SamplingState(SamplingParams(temperature=0), []) for _ in range(8)]
    assert torch.equal(Sampler().sample(logits, everyone_greedy).token_ids, logits.float().argmax(-1))


def _request_logits(request: int, position: int, vocab: int) -> torch.Tensor:
    """The logits a model would give request ``request`` at ``position`` (fixed, independent of batching)."""
    return torch.randn(vocab, generator=torch.Generator().manual_seed(1000 * request + position))


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_requests_repeat_across_batch_compositions_and_orders(device: str) -> None:
    vocab, steps = 64, 12
    params = {
        0: SamplingParams(seed=11, temperature=1.0),
        1: SamplingParams(seed=11, temperature=0.7, top_k=20),
        2: SamplingParams(seed=2**40 + 3, top_p=0.9, min_p=0.02),
        3: SamplingParams(seed=-4, repetition_penalty=1.2, frequency_penalty=0.3),
    }

    def run(schedule: list[list[int]], engine_seed: int) -> dict[int, list[int]]:
        """Each step samples the listed requests (plus an unseeded and a greedy filler) in that order."""
        sampler = Sampler(seed=engine_seed)
        states = {r: SamplingState(p, [r, 5, 6]) for r, p in params.items()}
        for step_requests in schedule:
            rows: list[tuple[int | None, SamplingState]] = [(r, states[r]) for r in step_requests]
            rows.insert(len(rows) // 2, (None, SamplingState(SamplingParams(), [1] * (engine_seed + 1))))
            rows.append((None, SamplingState(SamplingParams(temperature=0), [2])))
            logits = torch.stack(
                [_request_logits(r, s.num_tokens, vocab) if r is not None else torch.randn(vocab) for r, s in rows]
            )
            tokens = sampler.sample(logits.to(device), [s for _, s in rows]).token_ids.tolist()
            for (_, state), token in zip(rows, tokens, strict=True):
                state.output_token_ids.append(token)
        return {r: s.output_token_ids for r, s in states.items()}

    together = run([[0, 1, 2, 3]] * steps, engine_seed=0)
    reordered = run([[3, 1, 0, 2], [2, 0, 3, 1]] * (steps // 2), engine_seed=5)
    # one request at a time: request 2 "preempted" and resumed later, others interleaved
    alone = run([[r] for r in (0, 1, 3)] * steps + [[2]] * steps, engine_seed=9)
    assert together == reordered == alone
    assert together[0] != together[1]  # same seed, other parameters: other tokens
    assert len(set(together[0])) > 3  # the draws move with the position


def test_unseeded_requests_follow_the_sampler_seed() -> None:
    logits = torch.zeros(64, 100)
    states = [SamplingState(SamplingParams(), []) for _ in range(64)]
    first, again, other = (Sampler(seed=seed).sample(logits, states).token_ids for seed in (5, 5, 6))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_seeded_draws_are_a_function_of_seed_position_and_index() -> None:
    seeds = torch.tensor([[7, 0], [7, 0], [8, 0], [7, 1]])
    positions = torch.tensor([3, 4, 3, 3])
    log_e = seeded_log_exponentials(seeds, positions, 5000)
    assert torch.isfinite(log_e).all()
    assert all(not torch.equal(log_e[0], log_e[i]) for i in (1, 2, 3))
    again = seeded_log_exponentials(seeds[[3, 0]], positions[[3, 0]], 5000)
    assert torch.equal(again, log_e[[3, 0]])
    # E = exp(log_e) ~ Exp(1): mean 1, variance 1
    e = log_e.exp().double()
    assert abs(e.mean().item() - 1) < 0.02 and abs(e.var().item() - 1) < 0.05
    # per-index uniforms are uncorrelated between neighbouring positions
    corr = torch.corrcoef(torch.stack([log_e[0], log_e[1]]))[0, 1].item()
    assert abs(corr) < 0.05


def _frequencies(params: SamplingParams, *, device: str = "cpu", logits: list[float] = LOGITS) -> torch.Tensor:
    """Sample DRAWS times from the same logits (one row per draw: positions 0..DRAWS-1) and count each token."""
    rows = torch.tensor(logits).expand(DRAWS, -1).to(device)
    states = [SamplingState(params, []) for _ in range(DRAWS)]
    tokens = Sampler(seed=0).sample(rows, states, torch.arange(DRAWS, device=device)).token_ids
    return torch.bincount(tokens.cpu(), minlength=len(logits)).double() / DRAWS


@pytest.mark.parametrize(
    ("knobs", "support"),
    [
        ({}, [0, 1, 2, 3]),
        ({"top_k": 2}, [0, 1]),
        ({"top_k": 100}, [0, 1, 2, 3]),
        ({"top_p": 0.45}, [0]),
        ({"top_p": 0.7}, [0, 1]),
        ({"top_p": 0.8}, [0, 1, 2]),
        ({"min_p": 0.25}, [0, 1, 2]),
        ({"min_p": 0.45}, [0, 1]),
        ({"min_p": 1.0}, [0]),
        # top-p over the top-k distribution renormalised (0.556, 0.278, 0.167): 0.85 keeps three, 0.8 two
        ({"top_k": 3, "top_p": 0.85}, [0, 1, 2]),
        ({"top_k": 3, "top_p": 0.8}, [0, 1]),
        ({"temperature": 2.0, "top_k": 3}, [0, 1, 2]),
    ],
)
@pytest.mark.parametrize("seeded", [True, False])
def test_truncation_keeps_exactly_its_support_with_the_right_frequencies(
    knobs: dict[str, float], support: list[int], seeded: bool
) -> None:
    params = SamplingParams(seed=1234 if seeded else None, **knobs)  # type: ignore[arg-type]
    freq = _frequencies(params)
    scaled = torch.tensor(LOGITS) / params.temperature
    expected = torch.zeros(len(LOGITS), dtype=torch.float64)
    expected[support] = scaled[support].softmax(-1).double()
    assert set(torch.nonzero(freq).flatten().tolist()) == set(support)
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


def test_ties_at_the_kth_logit_are_kept() -> None:
    freq = _frequencies(SamplingParams(seed=3, top_k=2), logits=[1.0, 0.0, 0.0, -1.0])
    assert set(torch.nonzero(freq).flatten().tolist()) == {0, 1, 2}


def _penalised_logprobs(state: SamplingState, logits: list[float]) -> torch.Tensor:
    """The sampler's penalised logits (up to a constant) read back through greedy top logprobs."""
    out = Sampler().sample(torch.tensor([logits]), [state])
    assert out.top_logprobs is not None
    return torch.zeros(len(logits)).scatter(0, out.top_logprobs.ids[0], out.top_logprobs.values[0])


def test_penalties_on_a_hand_made_case() -> None:
    logits = [2.0, -2.0, 1.0, 0.5, 3.0]
    params = SamplingParams(
        temperature=0, logprobs=5, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25
    )
    # prompt has token 0; the output 1 once and 2 twice; 3 and 4 never appear
    state = SamplingState(params, [0, 0], [1, 2, 2])
    expected = torch.tensor(
        [
            2.0 / 2,  # repetition only (prompt): positive logit divided
            -2.0 * 2 - 0.5 * 1 - 0.25,  # repetition (negative: multiplied), frequency x1, presence
            1.0 / 2 - 0.5 * 2 - 0.25,  # repetition, frequency x2, presence
            0.5,
            3.0,
        ]
    ).log_softmax(-1)
    assert torch.allclose(_penalised_logprobs(state, logits), expected, atol=1e-6)
    # the greedy choice follows the penalised logits: token 0's 2.0 halves, token 4 wins either way; penalise 4
    state4 = SamplingState(SamplingParams(temperature=0, repetition_penalty=4.0), [4])
    assert Sampler().sample(torch.tensor([logits]), [state4]).token_ids.item() == 0


def test_penalty_counts_follow_appends_and_truncation() -> None:
    logits = [1.0, 1.0, 1.0, 1.0]
    params = SamplingParams(temperature=0, logprobs=4, frequency_penalty=1.0, presence_penalty=0.5)
    state = SamplingState(params, [])
    for token in (2, 2, 1):
        _penalised_logprobs(state, logits)  # brings the device counts up to date each step
        state.output_token_ids.append(token)
    assert torch.allclose(
        _penalised_logprobs(state, logits), _penalised_logprobs(SamplingState(params, [], [2, 2, 1]), logits)
    )
    del state.output_token_ids[1:]  # rolled back to [2]
    state.output_token_ids.append(3)
    got = _penalised_logprobs(state, logits)
    assert torch.allclose(got, _penalised_logprobs(SamplingState(params, [], [2, 3]), logits))
    assert got[0] > got[2] and got[2] == got[3]


def test_logprobs_are_after_temperature_and_before_truncation() -> None:
    logits = torch.tensor([LOGITS[:4], [0.0, 1.0, 2.0, 3.0]])
    states = [
        SamplingState(SamplingParams(temperature=0.5, top_k=1, logprobs=3, seed=0), []),
        SamplingState(SamplingParams(temperature=0), []),
    ]
    out = Sampler().sample(logits, states)
    assert out.token_ids.tolist() == [0, 3]
    expected = torch.stack([(logits[0] / 0.5).log_softmax(-1), logits[1].log_softmax(-1)])
    assert torch.allclose(out.logprob, expected[[0, 1], [0, 3]])
    assert out.top_logprobs is not None and out.top_logprobs.ids.shape == (2, 3)
    assert out.top_logprobs.ids[0].tolist() == [0, 1, 2]
    assert torch.allclose(out.top_logprobs.values[0], expected[0, :3])  # truncated tokens keep their logprobs
    none_asked = Sampler().sample(logits, [SamplingState(SamplingParams(logprobs=0), []) for _ in range(2)])
    assert none_asked.top_logprobs is None and none_asked.logprob.shape == (2,)


@pytest.mark.gpu
def test_sample_does_not_sync_the_host_on_cuda() -> None:
    logits = torch.randn(6, 5000, device="cuda")
    states = [
        SamplingState(SamplingParams(temperature=0), [1, 2]),
        SamplingState(SamplingParams(seed=1, top_k=50, top_p=0.9, min_p=0.05, logprobs=5), [3]),
        SamplingState(SamplingParams(repetition_penalty=1.3, presence_penalty=0.2), [4], [5, 6]),
        SamplingState(SamplingParams(seed=2), []),
        SamplingState(SamplingParams(temperature=0.3, frequency_penalty=1.0), [7]),
        SamplingState(SamplingParams(), []),
    ]
    sampler = Sampler(seed=0)
    sampler.sample(logits, states)  # first call allocates per-request device state
    for s in states:
        s.output_token_ids.append(9)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler.sample(logits, states)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.token_ids.shape == (6,)


@pytest.mark.gpu
def test_seeded_tokens_match_between_cpu_and_cuda() -> None:
    params = SamplingParams(seed=77, top_p=0.95)
    cpu = _frequencies(params, device="cpu")
    cuda = _frequencies(params, device="cuda")
    assert torch.equal(cpu, cuda)
