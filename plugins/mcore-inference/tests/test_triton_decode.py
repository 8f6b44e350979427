"""The Triton paged decode kernel against the torch reference on random pages (GPU): GQA groups 1/4/8, lengths
from 1 to 4k across block boundaries, tables with unused entries, a sliding window; bf16 within 1e-2 relative.
FP8 (E4M3) pages: the compiled kernel against the torch FP8 path on the same pages (bf16/fp16 queries, 1e-2),
under a CUDA graph, and chosen by the engine's ``PagedAttention`` for an FP8 cache on CUDA (the interpreter
checks the same cases at fp32 on the CPU: ``test_triton_decode_fp8.py``)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from mcore_inference.attention import PagedAttention, decode_kernel_for, paged_decode_torch
from test_triton_decode_fp8 import fp8_pages

from mcore.protocols import PagedKV

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]


def random_pages(
    lens: list[int],
    group: int,
    *,
    device: str,
    dtype: torch.dtype,
    kv_heads: int = 2,
    head_dim: int = 128,
    seed: int = 0,
) -> tuple[torch.Tensor, PagedKV]:
    """Queries ``(S, nkv * group, hd)`` and pages holding sequences of ``lens`` tokens in shuffled blocks of 16,
    tables padded with -1 to the widest plus one block."""
    gen = torch.Generator().manual_seed(seed)
    bs = 16
    need = [-(-n // bs) for n in lens]
    blocks = sum(need) + 3
    keys = torch.randn(blocks, bs, kv_heads, head_dim, generator=gen).to(device, dtype)
    values = torch.randn(blocks, bs, kv_heads, head_dim, generator=gen).to(device, dtype)
    order = torch.randperm(blocks, generator=gen).tolist()
    width = max(need) + 1
    table = torch.full((len(lens), width), -1, dtype=torch.int32)
    for i, n in enumerate(need):
        table[i, :n] = torch.tensor([order.pop() for _ in range(n)], dtype=torch.int32)
    q = torch.randn(len(lens), kv_heads * group, head_dim, generator=gen).to(device, dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return q, PagedKV(key_cache=keys, value_cache=values, block_table=table.to(device), seq_lens=lens_t.to(device))


def check_against_torch(
    device: str, group: int, lens: list[int], window: int | None, dtype: torch.dtype = torch.bfloat16
) -> None:
    """(Also run on the CPU under TRITON_INTERPRET=1 in fp16: the interpreter's bf16 ``tl.dot`` is wrong.)"""
    from mcore_inference.triton_decode import paged_decode_triton

    q, paged = random_pages(lens, group, device=device, dtype=dtype)
    scale = q.shape[-1] ** -0.5
    want = paged_decode_torch(q.float(), _as_float(paged), q.shape[-1], scale, window)
    got = paged_decode_triton(q, paged, q.shape[-1], scale, window)
    assert got.dtype == dtype and got.shape == want.shape
    rel = (got.float() - want).norm() / want.norm()
    assert rel < 1e-2, f"relative error {float(rel):.2e} (group {group}, lengths {lens}, window {window})"


def _as_float(paged: PagedKV) -> PagedKV:
    assert paged.value_cache is not None
    return PagedKV(
        key_cache=paged.key_cache.float(),
        value_cache=paged.value_cache.float(),
        block_table=paged.block_table,
        seq_lens=paged.seq_lens,
        window=paged.window,
    )


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("lens", [[1], [16, 17, 15, 33], [4096], [1, 4000, 257, 64]])
def test_triton_decode_matches_torch(group: int, lens: list[int]) -> None:
    check_against_torch("cuda", group, lens, None)


@pytest.mark.parametrize("window", [1, 100, 1000])
def test_triton_decode_with_a_window_matches_torch(window: int) -> None:
    check_against_torch("cuda", 4, [5, 1500, 3000], window)


def test_paged_attention_chooses_triton_on_cuda() -> None:
    from mcore_inference.triton_decode import paged_decode_triton

    assert decode_kernel_for(torch.device("cuda")) is paged_decode_triton
    assert decode_kernel_for(torch.device("cpu")) is paged_decode_torch
    assert PagedAttention().decode_kernel is None  # chosen per device at the first decode step


def test_triton_decode_is_capturable_in_a_cuda_graph() -> None:
    from mcore_inference.triton_decode import paged_decode_triton

    q, paged = random_pages([100, 900], 4, device="cuda", dtype=torch.bfloat16)
    want = paged_decode_triton(q, paged, q.shape[-1], 0.1, None)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_triton(q, paged, q.shape[-1], 0.1, None)
    paged.seq_lens.copy_(torch.tensor([100, 900], dtype=torch.int32))
    graph.replay()
    torch.testing.assert_close(out, want)
    paged.seq_lens.copy_(torch.tensor([50, 60], dtype=torch.int32))  # the graph reads the new lengths
    graph.replay()
    shorter = paged_decode_torch(q.float(), _as_float(paged), q.shape[-1], 0.1, None)
    assert (out.float() - shorter).norm() / shorter.norm() < 1e-2


def _fp8_on_cuda(
    lens: list[int], group: int, window: int | None, dtype: torch.dtype, head_dim: int = 128
) -> tuple[torch.Tensor, PagedKV, torch.Tensor, torch.Tensor]:
    q, paged, key_scale, value_scale = fp8_pages(lens, group, head_dim, head_dim, window, seed=len(lens) + group)
    assert paged.value_cache is not None
    on_cuda = PagedKV(
        key_cache=paged.key_cache.cuda(),
        value_cache=paged.value_cache.cuda(),
        block_table=paged.block_table.cuda(),
        seq_lens=paged.seq_lens.cuda(),
    )
    return q.to("cuda", dtype), on_cuda, key_scale.cuda(), value_scale.cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("group", "lens", "window"),
    [(1, [1], None), (4, [16, 17, 15, 33], None), (8, [1, 4000, 257, 64], None), (4, [5, 1500, 3000], 100)],
)
def test_triton_decode_over_fp8_pages_matches_the_torch_fp8_path(
    dtype: torch.dtype, group: int, lens: list[int], window: int | None
) -> None:
    from mcore_inference.triton_decode import paged_decode_triton

    q, paged, key_scale, value_scale = _fp8_on_cuda(lens, group, window, dtype)
    assert paged.key_cache.dtype == torch.float8_e4m3fn
    scales = {"key_scale": key_scale, "value_scale": value_scale}
    want = paged_decode_torch(q.float(), paged, q.shape[-1], 0.1, window, **scales)
    got = paged_decode_triton(q, paged, q.shape[-1], 0.1, window, **scales)
    assert got.dtype == dtype and got.shape == want.shape and bool(torch.isfinite(got).all())
    rel = (got.float() - want).norm() / want.norm()
    assert rel < 1e-2, f"relative error {float(rel):.2e} (group {group}, lengths {lens}, window {window})"


