"""The fused Triton paths against the torch references, in Triton's CPU interpreter (a child process).

What runs there (``TRITON_INTERPRET=1``, CUDA hidden; the interpreter is chosen when Triton decorates a kernel, so
never in the pytest process): the SwiGLU kernel on ``(M, 2F)`` rows (plain and clamped, ragged against its block,
zero rows); the combine's ``gather_sum`` alone across several column blocks; each dispatcher's permute and combine by the known permutation (dropped slots, an expert with no rows,
NaN in ``allgatherv``'s padding rows), run twice for bitwise-equal gradients; the ``moe`` block with every fused
path on against all off. fp32 within 1e-5 of a float64 run of the torch reference (forward and every gradient),
bf16 within 1e-2. Skipped where Triton is not installed (not a dependency: only the CUDA path imports it).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from mcore_testing.interpreted import interpreted_lines

SWIGLU_CASES = [(37, 40, None), (37, 40, 0.7), (3, 1100, None), (5, 24, 1.5), (0, 16, None)]  # (M, F, limit)
DISPATCHERS = ("allgather", "alltoall", "allgatherv")
TOP_K = {"allgather": 3, "alltoall": 3, "allgatherv": 3, "allgather-top1": 1}  # dispatch cases: slots per token
BLOCK_CASES: list[tuple[str, dict[str, Any]]] = [
    ("allgather", {}),
    ("alltoall-clamped", {"dispatcher": "alltoall", "swiglu_limit": 0.05}),
    ("allgatherv-capacity", {"dispatcher": "allgatherv", "capacity_factor": 1.0}),
    ("chunked", {"chunk_tokens": 7}),
]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp64; NaN where either is not finite (NaN never passes)."""
    a, b = out.detach().double(), ref.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@contextmanager
def _fused(on: bool) -> Iterator[None]:
    """Every ``use_triton`` of the package answers ``on`` (the interpreter runs on CPU tensors)."""
    import mcore_moe.dispatcher as dispatcher
    import mcore_moe.swiglu as swiglu

    saved = dispatcher.use_triton, swiglu.use_triton
    dispatcher.use_triton = swiglu.use_triton = lambda x, kernel="auto": on  # type: ignore[assignment]
    try:
        yield
    finally:
        dispatcher.use_triton, swiglu.use_triton = saved


def _swiglu_records() -> list[dict[str, Any]]:
    from mcore_moe.swiglu import swiglu, swiglu_reference

    out = []
    for m, f, limit in SWIGLU_CASES:
        g = torch.Generator().manual_seed(m * 1000 + f)
        x = torch.randn(m, 2 * f, generator=g) * 1.5
        dy = torch.randn(m, f, generator=g)
        rec: dict[str, Any] = {"name": f"swiglu-{m}x{f}-{limit}", "rows": m}
        for dtype in (torch.float32, torch.bfloat16):
            xin = x.to(dtype).clone().requires_grad_()
            x64 = xin.detach().double().requires_grad_()  # the same (rounded) inputs: a clamp bites in both alike
            ref = swiglu_reference(x64, limit)
            ref.backward(dy.to(dtype).double())
            y = swiglu(xin, limit, kernel="triton")
            y.backward(dy.to(dtype))
            assert xin.grad is not None and x64.grad is not None
            key = "fp32" if dtype == torch.float32 else "bf16"
            rec[f"shape_{key}"] = list(y.shape) == [m, f] and list(xin.grad.shape) == [m, 2 * f] and y.dtype == dtype
            if m:
                rec[f"rel_{key}"] = _rel(y, ref)
                rec[f"rel_grad_{key}"] = _rel(xin.grad, x64.grad)
        out.append(rec)
    return out


