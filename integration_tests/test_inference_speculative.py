"""MTP speculative decoding (mcore-inference ``speculative_tokens``) serving mcore's ``gpt`` with MTP depths, CPU fp32.

* ``GPT.forward_with_hidden`` / ``mtp_forward`` compute the MTP depths of training (their losses add up to the
  model's).
* The drafts equal the full-sequence forward of the MTP depths (training semantics: depth ``d`` at position ``i``
  reads the previous depth's output and token ``i + d``), over many steps of ragged, chunked sequences, for 1 and 2
  depths and more draft depths than the model has (the last module reused).
* Greedy output with speculation equals the plain engine's and the full forward's argmax, with prompts arriving at
  different steps, chunked prefill, prefix-cache hits and preemption, for GQA, sliding-window and MLA caches; drafts
  are accepted and rejected; an abort frees the draft caches.
* A model with MTP depths keeps them out of the main cache (prefix caching and static decode serve it).
* Sampling (temperature > 0): the joint distribution of three tokens equals the model's (chi-square).

The "good drafter" model: large-norm embeddings and head make the next token mostly a function of the current
one; MTP depths project the next token's embedding through (``proj = [I | 0]``), so they predict the main model
well but not perfectly (its layers' outputs are scaled up until about half the drafts are rejected).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from mcore_inference.engine import LLMEngine
from mcore_inference.sampling import SamplingParams

from mcore.errors import UserError
from mcore_models.gpt import GPT, GPTConfig

VOCAB, HIDDEN = 64, 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def build(depths: int, *, vocab: int = VOCAB, scale: float = 50.0, good: bool = True, mixer: str = "gqa") -> GPT:
    values: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "num_layers": 2,
        "mtp_num_layers": depths,
        "swiglu": {"ffn_hidden_size": 48},
        "attention": {"num_heads": 4, "num_kv_heads": 2, "qk_norm": True},
    }
    if mixer == "window":
        values["attention"] = {"num_heads": 4, "num_kv_heads": 1, "sliding_window": 5}
    elif mixer == "mla":
        mla = {"num_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4}
        values |= {"mixer": "mla", "mla": {**mla, "v_head_dim": 6}}
    model = GPT.build(GPTConfig.from_values(values), seed=7).eval()
    if good:
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            model.embed.weight.copy_(torch.randn(model.embed.weight.shape, generator=gen))
            assert model.head is not None
            model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=gen))
            for name, p in model.named_parameters():
                if name.endswith(("attention.out.weight", "mlp.down.weight")):
                    p.mul_(scale)
            for module in model.mtp:
                module.proj.weight.zero_()
                module.proj.weight[:, :HIDDEN] = torch.eye(HIDDEN)
    return model


def reference(model: GPT, prompt: list[int], max_tokens: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def run(engine: LLMEngine, prompts: list[list[int]], arrive: list[int], params: SamplingParams) -> list[list[int]]:
    ids: dict[int, int] = {}
    done: dict[int, list[int]] = {}
    step = 0
    while len(done) < len(prompts):
        for i, when in enumerate(arrive):
            if when == step:
                ids[engine.add_request(prompts[i], params)] = i
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out.token_ids
        step += 1
        assert step < 500
    assert engine.cache.all_free(), "main cache blocks held after every request finished"
    spec = engine.speculator
    assert spec is None or all(c.all_free() for c in spec.caches), "draft cache blocks held"
    return [done[i] for i in range(len(prompts))]


def prompts_for(lengths: tuple[int, ...], seed: int = 1, vocab: int = VOCAB) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("depths", [1, 2])
def test_mtp_forward_is_the_training_mtp(depths: int) -> None:
    """``forward_with_hidden`` / ``mtp_forward`` give the losses ``model(tokens, labels=...)`` trains on."""
    model = build(depths, good=False)
    tokens = torch.tensor(prompts_for((13,), seed=8))
    labels = torch.cat([tokens[:, 1:], torch.tensor([[-100]])], dim=1)
    with torch.no_grad():
        want = model(tokens, labels=labels).double()
        logits, hidden = model.forward_with_hidden(tokens)
        ce = torch.nn.functional.cross_entropy
        total = ce(logits[0].double(), labels[0], ignore_index=-100)
        mtp = torch.zeros((), dtype=torch.float64)
        for d in range(1, depths + 1):
            hidden, depth_logits = model.mtp_forward(d, hidden, tokens.roll(-d, dims=1))
            depth_labels = labels.roll(-d, dims=1)
            depth_labels[:, -d:] = -100
            mtp = mtp + ce(depth_logits[0].double(), depth_labels[0], ignore_index=-100)
        total = total + model.config.mtp_loss_weight / depths * mtp
    assert float((total - want).abs() / want.abs()) < 1e-5


@pytest.mark.parametrize(("depths", "k"), [(1, 1), (1, 3), (2, 2), (2, 3)])
def test_drafts_equal_full_forward_of_the_mtp_depths(depths: int, k: int) -> None:
    model = build(depths)
    engine = LLMEngine(
        model, block_size=4, num_blocks=96, max_num_batched_tokens=10, speculative_tokens=k, enable_prefix_caching=False
    )
    spec = engine.speculator
    assert spec is not None
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=5)  # drawn drafts: their distributions compare
    prompts = prompts_for((6, 17, 1, 11))
    ids = {engine.add_request(p, params): i for i, p in enumerate(prompts)}
    checked = 0
    while engine.has_unfinished():
        engine.step()
        for request_id in ids:
            request = engine._requests.get(request_id)
            drafts, q = spec.drafts(request_id)
            if request is None or not drafts:
                continue
            assert q is not None
            known = list(request.seq.token_ids)
            ext = torch.tensor([known + drafts])
            with torch.no_grad():
                _, hidden = model.forward_with_hidden(ext[:, : len(known)])
                hidden = hidden[:, : len(known) - 1]  # positions 0 .. T-2
                for s in range(1, len(drafts) + 1):
                    module = min(s, depths)
                    hidden, logits = model.mtp_forward(module, hidden, ext[:, s : s + len(known) - 1])
                    want = torch.softmax(logits[0, -1].double() / params.temperature, dim=-1)
                    err = (q[s - 1].double() - want).norm() / want.norm()
                    assert err < 1e-5, (request_id, s, float(err))
                    checked += 1
    assert checked >= 20 * k
    assert engine.cache.all_free() and all(c.all_free() for c in spec.caches)


@pytest.mark.parametrize(("depths", "k"), [(1, 1), (1, 3), (2, 2), (2, 4)])
def test_speculative_greedy_equals_plain_engine(depths: int, k: int) -> None:
    model = build(depths)
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    prompts = prompts_for((7, 19, 1, 12, 9))
    prompts.append([*prompts[1][:16], 3, 4, 5])  # shares 4 full blocks with prompt 1: a prefix-cache hit
    arrive = [0, 0, 1, 3, 3, 6]
    want = [reference(model, p, greedy.max_tokens) for p in prompts]
    plain = LLMEngine(model, block_size=4, num_blocks=96, max_num_batched_tokens=9)
    assert run(plain, prompts, arrive, greedy) == want
    engine = LLMEngine(model, block_size=4, num_blocks=96, max_num_batched_tokens=9, speculative_tokens=k)
    assert run(engine, prompts, arrive, greedy) == want
    assert engine.cache.prefix_hits > 0
    stats = engine.spec_stats()
    assert stats is not None and len(stats.proposed) == k
    assert 0 < stats.accepted[0] < stats.proposed[0], "both accepted and rejected drafts"
    assert stats.emitted == stats.verify_steps + sum(stats.accepted)
    assert all(a <= p for a, p in zip(stats.accepted, stats.proposed, strict=True))
    assert engine.num_steps < plain.num_steps, (engine.num_steps, plain.num_steps)
    tight = LLMEngine(model, block_size=4, num_blocks=12, max_num_batched_tokens=64, speculative_tokens=k)
    assert run(tight, prompts, [0] * len(prompts), greedy) == want
    assert tight.scheduler.num_preemptions > 0


@pytest.mark.parametrize("mixer", ["window", "mla"])
def test_speculative_greedy_with_a_sliding_window_and_mla(mixer: str) -> None:
    """Rollback of rejected drafts in a sliding-window cache and a latent (MLA) cache, main and draft caches."""
    model = build(2, mixer=mixer, scale=50.0)
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    prompts = prompts_for((7, 15, 2), seed=2)
    want = [reference(model, p, greedy.max_tokens) for p in prompts]
    engine = LLMEngine(model, block_size=4, num_blocks=64, max_num_batched_tokens=9, speculative_tokens=3)
    assert run(engine, prompts, [0, 1, 1], greedy) == want
    stats = engine.spec_stats()
    assert stats is not None and 0 < sum(stats.accepted) < sum(stats.proposed)


def test_speculative_beside_stop_tokens_penalties_logprobs_and_the_context_end() -> None:
    """Drafting and non-drafting requests share steps; a stop token inside accepted drafts ends the output where
    the plain engine ends it; ``max_model_len`` caps the drafts; logprobs are the plain engine's."""
    model = build(2)
    prompts = prompts_for((7, 19, 1, 12, 5), seed=3)
    stop = reference(model, prompts[1], 12)[5]
    params = [
        SamplingParams(max_tokens=12, temperature=0.0),
        SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop,)),
        SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.2),
        SamplingParams(max_tokens=12, temperature=0.0, logprobs=2),
        SamplingParams(max_tokens=40, temperature=0.0),
    ]

    def outputs(engine: LLMEngine) -> list[Any]:
        ids = {engine.add_request(p, q): i for i, (p, q) in enumerate(zip(prompts, params, strict=True))}
        done = {}
        while engine.has_unfinished():
            done.update({ids[o.request_id]: o for o in engine.step() if o.finished})
        assert engine.cache.all_free()
        return [(o.token_ids, o.finish_reason, o.logprobs) for o in (done[i] for i in range(len(prompts)))]

    plain = outputs(LLMEngine(model, block_size=4, num_blocks=64, max_model_len=30))
    engine = LLMEngine(model, block_size=4, num_blocks=64, max_model_len=30, speculative_tokens=3)
    got = outputs(engine)
    assert [(t, r) for t, r, _ in got] == [(t, r) for t, r, _ in plain]
    logprobs, want = torch.tensor(got[3][2]), torch.tensor(plain[3][2])  # other batch shapes: rounding only
    assert got[0][2] is None and float((logprobs - want).norm() / want.norm()) < 1e-5
    assert plain[1][1] == "stop" and len(plain[1][0]) == 6 and len(plain[4][0]) == 25
    stats = engine.spec_stats()
    assert stats is not None and sum(stats.accepted) > 0


