"""The SSD references: the sequential recurrence against hand-checked cases, the chunked form against it.

The chunked form in fp32 is compared with the recurrence in fp64 (forward, final states and the gradient
of every input), over chunk sizes that do and do not divide the segments, rows and packed documents.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from ssm_cases import SCAN_NAMES as NAMES
from ssm_cases import rel, scan_inputs

from mcore_ssm.mamba2_reference import discretize_dt, ssd_chunked, ssd_sequential


def inputs(
    batch: int, seq: int, heads: int, head_dim: int, groups: int, d_state: int, states: int | None, seed: int = 0
) -> dict[str, Any]:
    return {
        k: v.double() for k, v in scan_inputs(batch, seq, heads, head_dim, groups, d_state, states, seed=seed).items()
    }


def run(fn, args: dict[str, torch.Tensor], dtype: torch.dtype, **kwargs):  # type: ignore[no-untyped-def]
    """Forward and the gradient of a fixed random functional of ``(y, final_state)`` w.r.t. every input."""
    leaves = {k: v.detach().to(dtype).clone().requires_grad_(True) for k, v in args.items()}
    y, state = fn(**leaves, **kwargs)
    g = torch.Generator().manual_seed(123)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    ws = torch.randn(state.shape, generator=g, dtype=torch.float64).to(dtype)
    ((y * wy).sum() + (state * ws).sum()).backward()
    return y, state, {k: v.grad for k, v in leaves.items()}


def test_one_token_is_the_closed_form() -> None:
    a = inputs(1, 1, 2, 3, 1, 4, states=1)
    y, state = ssd_sequential(**a)
    dt = torch.nn.functional.softplus(a["dt"] + a["dt_bias"])[0, 0]  # (h,)
    expect_state = torch.exp(dt * a["A"])[:, None, None] * a["initial_state"][0] + (
        dt[:, None, None] * a["x"][0, 0][..., None] * a["B"][0, 0, 0][None, None, :]
    )
    expect_y = expect_state @ a["C"][0, 0, 0] + a["D"][:, None] * a["x"][0, 0]
    assert rel(state[0], expect_state) < 1e-12
    assert rel(y[0, 0], expect_y) < 1e-12


def test_sequential_state_carries_over_a_split() -> None:
    a = inputs(2, 23, 4, 3, 2, 5, states=2)
    y, state = ssd_sequential(**a)
    head = {k: (v[:, :9] if v.ndim >= 3 and k != "initial_state" else v) for k, v in a.items()}
    tail = {k: (v[:, 9:] if v.ndim >= 3 and k != "initial_state" else v) for k, v in a.items()}
    y1, s1 = ssd_sequential(**head)
    y2, s2 = ssd_sequential(**{**tail, "initial_state": s1})
    assert rel(torch.cat([y1, y2], dim=1), y) < 1e-12
    assert rel(s2, state) < 1e-12


@pytest.mark.parametrize(("chunk", "seq"), [(1, 29), (4, 29), (4, 32), (7, 29), (16, 32), (64, 29)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_sequential_rows(chunk: int, seq: int, with_state: bool) -> None:
    a = inputs(2, seq, 4, 3, 2, 5, states=2 if with_state else None)
    y_ref, s_ref, g_ref = run(ssd_sequential, a, torch.float64)
    y, s, grads = run(ssd_chunked, a, torch.float32, chunk_size=chunk)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel(y, y_ref) < 1e-5
    assert rel(s, s_ref) < 1e-5
    for name in g_ref:
        assert rel(grads[name], g_ref[name]) < 1e-5, name


@pytest.mark.parametrize("chunk", [3, 8, 64])
def test_chunked_equals_sequential_packed(chunk: int) -> None:
    # documents: one empty, one crossing the row end (cut there), one shorter than a chunk
    cu = torch.tensor([0, 5, 5, 20, 45, 47, 60], dtype=torch.int32)
    a = inputs(2, 30, 4, 3, 1, 6, states=None)
    y_ref, s_ref, g_ref = run(ssd_sequential, a, torch.float64, cu_seqlens=cu)
    y, s, grads = run(ssd_chunked, a, torch.float32, cu_seqlens=cu, chunk_size=chunk)
    assert s.shape == (6, 4, 3, 6)  # segments: [0,5) [5,20) [20,30) [30,45) [45,47) [47,60)
    assert rel(y, y_ref) < 1e-5
    assert rel(s, s_ref) < 1e-5
    for name in g_ref:
        assert rel(grads[name], g_ref[name]) < 1e-5, name


def test_chunked_packed_with_initial_states_equals_sequential() -> None:
    cu = torch.tensor([0, 1, 12, 40, 41], dtype=torch.int32)  # one row, the engine's packed step
    a = inputs(1, 41, 4, 2, 2, 3, states=4)
    y_ref, s_ref, g_ref = run(ssd_sequential, a, torch.float64, cu_seqlens=cu)
    y, s, grads = run(ssd_chunked, a, torch.float32, cu_seqlens=cu, chunk_size=8)
    assert rel(y, y_ref) < 1e-5
    assert rel(s, s_ref) < 1e-5
    for name in NAMES:
        assert rel(grads[name], g_ref[name]) < 1e-5, name


@pytest.mark.parametrize("fn", [ssd_sequential, ssd_chunked])
def test_packed_equals_each_document_alone(fn) -> None:  # type: ignore[no-untyped-def]
    cu = torch.tensor([0, 7, 26, 33], dtype=torch.int32)
    a = inputs(1, 33, 2, 3, 1, 4, states=3)
    y, s = fn(**a, cu_seqlens=cu)
    for d in range(3):
        lo, hi = int(cu[d]), int(cu[d + 1])
        alone = {k: (v[:, lo:hi] if k not in ("A", "D", "dt_bias", "initial_state") else v) for k, v in a.items()}
        alone["initial_state"] = a["initial_state"][d : d + 1]
        y_d, s_d = fn(**alone)
        assert rel(y[:, lo:hi], y_d) < 1e-12
        assert rel(s[d : d + 1], s_d) < 1e-12


def test_chunked_documents_never_mix_gradients() -> None:
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)  # the boundary falls inside the second chunk of 8
    a = inputs(1, 24, 2, 2, 1, 3, states=None)
    x = a["x"].clone().requires_grad_(True)
    y, s = ssd_chunked(**{**a, "x": x}, cu_seqlens=cu, chunk_size=8)
    (y[:, 10:].sum() + s[1].sum()).backward()
    assert x.grad is not None
    assert torch.count_nonzero(x.grad[:, :10]) == 0
    assert torch.count_nonzero(x.grad[:, 10:]) > 0


def test_dt_limit_and_no_softplus() -> None:
    dt = torch.tensor([[-5.0, 0.0, 5.0]])
    out = discretize_dt(dt, torch.tensor([0.0, 0.0, 0.0]), softplus=True, limit=(0.01, 1.0))
    assert torch.allclose(out, torch.tensor([[0.01, math.log(2.0), 1.0]]))
    assert torch.equal(discretize_dt(dt.abs(), softplus=False), dt.abs())
    a = inputs(1, 12, 2, 2, 1, 3, states=None)
    a["dt"] = a["dt"].abs()
    y1, s1 = ssd_sequential(**a, dt_softplus=False, dt_limit=(0.1, 0.5))
    y2, s2 = ssd_chunked(**a, dt_softplus=False, dt_limit=(0.1, 0.5), chunk_size=4)
    assert rel(y2, y1) < 1e-12 and rel(s2, s1) < 1e-12


def test_bad_shapes_and_chunk_size_are_named() -> None:
    a = inputs(1, 8, 4, 2, 3, 3, states=None)  # 3 groups do not divide 4 heads
    with pytest.raises(ValueError, match="groups do not divide"):
        ssd_chunked(**a)
    a = inputs(1, 8, 4, 2, 2, 3, states=None)
    with pytest.raises(ValueError, match="chunk_size = 0"):
        ssd_chunked(**a, chunk_size=0)
    with pytest.raises(ValueError, match="initial_state holds 2 states for 1 rows"):
        ssd_chunked(**a, initial_state=torch.zeros(2, 4, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="dt"):
        ssd_sequential(**{**a, "dt": a["dt"][..., :3]})
