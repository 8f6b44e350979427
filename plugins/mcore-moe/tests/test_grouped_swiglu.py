"""The Triton grouped GEMM with the SwiGLU in its epilogue (``grouped_swiglu_triton``) against float64 references.

CPU: in Triton's interpreter (a child process, ``TRITON_INTERPRET=1``, CUDA hidden, as ``test_fused_interpreted``)
with 16 x 16 x 16 tiles: ragged groups with empty experts, M, F and H not multiples of the tile, padding rows
holding NaN (zeros out, nothing leaks), plain and clamped (the clamped case on values whose GEMMs are exact in
bf16: the interpreter truncates fp32 -> bf16 stores where the GPU rounds, which moves a pre-activation near the
limit across it and so where the clamp's gradient is cut), the backward on ``torch._grouped_mm`` (the CPU takes it)
and on the reference's autograd: forward and every gradient within 1e-5 (fp32) / 1e-2 (bf16) of a float64
per-expert reference; the ``moe`` block and the static inference experts with the kernel chosen against the torch
path. The choice itself (``MCORE_MOE_GROUPED_GEMM``) in-process. GPU (``-m gpu``): ``GroupedSwiGLU`` with the
kernel against the ``torch._grouped_mm`` path, bf16 (1e-2) and fp32 (1e-5); the static inference experts (bf16).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mcore.precision.grouped import grouped_linear_reference
from mcore_moe.kernel_choice import GROUPED_GEMM_ENV, grouped_gemm
from mcore_testing.interpreted import interpreted_records

# (name, sizes per expert, M rows (past the sizes: padding), H, F, limit)
CASES: list[tuple[str, list[int], int, int, int, float | None]] = [
    ("ragged", [5, 0, 19, 2, 0], 30, 40, 24, None),
    ("ragged-clamped", [5, 0, 19, 2, 0], 30, 40, 24, 0.7),
    ("one-expert-exact", [32], 32, 32, 16, None),
    ("all-padding", [0, 0, 0], 7, 24, 8, 1.0),
]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp64; NaN where either is not finite (NaN never passes)."""
    a, b = out.detach().double(), ref.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _reference(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, sizes: torch.Tensor, limit: float | None
) -> torch.Tensor:
    """Per-expert ``silu(x gate[e].T) * (x up[e].T)`` (clamped), padding rows zero."""
    g, u = grouped_linear_reference(x, gate, sizes), grouped_linear_reference(x, up, sizes)  # (M, F) each
    if limit is not None:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return F.silu(g) * u


def _kernel_records() -> list[dict[str, Any]]:
    from mcore_moe.grouped_swiglu_triton import grouped_swiglu

    out = []
    for name, sizes_list, m, h, f, limit in CASES:
        real = sum(sizes_list)
        e = len(sizes_list)
        sizes = torch.tensor(sizes_list)
        gen = torch.Generator().manual_seed(m * 100 + h)
        if limit is None:
            x = torch.randn(m, h, generator=gen)
            gate, up = torch.randn(e, f, h, generator=gen) * 0.3, torch.randn(e, f, h, generator=gen) * 0.3
        else:  # values whose GEMMs are exact in bf16 (x in {-1, 0, 1}, weights k / 8, |k| <= 2, H <= 64)
            x = torch.randint(-1, 2, (m, h), generator=gen).float()
            gate, up = (torch.randint(-2, 3, (e, f, h), generator=gen) / 8.0 for _ in range(2))
        x[real:] = float("nan")  # padding rows: never read
        dy = torch.randn(m, f, generator=gen)
        for dtype, key, grouped_mm in (
            (torch.float32, "fp32-mm", True),
            (torch.float32, "fp32-ref", False),
            (torch.bfloat16, "bf16-mm", True),
        ):
            xs, gs, us = (t.to(dtype).clone().requires_grad_() for t in (x, gate, up))
            act = grouped_swiglu(xs, gs, us, sizes, limit, grouped_mm=grouped_mm)  # (M, F)
            act.backward(dy.to(dtype))
            x64, g64, u64 = (t.detach().double().requires_grad_() for t in (xs, gs, us))
            ref = _reference(x64, g64, u64, sizes, limit)
            ref[:real].backward(dy.to(dtype)[:real].double())
            assert xs.grad is not None and gs.grad is not None and us.grad is not None
            rec: dict[str, Any] = {"name": f"{name}-{key}", "real": real}
            rec["shape"] = list(act.shape) == [m, f] and act.dtype == dtype
            rec["padding_zero"] = bool((act[real:] == 0).all())
            if real:
                pairs = [(act[:real], ref[:real]), (xs.grad[:real], x64.grad[:real])]  # type: ignore[index]
                pairs += [(gs.grad, g64.grad), (us.grad, u64.grad)]
                rec["rels"] = [_rel(a, b) for a, b in pairs]  # act, d x, d gate, d up
            out.append(rec)
    return out