def test_triton_decode_over_fp8_pages_is_capturable_in_a_cuda_graph() -> None:
    from mcore_inference.triton_decode import paged_decode_triton

    q, paged, key_scale, value_scale = _fp8_on_cuda([100, 900], 4, None, torch.bfloat16)
    scales = {"key_scale": key_scale, "value_scale": value_scale}
    want = paged_decode_triton(q, paged, q.shape[-1], 0.1, None, **scales)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_triton(q, paged, q.shape[-1], 0.1, None, **scales)
    graph.replay()
    torch.testing.assert_close(out, want)
    value_scale.mul_(2)  # the graph reads the scale tensors (calibration updates them in place)
    paged.seq_lens.copy_(torch.tensor([50, 60], dtype=torch.int32))
    graph.replay()
    shorter = paged_decode_torch(q.float(), paged, q.shape[-1], 0.1, None, **scales)
    assert (out.float() - shorter).norm() / shorter.norm() < 1e-2


def test_paged_attention_decodes_an_fp8_cache_with_triton_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import mcore_inference.triton_decode as triton_decode
    from mcore_inference.engine import LLMEngine
    from mcore_inference.sampling import SamplingParams
    from toy_model import ToyLM

    calls: list[torch.dtype] = []
    kernel = triton_decode.paged_decode_triton

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(args[1].key_cache.dtype)  # type: ignore[attr-defined]
        return kernel(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_decode, "paged_decode_triton", spy)
    monkeypatch.setenv("MCORE_INFERENCE_FP8_DECODE", "triton")  # opt-in until timed on a card
    engine = LLMEngine(ToyLM().cuda(), block_size=4, num_blocks=64, kv_cache_dtype="fp8_e4m3")
    ids = [engine.add_request(p, SamplingParams(max_tokens=4, temperature=0.0)) for p in ([1, 2, 3], [4, 5, 6, 7, 8])]
    outs = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    assert sorted(outs) == sorted(ids) and all(len(o.token_ids) == 4 for o in outs.values())
    assert calls and set(calls) == {torch.float8_e4m3fn}, calls  # every decode step of every layer: FP8 pages
    assert engine.cache.all_free()