def _routing(n: int, e: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (expert ``e - 1`` never chosen: no rows), a few slots dropped (-1)."""
    g = torch.Generator().manual_seed(5)
    experts = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(n)])
    experts[::4, -1] = -1
    weights = torch.rand(n, k, generator=g).to(dtype)
    return experts, weights


def _dispatch_run(case: str, dtype: torch.dtype, fused: bool) -> list[torch.Tensor]:
    """The dispatcher's ``combine(f(dispatch(x)))`` and the gradients of hidden and weights."""
    from mcore.protocols import RoutingDecision
    from mcore_moe.block import DISPATCHERS as MADE

    n, h, e, k = 23, 40, 6, TOP_K[case]
    name = case.split("-")[0]
    g = torch.Generator().manual_seed(7)
    hidden = (torch.randn(n, h, generator=g)).to(dtype).requires_grad_()
    grad = torch.randn(n, h, generator=g).to(dtype)
    experts, weights = _routing(n, e, k, dtype)
    weights.requires_grad_()
    dispatcher = MADE[name](None, e)
    with _fused(fused):
        result = dispatcher.dispatch(hidden, RoutingDecision(experts=experts, weights=weights, num_experts=e))
        rows = torch.tanh(result.tokens) * 1.5 + result.tokens  # (M, H): an expert's stand-in
        real = int(result.tokens_per_expert.sum())
        if real < rows.shape[0]:  # allgatherv's padding rows: what a grouped GEMM may leave there
            rows = torch.cat([rows[:real], torch.full_like(rows[real:], float("nan"))])
        out = dispatcher.combine(rows, result)
    out.backward(grad)
    assert hidden.grad is not None and weights.grad is not None
    return [out, hidden.grad, weights.grad]


def _dispatch_records() -> list[dict[str, Any]]:
    out = []
    for name in TOP_K:
        ref = _dispatch_run(name, torch.float64, fused=False)
        rec: dict[str, Any] = {"name": f"dispatch-{name}"}
        for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            first, again = _dispatch_run(name, dtype, fused=True), _dispatch_run(name, dtype, fused=True)
            rec[f"rels_{key}"] = [_rel(a, b) for a, b in zip(first, ref)]
            rec[f"same_twice_{key}"] = all(torch.equal(a, b) for a, b in zip(first, again))
        rec["rels_torch_fp32"] = [_rel(a, b) for a, b in zip(_dispatch_run(name, torch.float32, fused=False), ref)]
        out.append(rec)
    return out


GATHER_CASES = [(9, 3, 40), (9, 3, 1100), (5, 1, 2100)]  # (tokens, slots, H): one, two (ragged) and three blocks


def _gather_sum_records() -> list[dict[str, Any]]:
    """``gather_sum`` (the combine's kernel) against its definition in fp64: each token's rows by position, dropped
    slots (-1) skipped, weighted and unweighted, H across several of the kernel's column blocks."""
    from mcore_moe.permute_triton import gather_sum

    out = []
    for n, k, h in GATHER_CASES:
        g = torch.Generator().manual_seed(n * 100 + h)
        rows = torch.randn(n * k, h, generator=g)
        positions = torch.randperm(n * k, generator=g).view(n, k)
        positions[::3, -1] = -1  # dropped slots
        weights = torch.rand(n, k, generator=g)
        picked = rows.double()[positions.clamp_min(0)] * (positions >= 0).unsqueeze(-1)  # (N, K, H)
        rec: dict[str, Any] = {"name": f"gather-sum-{n}x{k}x{h}"}
        for weighted in (True, False):
            want = (picked * weights.double().unsqueeze(-1)).sum(1) if weighted else picked.sum(1)
            got = gather_sum(rows, positions, weights if weighted else None)
            rec[f"shape_ok_{weighted}"] = list(got.shape) == [n, h] and got.dtype == rows.dtype
            rec[f"rel_{weighted}"] = _rel(got, want)
        out.append(rec)
    return out


def _block_run(kw: dict[str, Any], dtype: torch.dtype, fused: bool) -> list[torch.Tensor]:
    """The ``moe`` block's output and the gradients of its input and every parameter."""
    from mcore.protocols import AuxLosses, BlockContext
    from mcore_moe.block import MoE, MoEConfig

    config = MoEConfig(num_experts=4, top_k=2, moe_ffn_hidden_size=24, num_shared_experts=1, **kw)
    block = MoE(config, hidden_size=16)
    block.reset_parameters(torch.Generator().manual_seed(3))
    block = block.to(dtype)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 11, 16, generator=g).to(dtype).requires_grad_()
    with _fused(fused):
        out = block(x, BlockContext(aux_losses=AuxLosses()))
        out.backward(torch.randn(out.shape, generator=g).to(dtype))  # inside: chunks recompute in backward
    assert x.grad is not None
    return [out, x.grad, *(p.grad for p in block.parameters() if p.grad is not None)]