@contextmanager
def _chosen(kernel: str) -> Iterator[None]:
    """The experts (training and inference paths) take ``kernel`` as their grouped GEMM (CPU: interpreter)."""
    import mcore_moe.experts as experts
    import mcore_moe.inference as inference

    saved = experts.grouped_gemm, inference.grouped_gemm
    experts.grouped_gemm = inference.grouped_gemm = lambda x, environ=None: kernel  # type: ignore[assignment]
    try:
        yield
    finally:
        experts.grouped_gemm, inference.grouped_gemm = saved


def _block_run(kw: dict[str, Any], dtype: torch.dtype, kernel: str) -> list[torch.Tensor]:
    from mcore.protocols import AuxLosses, BlockContext
    from mcore_moe.block import MoE, MoEConfig

    config = MoEConfig(num_experts=5, top_k=2, moe_ffn_hidden_size=20, **kw)
    block = MoE(config, hidden_size=24)
    block.reset_parameters(torch.Generator().manual_seed(3))
    block = block.to(dtype)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 24, generator=gen).to(dtype).requires_grad_()
    with _chosen(kernel):
        out = block(x, BlockContext(aux_losses=AuxLosses()))
        out.backward(torch.randn(out.shape, generator=gen).to(dtype))
    assert x.grad is not None
    return [out, x.grad, *(p.grad for p in block.parameters() if p.grad is not None)]


def _block_records() -> list[dict[str, Any]]:
    out = []
    for name, kw in (("plain", {}), ("clamped", {"swiglu_limit": 0.05})):
        ref = _block_run(kw, torch.float64, "torch")
        got = _block_run(kw, torch.float32, "triton")
        out.append(
            {"name": f"block-{name}", "count": [len(got), len(ref)], "rels": [_rel(a, b) for a, b in zip(got, ref)]}
        )
    return out


def _static_record() -> dict[str, Any]:
    """The inference path's static experts over a padded buffer (NaN padding), kernel against the torch path."""
    from mcore_moe.experts import GroupedSwiGLU
    from mcore_moe.inference import static_experts

    experts = GroupedSwiGLU(4, 24, 20, swiglu_limit=0.5)
    gen = torch.Generator().manual_seed(6)
    for p in experts.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.3
    rows = torch.randn(26, 24, generator=gen)
    rows[21:] = float("nan")
    sizes = torch.tensor([9, 0, 4, 8])
    with torch.no_grad(), _chosen("triton"):
        got = static_experts(experts, rows, sizes)
    with torch.no_grad():
        ref = static_experts(experts.double(), rows.double(), sizes)
    return {"name": "static", "rel": _rel(got[:21], ref[:21]), "shape": list(got.shape) == [26, 24]}


def interpreted_main() -> None:
    """(Child process, ``TRITON_INTERPRET=1``.) One JSON line per case."""
    torch.set_num_threads(1)
    for rec in [*_kernel_records(), *_block_records(), _static_record()]:
        print(json.dumps(rec))


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, Any]]:
    return interpreted_records(__file__)


@needs_triton
@pytest.mark.parametrize("key", ["fp32-mm", "fp32-ref", "bf16-mm"])
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_kernel_forward_and_gradients_match_float64(records: dict[str, dict[str, Any]], case: str, key: str) -> None:
    r = records[f"{case}-{key}"]
    assert r["shape"] and r["padding_zero"], r
    tol = 1e-2 if key.startswith("bf16") else 1e-5
    if r["real"]:
        assert len(r["rels"]) == 4 and all(rel < tol for rel in r["rels"]), r  # act, d x, d gate, d up; NaN fails


