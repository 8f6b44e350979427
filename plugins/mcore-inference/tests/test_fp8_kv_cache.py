"""FP8 KV cache (``kv_cache_dtype="fp8_e4m3"``): half the bytes per block, attention over the dequantised pages,
engine logits near the fp32-cache run, prefix caching / preemption / static decode unchanged, bad values refused.

Error bound: E4M3 keeps 3 mantissa bits, so a stored value in the normal range is off by at most half a step,
2^-4 relative. Attention output is a softmax-weighted mean of values whose keys moved by as little, so its
relative error (norm over a whole step) stays of that order; we check ``||out - ref|| / ||ref|| < 2^-4`` against
fp32 pages and ``< 1e-5`` against fp32 attention over the dequantised pages (the same numbers, no quantisation).
"""

from __future__ import annotations

import pytest
import torch
from mcore_inference.attention import PagedAttention, paged_attention_torch
from mcore_inference.cache import PagedKVCache, bytes_per_block
from mcore_inference.engine import LLMEngine, RequestOutput
from mcore_inference.kv_quant import FP8_MAX, MARGIN, calibrate, dequantize, quantize
from mcore_inference.llm import LLM
from mcore_inference.sampling import SamplingParams
from mcore_inference.static_decode import StaticStep
from toy_model import ToyLM

from mcore.errors import UserError
from mcore.protocols import AttentionCacheSpec, BlockContext

FP8 = "fp8_e4m3"
E4M3_REL = 2.0**-4  # half a step of a 3-bit mantissa
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert err == err, "NaN"
    return err


def _prompts(seed: int, lengths: list[int], vocab: int = 50) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p in prompts]
    done: dict[int, RequestOutput] = {}
    for _ in range(500):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if not engine.has_unfinished():
            break
    assert engine.cache.all_free(), "blocks or slots still held after every request finished"
    return [done[i].token_ids for i in ids]


# ----- refusals and sizes -----


@pytest.mark.parametrize("bad", ["fp8_e5m2", "int8", "", None, torch.float8_e4m3fn])
def test_unknown_kv_cache_dtype_is_refused_in_one_line(bad: object) -> None:
    spec = AttentionCacheSpec(kv_heads=2, head_dim=8, value_dim=8, dtype=torch.bfloat16)
    with pytest.raises(UserError, match=r"^kv_cache_dtype = .*: must be one of 'auto', 'fp8', 'fp8_e4m3'$"):
        PagedKVCache({0: spec}, num_blocks=4, kv_cache_dtype=bad)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="kv_cache_dtype"):
        LLMEngine(ToyLM(), num_blocks=8, kv_cache_dtype=bad)  # type: ignore[arg-type]


def test_fp8_halves_bytes_per_block_and_doubles_the_blocks_of_a_budget() -> None:
    specs = {
        0: AttentionCacheSpec(kv_heads=2, head_dim=8, value_dim=6, dtype=torch.bfloat16),
        1: AttentionCacheSpec(kv_heads=1, head_dim=12, value_dim=None, dtype=torch.bfloat16),  # latent (MLA)
    }
    bf16 = bytes_per_block(specs, 16)
    assert bf16 == 16 * (2 * (8 + 6) + 12) * 2
    assert bytes_per_block(specs, 16, FP8) * 2 == bf16
    fp32 = {0: AttentionCacheSpec(kv_heads=2, head_dim=8, value_dim=8, dtype=torch.float32)}
    assert bytes_per_block(fp32, 16, FP8) * 4 == bytes_per_block(fp32, 16)
    budget = 10 * bf16
    plain = PagedKVCache(specs, block_size=16, memory_bytes=budget)
    small = PagedKVCache(specs, block_size=16, memory_bytes=budget, kv_cache_dtype=FP8)
    assert (plain.num_blocks, small.num_blocks) == (10, 20)
    for index in specs:
        pages = small.layers[index].key_pages  # type: ignore[union-attr]
        assert pages.dtype == torch.float8_e4m3fn and pages.shape[0] == 20
    assert small.kv_scales(1) is not None and small.kv_scales(1)[1] is None  # type: ignore[index]
    assert plain.kv_scales(0) is None


