"""``LLM`` on a toy model with the byte tokenizer: batches of text or token prompts, per-prompt params, streaming,
early close of a stream, logprobs, and one-line errors."""

from __future__ import annotations

import pytest
import torch
from mcore_inference.llm import LLM
from mcore_inference.sampling import SamplingParams
from toy_model import ToyLM, greedy_reference

from mcore.data.tokenizer import ByteTokenizer
from mcore.errors import UserError


def _llm(**kwargs: object) -> LLM:
    return LLM(ToyLM(vocab=257, max_len=64), tokenizer=ByteTokenizer(), block_size=4, num_blocks=64, **kwargs)  # type: ignore[arg-type]


def test_generate_text_and_token_prompts_in_order() -> None:
    llm = _llm()
    tok = ByteTokenizer()
    greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    outs = llm.generate(["hello", "a longer prompt here", [104, 105]], greedy)
    assert [o.prompt_token_ids for o in outs] == [
        tok.encode("hello").tolist(),
        tok.encode("a longer prompt here").tolist(),
        [104, 105],
    ]
    for out in outs:
        assert out.token_ids == greedy_reference(llm.model, out.prompt_token_ids, 5)
        assert out.finish_reason == "length"
    one = llm.generate([104, 105], [greedy])
    assert len(one) == 1 and one[0].token_ids == outs[2].token_ids
    mixed = llm.generate(["ab", "cd"], [greedy, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)])
    assert [len(o.token_ids) for o in mixed] == [5, 2]
    assert llm.engine.cache.all_free()


def test_stream_deltas_add_up_to_the_generated_output() -> None:
    llm = _llm()
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    deltas = list(llm.stream("stream me", params))
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    tokens = [t for d in deltas for t in d.new_token_ids]
    (full,) = llm.generate("stream me", params)
    assert tokens == full.token_ids and "".join(d.new_text for d in deltas) == full.text
    early = llm.stream("stop early", SamplingParams(max_tokens=20, temperature=0.0))
    next(early)
    early.close()  # aborts the request
    assert not llm.engine.has_unfinished() and llm.engine.cache.all_free()


def test_a_stop_string_ends_the_text() -> None:
    llm = _llm()
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    (free,) = llm.generate("stop here", greedy)
    assert len(free.text) >= 4, f"the toy model's output decodes to too little text: {free.text!r}"
    stop = free.text[2:4]
    index = free.text.index(stop)
    (cut,) = llm.generate("stop here", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=stop))
    assert cut.text == free.text[:index] and cut.finish_reason == "stop"
    assert len(cut.token_ids) < len(free.token_ids)


def test_seeded_sampling_repeats_and_logprobs_come_back() -> None:
    llm = _llm()
    params = SamplingParams(max_tokens=5, temperature=0.8, seed=3, logprobs=1, ignore_eos=True)
    a, b = llm.generate(["x", "x"], params)
    assert a.token_ids == b.token_ids and a.logprobs is not None and len(a.logprobs) == 5
    assert a.top_logprobs is not None and all(len(t) == 1 for t in a.top_logprobs)


def test_errors_are_one_line_and_nothing_is_left_running() -> None:
    llm = _llm()
    with pytest.raises(UserError):
        llm.generate(["fine", "x" * 80], SamplingParams(max_tokens=2))  # the second exceeds the 64-token context
    assert not llm.engine.has_unfinished(), "the good prompt of a refused batch must not stay queued"
    with pytest.raises(UserError):
        llm.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(UserError):
        _llm(dtype="int8")
    with pytest.raises(UserError):
        LLM(ToyLM(), num_blocks=4, gpu_memory_fraction=0.5)
    with pytest.raises(UserError):
        LLM("/nonexistent/checkpoint")


def test_speculative_tokens_give_the_plain_greedy_output() -> None:
    """``LLM(speculative_tokens=2)`` over a model with MTP layers: drafts are made, verified, partly accepted,
    and the greedy output equals the plain ``LLM``'s (and the full forward's); every main and draft block free."""
    from test_speculative_engine import VOCAB, ToyMTPLM

    model = ToyMTPLM(2, good=True).eval()
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (3, 11, 6, 1)]
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    plain = LLM(model, block_size=4, num_blocks=64)
    spec = LLM(model, block_size=4, num_blocks=64, speculative_tokens=2)
    assert plain.engine.speculator is None
    speculator = spec.engine.speculator
    assert speculator is not None and speculator.k == 2
    want = [o.token_ids for o in plain.generate(prompts, greedy)]
    got = [o.token_ids for o in spec.generate(prompts, greedy)]
    assert got == want
    assert want == [greedy_reference(model, p, 10) for p in prompts]
    stats = speculator.stats
    assert stats.proposed[0] > 0 and 0 < sum(stats.accepted) < sum(stats.proposed), stats  # real drafts, some rejected
    assert spec.engine.cache.all_free() and all(c.all_free() for c in speculator.caches)


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2", None])
def test_bad_speculative_tokens_are_refused_in_one_line(bad: object) -> None:
    from test_speculative_engine import ToyMTPLM

    with pytest.raises(UserError, match=r"^LLM speculative_tokens = .*: must be an int >= 0 \(0: off\)$"):
        LLM(ToyMTPLM(1, good=True), block_size=4, num_blocks=16, speculative_tokens=bad)  # type: ignore[arg-type]


def test_speculative_tokens_without_mtp_layers_or_with_cuda_graphs_on_the_cpu_are_refused() -> None:
    from test_speculative_engine import ToyMTPLM

    with pytest.raises(UserError, match=r"^LLM speculative_tokens = 2: the model has no MTP layers .*allowed: 0$"):
        LLM(ToyLM(), block_size=4, num_blocks=16, speculative_tokens=2)
    with pytest.raises(UserError, match=r"^cuda_graphs=True needs the model on a CUDA device; it is on cpu$"):
        LLM(ToyMTPLM(1, good=True), block_size=4, num_blocks=16, speculative_tokens=1, cuda_graphs=True)
    assert LLM(ToyMTPLM(1, good=True), block_size=4, num_blocks=16, speculative_tokens=1).engine.speculator is not None
    assert LLM(ToyLM(), block_size=4, num_blocks=16, speculative_tokens=0).engine.speculator is None
