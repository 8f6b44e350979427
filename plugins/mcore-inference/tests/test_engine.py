"""``LLMEngine`` on a toy model (``toy_model.py``): greedy output equals token-by-token argmax of the full forward,
whatever the batching, chunking, prefix caching or preemption; every block is free afterwards."""

from __future__ import annotations

import pytest
import torch
from mcore_inference.engine import LLMEngine, RequestOutput
from mcore_inference.sampling import SamplingParams
from toy_model import ToyLM, greedy_reference

from mcore.errors import UserError

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def _prompts(seed: int, lengths: list[int], vocab: int = 50) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _run(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, arrive: list[int] | None = None
) -> dict[int, RequestOutput]:
    """Add prompt ``i`` before step ``arrive[i]``; step until done; the final output of each prompt."""
    arrive = arrive or [0] * len(prompts)
    ids: dict[int, int] = {}
    done: dict[int, RequestOutput] = {}
    step = 0
    while len(done) < len(prompts):
        for i, when in enumerate(arrive):
            if when == step:
                ids[engine.add_request(prompts[i], params)] = i
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out
        step += 1
        assert step < 500, "the engine does not finish"
    assert not engine.has_unfinished()
    assert engine.cache.all_free(), "blocks or slots still held after every request finished"
    return done


@pytest.mark.parametrize("window", [None, 6])
def test_ragged_prompts_arriving_at_different_steps_match_full_forward(window: int | None) -> None:
    model = ToyLM(window=window)
    prompts = _prompts(0, [5, 17, 1, 33, 9])
    engine = LLMEngine(model, block_size=4, num_blocks=64, max_num_batched_tokens=24)
    done = _run(engine, prompts, GREEDY, arrive=[0, 0, 2, 3, 7])
    for i, prompt in enumerate(prompts):
        assert done[i].token_ids == greedy_reference(model, prompt, GREEDY.max_tokens), f"prompt {i}"
        assert done[i].finish_reason == "length"


def test_chunked_prefill_equals_one_shot_prefill() -> None:
    model = ToyLM()
    prompts = _prompts(1, [30, 21, 7])
    one_shot = _run(LLMEngine(model, block_size=4, num_blocks=64, max_num_batched_tokens=512), prompts, GREEDY)
    chunked = _run(LLMEngine(model, block_size=4, num_blocks=64, max_num_batched_tokens=5), prompts, GREEDY)
    assert [one_shot[i].token_ids for i in range(3)] == [chunked[i].token_ids for i in range(3)]


def test_prefix_cache_hit_gives_the_tokens_of_a_miss() -> None:
    model = ToyLM()
    shared = _prompts(2, [19])[0]
    prompts = [[*shared, 3, 4], [*shared, 5], shared]
    engine = LLMEngine(model, block_size=4, num_blocks=64)
    first = _run(engine, prompts[:1], GREEDY)
    hits_before, computed_before = engine.cache.prefix_hits, engine.num_computed_tokens
    later = _run(engine, prompts[1:], GREEDY)  # the shared 16 tokens (4 full blocks) are cached
    assert engine.cache.prefix_hits - hits_before == 8, "the later prompts should each hit the 4 shared blocks"
    computed = engine.num_computed_tokens - computed_before
    assert computed == (20 - 16) + (19 - 16) + 2 * (GREEDY.max_tokens - 1), "cached blocks must not be recomputed"
    engine.add_request(shared, GREEDY, extra_key="lora-b")  # another key: no hit
    while engine.has_unfinished():
        engine.step()
    assert engine.cache.prefix_hits - hits_before == 8, "a request with another extra key must not hit"
    cold = _run(LLMEngine(model, block_size=4, num_blocks=64, enable_prefix_caching=False), prompts, GREEDY)
    assert cold[0].token_ids == first[0].token_ids
    assert [later[0].token_ids, later[1].token_ids] == [cold[1].token_ids, cold[2].token_ids]
    assert cold[2].token_ids == greedy_reference(model, shared, GREEDY.max_tokens)


def test_preemption_gives_the_tokens_of_no_preemption() -> None:
    model = ToyLM()
    prompts = _prompts(3, [9, 13, 6, 11])
    params = SamplingParams(max_tokens=10, temperature=0.0)
    roomy = LLMEngine(model, block_size=4, num_blocks=64)
    tight = LLMEngine(model, block_size=4, num_blocks=8)  # 32 tokens: the four cannot all run to the end
    want = _run(roomy, prompts, params)
    got = _run(tight, prompts, params)
    assert [got[i].token_ids for i in range(4)] == [want[i].token_ids for i in range(4)]
    assert tight.scheduler.num_preemptions > 0, "the tiny pool should have forced a preemption"