def test_engine_refuses_fp8_with_an_attention_that_does_not_dequantise() -> None:
    with pytest.raises(UserError, match="kv_cache_dtype = 'fp8_e4m3' needs the engine's PagedAttention"):
        LLMEngine(ToyLM(), num_blocks=8, kv_cache_dtype=FP8, attention=object())


# ----- quantisation -----


def test_quantize_round_trip_within_half_a_step() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 16, generator=gen) * torch.tensor([0.01, 1.0, 300.0])[:, None]  # (N, nkv, d)
    scale = torch.empty(3)
    calibrate(x, scale)
    torch.testing.assert_close(scale, x.abs().amax(dim=(0, 2)) * (MARGIN / FP8_MAX), rtol=0, atol=0)
    back = dequantize(quantize(x, scale, torch.float8_e4m3fn), scale, torch.float32)
    normal = x.abs() / scale[:, None] >= 2.0**-6  # E4M3's smallest normal; below it steps are absolute
    assert float(((back - x).abs() / x.abs())[normal].max()) <= E4M3_REL
    assert _rel(back, x) < E4M3_REL
    assert bool(((back - x).abs() <= scale[:, None] * 2.0**-10)[~normal].all())  # half E4M3's subnormal step
    big = quantize(x * 10 * MARGIN, scale, torch.float8_e4m3fn).float()  # beyond the margin: saturates, no NaN
    assert not big.isnan().any() and float(big.abs().max()) == FP8_MAX
    zero = torch.empty(2)
    calibrate(torch.zeros(4, 2, 8), zero)
    assert zero.tolist() == [1.0, 1.0]


# ----- attention over FP8 pages -----