def test_speculative_random_model_and_abort() -> None:
    """A model whose drafts are nearly always wrong still decodes exactly; an abort frees the draft caches."""
    model = build(2, good=False)
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    prompts = prompts_for((5, 13, 2), seed=4)
    engine = LLMEngine(model, block_size=4, num_blocks=64, speculative_tokens=2)
    assert run(engine, prompts, [0, 1, 2], greedy) == [reference(model, p, 8) for p in prompts]
    request_id = engine.add_request(prompts[1], SamplingParams(max_tokens=20, temperature=0.0))
    for _ in range(4):
        engine.step()
    assert engine.speculator is not None and engine.speculator.drafts(request_id)[0]
    engine.abort(request_id)
    assert engine.cache.all_free() and all(c.all_free() for c in engine.speculator.caches)


def test_mtp_model_without_speculation_keeps_mtp_layers_out_of_the_cache() -> None:
    """The MTP depths' layers are not in the main cache: prefix caching and static decode serve such a model."""
    model = build(2)
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    prompts = prompts_for((9, 3), seed=6)
    prompts.append([*prompts[0][:8], 7])
    want = [reference(model, p, greedy.max_tokens) for p in prompts]
    engine = LLMEngine(model, block_size=4, num_blocks=32, max_model_len=64, static_decode=True)
    assert sorted(engine.cache.layers) == [0, 1]
    assert run(engine, prompts, [0, 0, 3], greedy) == want
    assert engine.cache.prefix_hits > 0