def test_seeded_sampling_survives_preemption_and_batching() -> None:
    model = ToyLM()
    prompts = _prompts(6, [9, 13, 6, 11])
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    alone = [_run(LLMEngine(model, block_size=4, num_blocks=64), [p], params)[0].token_ids for p in prompts]
    tight = LLMEngine(model, block_size=4, num_blocks=8, seed=5)
    got = _run(tight, prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert [got[i].token_ids for i in range(4)] == alone


def test_stop_token_ids_and_eos_end_a_request() -> None:
    model = ToyLM()
    prompt = _prompts(4, [7])[0]
    free = greedy_reference(model, prompt, 12)
    firsts = [j for j in range(1, len(free)) if free[j] not in free[:j]]  # tokens that appear for the first time
    assert len(firsts) >= 2, f"the toy model's greedy output is too repetitive: {free}"
    eos, stop = firsts[0], firsts[1]
    engine = LLMEngine(model, block_size=4, num_blocks=32, eos_token_id=free[eos])
    long = SamplingParams(max_tokens=12, temperature=0.0)
    done = _run(engine, [prompt], long)
    assert done[0].token_ids == free[: eos + 1] and done[0].finish_reason == "stop"
    ignore = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=(free[stop],))
    done = _run(engine, [prompt], ignore)
    assert done[0].token_ids == free[: stop + 1] and done[0].finish_reason == "stop"


def test_logprobs_when_asked() -> None:
    model = ToyLM()
    prompt = _prompts(5, [8])[0]
    engine = LLMEngine(model, block_size=4, num_blocks=32)
    done = _run(engine, [prompt], SamplingParams(max_tokens=3, temperature=0.0, logprobs=2))
    out = done[0]
    assert out.logprobs is not None and out.top_logprobs is not None and len(out.logprobs) == 3
    full = torch.log_softmax(model(torch.tensor([prompt + out.token_ids]))[0].detach(), -1)
    for j, token in enumerate(out.token_ids):
        want = full[len(prompt) - 1 + j]
        assert out.logprobs[j] == pytest.approx(float(want[token]), abs=1e-4)
        assert list(out.top_logprobs[j]) == want.topk(2).indices.tolist()


def test_bad_requests_are_refused_and_the_engine_goes_on() -> None:
    model = ToyLM(max_len=128)
    engine = LLMEngine(model, block_size=4, num_blocks=8, max_model_len=40)
    good = engine.add_request([1, 2, 3], GREEDY)
    bad = {
        "prompt longer than the context": lambda: engine.add_request(list(range(40)), GREEDY),
        "cache too small for one sequence": lambda: engine.add_request([1] * 30, SamplingParams(max_tokens=5)),
        "empty prompt": lambda: engine.add_request([], GREEDY),
        "token outside the vocabulary": lambda: engine.add_request([1, 99], GREEDY),
        "text without a tokenizer": lambda: engine.add_request("hello", GREEDY),
        "params of the wrong type": lambda: engine.add_request([1], {"temperature": 0}),  # type: ignore[arg-type]
        "negative temperature": lambda: engine.add_request([1], SamplingParams(temperature=-1.0)),
        "top_p outside (0, 1]": lambda: engine.add_request([1], SamplingParams(top_p=0.0)),
    }
    for what, call in bad.items():
        with pytest.raises(UserError) as info:
            call()
        assert "\n" not in str(info.value), what
    outputs: list[RequestOutput] = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert [o.request_id for o in outputs if o.finished] == [good]
    assert engine.cache.all_free()


def test_abort_frees_the_request() -> None:
    model = ToyLM()
    engine = LLMEngine(model, block_size=4, num_blocks=32)
    a = engine.add_request([1, 2, 3, 4, 5], SamplingParams(max_tokens=20, temperature=0.0))
    b = engine.add_request([6, 7], SamplingParams(max_tokens=3, temperature=0.0))
    engine.step()
    aborted = engine.abort(a)
    assert aborted is not None and aborted.finish_reason == "abort" and len(aborted.token_ids) == 1
    assert engine.abort(a) is None
    while engine.has_unfinished():
        engine.step()
    assert engine.cache.all_free() and b not in engine._requests
