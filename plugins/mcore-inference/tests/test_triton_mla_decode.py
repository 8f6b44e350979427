"""The Triton absorbed MLA decode kernel compiled (GPU) and its opt-in wiring (CPU).

GPU (``gpu``): DeepSeek-shaped latent pages (one key head of 576 = 512 + 64 channels, values the first 512) against
the torch decode path in float64: 16 and 128 query heads, lengths 1 to 4k across split-K slices, a window, bf16 /
fp16 queries within 1e-2, fp32 within 1e-5 (IEEE ``tl.dot``), FP8 (E4M3) latent pages, and a CUDA graph replay
reading new lengths. CPU: the opt-in (``MCORE_INFERENCE_MLA_DECODE=triton``) picks torch unless on CUDA with the
variable set. The interpreter checks the kernel at fp32 on the CPU (``test_triton_mla_decode_interpreted.py``).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from mcore_inference.attention import MLA_DECODE_ENV, latent_decode_kernel_for, paged_decode_torch
from test_triton_mla_decode_interpreted import Case

from mcore.protocols import PagedKV


def _cuda_case(group: int, lens: list[int], window: int | None, fp8: bool) -> Case:
    case = Case(1, group, lens, window, 576, 512, fp8, None, seed=len(lens) + group)
    p = case.paged
    case.paged = PagedKV(
        key_cache=p.key_cache.cuda(), value_cache=None, block_table=p.block_table.cuda(), seq_lens=p.seq_lens.cuda()
    )
    case.q = case.q.cuda()
    if case.key_scale is not None:
        case.key_scale = case.key_scale.cuda()
    return case


@pytest.mark.parametrize("group", [16, 128])
@pytest.mark.parametrize(
    ("lens", "window"), [([1], None), ([16, 17, 300], None), ([1, 4000, 257], None), ([5, 3000], 100)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_mla_decode_matches_torch(
    group: int, lens: list[int], window: int | None, dtype: torch.dtype, fp8: bool
) -> None:
    from mcore_inference.triton_mla_decode import paged_mla_decode_triton

    case = _cuda_case(group, lens, window, fp8)
    want = case.run(paged_decode_torch, case.q.double(), case.pages_as(torch.float64), torch.float64)
    got = case.run(paged_mla_decode_triton, case.q.to(dtype), case.pages_as(dtype))
    assert got.dtype == dtype and got.shape == want.shape and bool(torch.isfinite(got).all())
    rel = float((got.double() - want).norm() / want.norm())
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), f"relative error {rel:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_mla_decode_is_capturable_in_a_cuda_graph() -> None:
    from mcore_inference.triton_mla_decode import paged_mla_decode_triton

    case = _cuda_case(16, [100, 900], None, False)
    q, paged = case.q.bfloat16(), case.pages_as(torch.bfloat16)
    want = paged_mla_decode_triton(q, paged, 512, 0.1, None)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_mla_decode_triton(q, paged, 512, 0.1, None)
    graph.replay()
    torch.testing.assert_close(out, want)
    paged.seq_lens.copy_(torch.tensor([50, 60], dtype=torch.int32))  # the graph reads the new lengths
    graph.replay()
    shorter = paged_decode_torch(q.double(), case.pages_as(torch.float64), 512, 0.1, None)
    assert float((out.double() - shorter).norm() / shorter.norm()) < 1e-2


def test_latent_decode_stays_on_torch_unless_opted_in_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MLA_DECODE_ENV, raising=False)
    assert latent_decode_kernel_for(torch.device("cuda")) is paged_decode_torch  # not opted in (no import needed)
    monkeypatch.setenv(MLA_DECODE_ENV, "triton")
    assert latent_decode_kernel_for(torch.device("cpu")) is paged_decode_torch  # the CPU keeps torch