def test_speculative_tokens_is_checked() -> None:
    with pytest.raises(UserError, match="no MTP depths"):
        LLMEngine(build(0, good=False), num_blocks=8, speculative_tokens=2)
    with pytest.raises(UserError, match="speculative_tokens = -1"):
        LLMEngine(build(1), num_blocks=8, speculative_tokens=-1)


@pytest.mark.parametrize("mixer", ["gqa", "window", "mla"])
def test_static_speculation_equals_eager_on_gpt(mixer: str) -> None:
    """Static-shape verify and draft steps (what CUDA graphs capture) on mcore's ``gpt``: the tokens and the
    acceptance counters of eager speculation and the full forward's argmax. The MTP projections read the hidden
    states too (the "good" build's ``[I | 0]`` ignores them, which would hide a wrong hidden-state row)."""
    model = build(2, mixer=mixer)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for module in model.mtp:
            module.proj.weight[:, HIDDEN:] = 0.3 * torch.randn(HIDDEN, HIDDEN, generator=gen)
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    prompts = prompts_for((7, 13, 2, 9), seed=4)
    prompts.append([*prompts[1][:12], 5])  # 3 full blocks shared with prompt 1: a prefix-cache hit
    want = [reference(model, p, greedy.max_tokens) for p in prompts]
    kwargs: dict[str, Any] = dict(block_size=4, num_blocks=96, max_model_len=64, speculative_tokens=2)
    eager = LLMEngine(model, **kwargs)
    static = LLMEngine(model, static_decode=True, **kwargs)
    for engine in (eager, static):
        assert run(engine, prompts, [0, 0, 0, 0, 4], greedy) == want
    eager_stats, static_stats = eager.spec_stats(), static.spec_stats()
    assert eager_stats is not None and static_stats is not None
    assert (static_stats.proposed, static_stats.accepted) == (eager_stats.proposed, eager_stats.accepted)
    assert 0 < sum(static_stats.accepted) < sum(static_stats.proposed), "both accepted and rejected drafts"