@needs_triton
@pytest.mark.parametrize("name", ["plain", "clamped"])
def test_block_with_the_kernel_matches_float64(records: dict[str, dict[str, Any]], name: str) -> None:
    r = records[f"block-{name}"]
    assert r["count"][0] == r["count"][1] >= 5, r  # output, input grad, router, gate, up, down
    assert all(rel < 1e-5 for rel in r["rels"]), r


@needs_triton
def test_static_inference_experts_with_the_kernel(records: dict[str, dict[str, Any]]) -> None:
    r = records["static"]
    assert r["shape"] and r["rel"] < 1e-5, r


def test_the_choice_is_torch_unless_asked_and_names_a_bad_value() -> None:
    x = torch.zeros(2, 2)
    assert grouped_gemm(x, {}) == "torch"
    assert grouped_gemm(x, {GROUPED_GEMM_ENV: "torch"}) == "torch"
    assert grouped_gemm(x, {GROUPED_GEMM_ENV: "triton"}) == "torch"  # CPU tensor: Triton does not run here
    with pytest.raises(ValueError, match=f"{GROUPED_GEMM_ENV} = 'cutlass'; allowed: torch, triton"):
        grouped_gemm(x, {GROUPED_GEMM_ENV: "cutlass"})


# -- CUDA ------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("limit", [None, 1.0])
def test_cuda_kernel_matches_the_torch_path(
    dtype: torch.dtype, limit: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GroupedSwiGLU`` with ``MCORE_MOE_GROUPED_GEMM=triton`` against the default path (``torch._grouped_mm`` +
    the SwiGLU kernel in bf16; the reference GEMMs in fp32): output and every gradient, padding rows past 1024."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mcore_moe.experts import GroupedSwiGLU

    sizes = torch.tensor([300, 0, 17, 700, 5, 2], device="cuda")  # 1024 rows; 1100 - 1024 padding
    experts = GroupedSwiGLU(6, 256, 192, swiglu_limit=limit)
    for i, p in enumerate(experts.parameters()):
        p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(20 + i)) * 0.06
    experts = experts.to("cuda", dtype)
    rows = torch.randn(1100, 256, generator=torch.Generator().manual_seed(21)).to("cuda", dtype)
    grad = torch.randn(1024, 256, generator=torch.Generator().manual_seed(22)).to("cuda", dtype)

    def run(kernel: str) -> list[torch.Tensor]:
        monkeypatch.setenv(GROUPED_GEMM_ENV, kernel)
        assert grouped_gemm(rows) == kernel
        experts.zero_grad()
        x = rows.clone().requires_grad_()
        out = experts(x, sizes)[:1024]
        out.backward(grad)
        return [out, x.grad[:1024], *(p.grad.clone() for p in experts.parameters())]  # type: ignore[index,union-attr]

    got, ref = run("triton"), run("torch")
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for a, b in zip(got, ref):
        assert _rel(a, b) < tol


@pytest.mark.gpu
def test_cuda_static_inference_experts_with_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inference path's static experts (no grad: no pre-activation written) with the kernel against the
    ``torch._grouped_mm`` path, bf16, over a padded buffer whose padding holds NaN."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mcore_moe.experts import GroupedSwiGLU
    from mcore_moe.inference import static_experts

    experts = GroupedSwiGLU(8, 256, 128, swiglu_limit=1.0)
    for i, p in enumerate(experts.parameters()):
        p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(30 + i)) * 0.06
    experts = experts.to("cuda", torch.bfloat16)
    sizes = torch.tensor([40, 0, 0, 131, 7, 0, 64, 1], device="cuda")  # 243 rows of 300
    rows = torch.randn(300, 256, generator=torch.Generator().manual_seed(31)).to("cuda", torch.bfloat16)
    rows[243:] = float("nan")
    out = {}
    for kernel in ("triton", "torch"):
        monkeypatch.setenv(GROUPED_GEMM_ENV, kernel)
        with torch.no_grad():
            out[kernel] = static_experts(experts, rows, sizes)[:243]
    assert _rel(out["triton"], out["torch"]) < 1e-2