@pytest.mark.parametrize(("window", "latent"), [(None, False), (5, False), (None, True)])
def test_paged_attention_over_fp8_pages(window: int | None, latent: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    nh, nkv, hd, hdv = 4, 1 if latent else 2, 16, 8
    spec = AttentionCacheSpec(
        kv_heads=nkv, head_dim=hd, value_dim=None if latent else hdv, dtype=torch.float32, window=window
    )
    fp8 = PagedKVCache({3: spec}, block_size=4, num_blocks=32, kv_cache_dtype=FP8)
    ref = PagedKVCache({3: spec}, block_size=4, num_blocks=32)
    lengths = {0: 11, 1: 3, 2: 10}
    keys = {s: torch.randn(n, nkv, hd, generator=gen) for s, n in lengths.items()}
    values = {s: torch.randn(n, nkv, hdv, generator=gen) for s, n in lengths.items()}
    backend = PagedAttention()
    done = dict.fromkeys(lengths, 0)
    for chunks in ({0: 6, 1: 1, 2: 9}, {1: 2, 0: 4}, {0: 1, 2: 1}):  # prefill chunks, then a decode step
        ids, counts = list(chunks), list(chunks.values())
        k = torch.cat([keys[s][done[s] : done[s] + c] for s, c in chunks.items()])
        v = None if latent else torch.cat([values[s][done[s] : done[s] + c] for s, c in chunks.items()])
        q = torch.randn(1, sum(counts), nh, hd, generator=gen)
        cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
        outs = []
        for cache in (fp8, ref):
            cache.schedule(ids, counts)
            cache.append(3, k, v)
            ctx = BlockContext(cu_seqlens=cu, max_seqlen=max(counts), kv_cache=cache, layer_index=3)
            value = k[None, ..., :hdv] if latent else v[None]  # type: ignore[index]
            outs.append(backend(q, k[None], value, ctx=ctx, scale=0.5, window=window)[0])
        got, want = outs
        scales = fp8.kv_scales(3)
        assert scales is not None
        key_scale, value_scale = scales
        assert (value_scale is None) == latent
        paged = fp8.gather(3)
        assert paged.key_cache.dtype == torch.float8_e4m3fn
        plain = type(paged)(  # the same pages dequantised to fp32: the quantisation is the only difference
            key_cache=dequantize(paged.key_cache, key_scale, torch.float32),
            value_cache=None if latent else dequantize(paged.value_cache, value_scale, torch.float32),  # type: ignore[arg-type]
            block_table=paged.block_table,
            seq_lens=paged.seq_lens,
            window=paged.window,
        )
        exact = paged_attention_torch(q[0], plain, cu, max(counts), hdv, 0.5, window)
        assert _rel(got, exact) < 1e-5
        err = _rel(got, want)
        assert 0 < err < E4M3_REL, f"fp8 vs fp32 pages: {err}"
        for s, c in chunks.items():
            done[s] += c


def test_paged_attention_refuses_a_custom_kernel_over_fp8_pages() -> None:
    spec = AttentionCacheSpec(kv_heads=1, head_dim=4, value_dim=4, dtype=torch.float32)
    cache = PagedKVCache({0: spec}, block_size=4, num_blocks=4, kv_cache_dtype=FP8)
    cache.schedule([0], [2])
    k = torch.randn(2, 1, 4)
    cache.append(0, k, k)
    backend = PagedAttention(kernel=lambda *args: args[0])
    ctx = BlockContext(kv_cache=cache, layer_index=0)
    with pytest.raises(UserError, match="the cache is FP8"):
        backend(torch.randn(1, 2, 1, 4), k[None], k[None], ctx=ctx, scale=1.0, window=None)


def _held(cache: PagedKVCache, seq: int) -> torch.Tensor:
    """The dequantised keys ``(L,)`` (channel 0) sequence ``seq`` holds in layer 0."""
    cache.schedule([seq], [1])  # gather needs a step; the layer has not appended yet
    paged, (key_scale, _) = cache.gather(0), cache.kv_scales(0)  # type: ignore[misc]
    keys = dequantize(paged.key_cache, key_scale, torch.float32)  # (P, bs, 1, 2)
    bs, length = cache.block_size, int(paged.seq_lens[0])
    return torch.stack([keys[int(paged.block_table[0, p // bs]), p % bs, 0, 0] for p in range(length)])


def test_fp8_rollback_into_a_shared_block_copies_its_bytes() -> None:
    spec = AttentionCacheSpec(kv_heads=1, head_dim=2, value_dim=2, dtype=torch.float32)
    cache = PagedKVCache({0: spec}, block_size=4, num_blocks=8, kv_cache_dtype=FP8)

    def fill(seq: int, tokens: list[int], start: int = 0) -> None:  # each token's key/value: its id
        cache.schedule([seq], [len(tokens) - start])
        kv = torch.tensor(tokens[start:], dtype=torch.float32)[:, None, None].expand(-1, 1, 2).contiguous()
        cache.append(0, kv, kv)

    prompt = list(range(1, 10))
    cache.start_sequence(0, prompt)
    fill(0, prompt)
    cache.cache_prefix(0, prompt)
    assert cache.start_sequence(1, [*prompt[:8], 60]) == 8  # shares sequence 0's two full blocks
    shared = _held(cache, 1)
    assert _rel(shared, torch.tensor(prompt[:8], dtype=torch.float32)) < E4M3_REL
    cache.rollback(0, 3)  # sequence 0 keeps 6 tokens: its second block, shared, becomes partial (copied)
    fill(0, [*prompt[:6], 20, 21, 22], start=6)  # within the scales' margin (4x the first amax, 9)
    assert torch.equal(_held(cache, 1), shared), "the shared block was written through another sequence"
    held = _held(cache, 0)
    assert torch.equal(held[:6], shared[:6]), "the copy holds other bytes than the shared block"
    assert _rel(held[6:], torch.tensor([20.0, 21.0, 22.0])) < E4M3_REL
    for seq in (1, 0):
        cache.release(seq)
    assert cache.all_free()


# ----- the engine -----


def _logits_per_step(model: ToyLM, kv_cache_dtype: str, prompts: list[list[int]]) -> tuple[list, list[torch.Tensor]]:
    steps: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda _m, _a, out: steps.append(out.detach()[0].clone()))
    try:
        engine = LLMEngine(model, block_size=4, num_blocks=64, kv_cache_dtype=kv_cache_dtype)
        tokens = _run(engine, prompts, SamplingParams(max_tokens=4, temperature=0.0))
    finally:
        hook.remove()
    return tokens, steps


def _tame(model: ToyLM, factor: float = 0.3) -> ToyLM:
    """Scale the layers' and head's weights: ToyLM's own (std 0.5) give attention scores of std ~4 in the first
    layer and more deeper (logits ~4e4), near-hard attention that any perturbation of the keys (fp8 or a GEMM
    reordering) flips to another key; at 0.3 the scores have std ~0.4, as in a trained model."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.startswith(("embed", "pos")):
                param.mul_(factor)
    return model


def test_engine_logits_with_fp8_kv_near_the_fp32_cache_run() -> None:
    model = _tame(ToyLM())
    prompts = _prompts(0, [5, 17, 9])
    want_tokens, want = _logits_per_step(model, "auto", prompts)
    got_tokens, got = _logits_per_step(model, FP8, prompts)
    assert got_tokens == want_tokens, "greedy tokens of the first decode steps diverged"
    assert len(got) == len(want) == 4  # one prefill step, three decode steps (rows: the batch's sequences)
    for step, (g, w) in enumerate(zip(got, want)):
        err = _rel(g, w)
        assert 0 < err < E4M3_REL, f"step {step}: relative logits error {err}"


def _calibrated(model: ToyLM, **kwargs: object) -> LLMEngine:
    """An FP8 engine whose scales the same first request fixed (so that two engines store the same bytes)."""
    engine = LLMEngine(model, block_size=4, kv_cache_dtype=FP8, **kwargs)  # type: ignore[arg-type]
    _run(engine, _prompts(9, [12]), SamplingParams(max_tokens=1, temperature=0.0))
    return engine


def test_fp8_prefix_cache_hit_gives_the_tokens_of_a_miss() -> None:
    model = _tame(ToyLM())
    shared = _prompts(2, [19])[0]
    prompts = [[*shared, 3, 4], [*shared, 5], shared]
    warm = _calibrated(model, num_blocks=64)
    cold = _calibrated(model, num_blocks=64, enable_prefix_caching=False)
    first = _run(warm, prompts[:1], GREEDY)
    hits = warm.cache.prefix_hits
    later = _run(warm, prompts[1:], GREEDY)
    assert warm.cache.prefix_hits - hits == 8, "the later prompts should each hit the 4 shared blocks"
    assert first + later == [_run(cold, [p], GREEDY)[0] for p in prompts]


def test_fp8_preemption_gives_the_tokens_of_no_preemption() -> None:
    model = _tame(ToyLM())
    prompts = _prompts(3, [9, 13, 6, 11])
    params = SamplingParams(max_tokens=10, temperature=0.0)
    roomy, tight = _calibrated(model, num_blocks=64), _calibrated(model, num_blocks=8)
    assert _run(tight, prompts, params) == _run(roomy, prompts, params)
    assert tight.scheduler.num_preemptions > 0, "the tiny pool should have forced a preemption"


def test_fp8_static_decode_gives_the_eager_tokens() -> None:
    model = _tame(ToyLM())
    prompts = _prompts(4, [3, 8, 13])
    eager = _calibrated(model, num_blocks=48)
    static = _calibrated(model, num_blocks=48, static_decode=True, graph_batch_sizes=(2, 4))
    assert _run(static, prompts, GREEDY) == _run(eager, prompts, GREEDY)


def test_a_static_step_before_any_eager_append_freezes_the_scales_at_one() -> None:
    static = LLMEngine(_tame(ToyLM()), block_size=4, num_blocks=16, kv_cache_dtype=FP8, static_decode=True)
    _run(static, [[7]], SamplingParams(max_tokens=2, temperature=0.0))  # a 1-token prompt: a static step
    for index in static.cache.layers:
        scales = static.cache.kv_scales(index)
        assert scales is not None and all(s.tolist() == [1.0, 1.0] for s in scales if s is not None)
        assert static.cache.layers[index].calibrated  # type: ignore[union-attr]


# ----- saturated values -----


def test_saturated_values_are_counted_per_layer() -> None:
    """The first append fixes the scales (amax x 4 / 448): nothing saturates; a later one with values beyond 4x
    that amax counts each of them (keys and values), per layer, and nothing else."""
    spec = AttentionCacheSpec(kv_heads=2, head_dim=8, value_dim=4, dtype=torch.float32)
    cache = PagedKVCache({0: spec, 1: spec}, block_size=4, num_blocks=8, kv_cache_dtype=FP8)
    assert PagedKVCache({0: spec}, block_size=4, num_blocks=8).fp8_clipped() is None  # not FP8
    gen = torch.Generator().manual_seed(3)
    first_k, first_v = torch.randn(6, 2, 8, generator=gen), torch.randn(6, 2, 4, generator=gen)
    cache.schedule([0], [6])
    for layer in (0, 1):
        cache.append(layer, first_k, first_v)
    assert cache.fp8_clipped() == {0: 0, 1: 0}
    k, v = first_k[:3].clone(), first_v[:3].clone()  # within the margin: stored unclipped
    k[0, 1, 2] = 4.5 * MARGIN * first_k[:, 1].abs().max()  # beyond it: saturate
    k[2, 0, 7] = -9 * MARGIN * first_k[:, 0].abs().max()
    v[1, 0, 0] = 5 * MARGIN * first_v[:, 0].abs().max()
    cache.schedule([0], [3])
    cache.append(0, k, v)
    cache.append(1, first_k[:3], first_v[:3])
    assert cache.fp8_clipped() == {0: 3, 1: 0}
    held = dequantize(cache.gather(0).key_cache, cache.kv_scales(0)[0], torch.float32)  # type: ignore[index]
    assert bool(torch.isfinite(held).all())  # saturated at +-448 x scale, never NaN
    cache.release(0)


def test_padding_rows_of_a_static_step_are_not_counted() -> None:
    spec = AttentionCacheSpec(kv_heads=1, head_dim=4, value_dim=4, dtype=torch.float32)
    cache = PagedKVCache({0: spec}, block_size=4, num_blocks=4, kv_cache_dtype=FP8, scratch_block=True)
    cache.schedule([0], [2])
    cache.append(0, torch.ones(2, 1, 4), torch.ones(2, 1, 4))  # scales: 4 / 448
    cache.schedule([0], [1])
    rows = 3
    step = StaticStep(
        rows=rows,
        tokens=torch.zeros(rows, dtype=torch.int64),
        positions=torch.zeros(rows, dtype=torch.int64),
        slots=torch.full((rows,), cache.num_blocks * cache.block_size, dtype=torch.int64),  # padding: scratch
        seq_lens=torch.ones(rows, dtype=torch.int32),
        block_table=torch.full((rows, 1), -1, dtype=torch.int32),
        cu_seqlens=torch.arange(rows + 1, dtype=torch.int32),
        logit_rows=torch.arange(rows, dtype=torch.int64),
    )
    _, _, slots = cache.begin_static_decode(step)
    step.slots[0] = slots[0]
    big = torch.full((rows, 1, 4), 100.0)  # 25x the calibration chunk: every value saturates
    cache.append(0, big, big)
    assert cache.fp8_clipped() == {0: 8}  # the real row's 4 keys and 4 values; not the 2 padding rows
    cache.release(0)
    assert cache.all_free()


def test_llm_passes_kv_cache_dtype_to_its_engine() -> None:
    model = _tame(ToyLM())
    prompts = _prompts(7, [6, 10])
    llm = LLM(model, block_size=4, num_blocks=32, kv_cache_dtype=FP8)
    assert llm.engine.cache.kv_cache_dtype == FP8 and llm.engine.cache.kv_scales(0) is not None
    got = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    engine = LLMEngine(model, block_size=4, num_blocks=32, kv_cache_dtype=FP8)  # same first batch: same scales
    assert got == _run(engine, prompts, GREEDY)
    assert llm.engine.cache.all_free()


@pytest.mark.gpu
def test_fp8_cuda_graphs_give_the_eager_tokens_on_gpu() -> None:
    model = _tame(ToyLM()).cuda()
    prompts = _prompts(5, [3, 8, 13, 21])
    eager = _calibrated(model, num_blocks=64)
    graphs = _calibrated(model, num_blocks=64, cuda_graphs=True, graph_batch_sizes=(2, 4))
    assert _run(graphs, prompts, GREEDY) == _run(eager, prompts, GREEDY)