def chi_square_bound(df: int) -> float:
    """The chi-square value a ``df``-degree statistic exceeds with probability about 1e-4 (Wilson-Hilferty)."""
    z = 3.719
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_speculative_sampling_matches_the_model_distribution() -> None:
    vocab, temperature, samples = 6, 4.0, 3000
    model = build(1, vocab=vocab, scale=100.0)
    prompt = [1, 4, 2, 5, 3]
    with torch.no_grad():  # exact p(y1, y2, y3 | prompt) from the full forward
        grid = torch.cartesian_prod(*[torch.arange(vocab)] * 2)  # (V^2, 2)
        rows = torch.cat([torch.tensor(prompt).expand(len(grid), -1), grid], dim=1)
        logp = torch.log_softmax(model(rows).double() / temperature, dim=-1)  # (V^2, P + 2, V)
        p1 = logp[0, len(prompt) - 1]  # (V,)
        p2 = logp[::vocab, len(prompt)]  # (V, V): y1 -> y2 (rows with grid[:, 0] == y1 first)
        p3 = logp[:, len(prompt) + 1].view(vocab, vocab, vocab)  # y1, y2 -> y3
        exact = (p1[:, None, None] + p2[:, :, None] + p3).exp().flatten()  # (V^3,)
    engine = LLMEngine(model, block_size=4, num_blocks=1024, max_num_seqs=256, speculative_tokens=2, seed=0)
    for i in range(samples):
        engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=temperature, seed=1000 + i))
    counts = torch.zeros(vocab**3, dtype=torch.float64)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                y1, y2, y3, _ = out.token_ids  # y2, y3 from two drafts (or a residual draw)
                counts[(y1 * vocab + y2) * vocab + y3] += 1
    stats = engine.spec_stats()
    assert stats is not None and all(0 < a < p for a, p in zip(stats.accepted, stats.proposed, strict=True))
    expected = exact * samples
    big = expected >= 5  # pool the rare cells
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expect = torch.cat([expected[big], expected[~big].sum()[None]])
    chi2 = float(((observed - expect) ** 2 / expect).sum())
    assert chi2 < chi_square_bound(len(observed) - 1), (chi2, len(observed))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_speculative_on_cuda(dtype: torch.dtype) -> None:
    """On CUDA (Triton decode kernel in the plain engine, the prefill path for verification): fp32 greedy output
    equals the plain engine's; bf16 runs, drafts are accepted, and every block comes back."""
    model = build(2).to("cuda", dtype)
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    prompts = prompts_for((7, 19, 1, 12, 30), seed=9)
    kwargs: dict[str, Any] = {"block_size": 16, "num_blocks": 64, "max_num_batched_tokens": 64}
    spec = LLMEngine(model, speculative_tokens=3, **kwargs)
    got = run(spec, prompts, [0, 0, 1, 2, 2], greedy)
    stats = spec.spec_stats()
    assert stats is not None and sum(stats.accepted) > 0
    if dtype == torch.float32:
        assert got == run(LLMEngine(model, **kwargs), prompts, [0, 0, 1, 2, 2], greedy)
    sampled = SamplingParams(max_tokens=16, temperature=0.8, seed=3)
    assert all(len(t) == 16 for t in run(spec, prompts, [0] * len(prompts), sampled))