def _block_records() -> list[dict[str, Any]]:
    out = []
    for name, kw in BLOCK_CASES:
        ref = _block_run(kw, torch.float64, fused=False)
        fused = _block_run(kw, torch.float32, fused=True)
        out.append(
            {"name": f"block-{name}", "count": [len(fused), len(ref)], "rels": [_rel(a, b) for a, b in zip(fused, ref)]}
        )
    return out


def interpreted_main() -> None:
    """(Child process, ``TRITON_INTERPRET=1``.) One JSON line per case."""
    torch.set_num_threads(1)
    for rec in _swiglu_records() + _gather_sum_records() + _dispatch_records() + _block_records():
        print(json.dumps(rec))


def _run_child(entry: Callable[[], None]) -> list[dict[str, Any]]:
    return interpreted_lines(__file__, entry.__name__)


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in _run_child(interpreted_main)}


@needs_triton
def test_swiglu_kernel_matches_the_reference(records: dict[str, dict[str, Any]]) -> None:
    names = [f"swiglu-{m}x{f}-{limit}" for m, f, limit in SWIGLU_CASES]
    assert all(name in records for name in names), sorted(records)
    for name in names:
        r = records[name]
        assert r["shape_fp32"] and r["shape_bf16"], r
        if r["rows"]:
            assert r["rel_fp32"] < 1e-5 and r["rel_grad_fp32"] < 1e-5, r  # NaN fails
            assert r["rel_bf16"] < 1e-2 and r["rel_grad_bf16"] < 1e-2, r


@needs_triton
def test_gather_sum_matches_its_definition_across_column_blocks(records: dict[str, dict[str, Any]]) -> None:
    for n, k, h in GATHER_CASES:
        r = records[f"gather-sum-{n}x{k}x{h}"]
        assert r["shape_ok_True"] and r["shape_ok_False"], r
        assert r["rel_True"] < 1e-5 and r["rel_False"] < 1e-5, r  # NaN fails


@needs_triton
@pytest.mark.parametrize("name", list(TOP_K))
def test_permute_and_combine_match_the_reference(records: dict[str, dict[str, Any]], name: str) -> None:
    r = records[f"dispatch-{name}"]
    assert len(r["rels_fp32"]) == 3 and all(rel < 1e-5 for rel in r["rels_fp32"]), r  # out, d hidden, d weights
    assert len(r["rels_bf16"]) == 3 and all(rel < 1e-2 for rel in r["rels_bf16"]), r
    assert all(rel < 1e-5 for rel in r["rels_torch_fp32"]), r  # the reference path itself
    assert r["same_twice_fp32"] and r["same_twice_bf16"], r  # deterministic backward


@needs_triton
@pytest.mark.parametrize("name", [name for name, _ in BLOCK_CASES])
def test_block_with_every_fused_path_matches_the_reference(records: dict[str, dict[str, Any]], name: str) -> None:
    r = records[f"block-{name}"]
    assert r["count"][0] == r["count"][1] >= 7, r  # output, input grad, router, 3 experts, 3 shared
    assert all(rel < 1e-5 for rel in r["rels"]), r
