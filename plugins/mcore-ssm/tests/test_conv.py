"""Causal depthwise conv1d (``mcore_ssm.conv``) against a per-document loop; packing and conv state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mcore_ssm.conv import causal_conv1d, causal_conv1d_step
from mcore_ssm.packing import documents


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def naive(x, weight, bias, state):
    """One sequence ``x (L, C)`` after ``state (C, K - 1)``: the sum written out token by token."""
    width = weight.shape[1]
    full = torch.cat([state.T, x])  # (K - 1 + L, C)
    out = []
    for t in range(x.shape[0]):
        window = full[t : t + width]  # (K, C)
        out.append((window.T * weight).sum(-1) + (0 if bias is None else bias))
    return torch.stack(out), full[-(width - 1) :].T


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_rows_equal_loop(with_state, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if with_bias else None
    s = torch.randn(2, 5, 3, generator=g, dtype=torch.float64) if with_state else None
    y, final = causal_conv1d(x, w, b, initial_state=s, activation="none", return_final_state=True)
    for r in range(2):
        ref_y, ref_s = naive(x[r], w, b, s[r] if s is not None else torch.zeros(5, 3, dtype=torch.float64))
        assert rel(y[r], ref_y) < 1e-12 and rel(final[r], ref_s) < 1e-12


@pytest.mark.parametrize("with_state", [False, True])
def test_packed_equals_each_document_alone(with_state):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 2, 3, 9, 14, 18], dtype=torch.int32)  # lengths 2, 1 (< K - 1), 6, 5, 4; none crosses a row
    s = torch.randn(5, 6, 3, generator=g, dtype=torch.float64, requires_grad=True) if with_state else None
    y, final = causal_conv1d(x, w, b, cu_seqlens=cu, initial_state=s, return_final_state=True)
    flat = x.reshape(18, 6)
    outs, finals = [], []
    for d in range(5):
        lo, hi = int(cu[d]), int(cu[d + 1])
        state = s[d] if s is not None else torch.zeros(6, 3, dtype=torch.float64)
        alone, last = causal_conv1d(flat[None, lo:hi], w, b, initial_state=state[None], return_final_state=True)
        outs.append(alone[0])
        finals.append(last[0])
    ref_y, ref_s = torch.cat(outs).view(2, 9, 6), torch.stack(finals)
    assert rel(y, ref_y) < 1e-12 and rel(final, ref_s) < 1e-12
    probe = torch.randn(2, 9, 6, generator=g, dtype=torch.float64)
    probe_s = torch.randn(5, 6, 3, generator=g, dtype=torch.float64)
    inputs = [x, w, b] + ([s] if s is not None else [])
    got = torch.autograd.grad((y * probe).sum() + (final * probe_s).sum(), inputs)
    want = torch.autograd.grad((ref_y * probe).sum() + (ref_s * probe_s).sum(), inputs)
    for a, e in zip(got, want, strict=True):
        assert rel(a, e) < 1e-12


def test_documents_cut_at_row_ends():
    cu = torch.tensor([0, 3, 3, 12, 16])  # an empty document; one continuing into row 2
    seg = documents(2, 8, cu, torch.device("cpu"))
    assert seg.starts.tolist() == [0, 3, 8, 12] and seg.lengths.tolist() == [3, 5, 4, 4] and seg.max_len == 5
    x = torch.randn(2, 8, 3, dtype=torch.float64)
    w = torch.randn(3, 4, dtype=torch.float64)
    y, _ = causal_conv1d(x, w, cu_seqlens=cu)
    ref = torch.cat(
        [causal_conv1d(x.reshape(1, 16, 3)[:, lo:hi], w)[0] for lo, hi in [(0, 3), (3, 8), (8, 12), (12, 16)]], 1
    )
    assert rel(y, ref.view(2, 8, 3)) < 1e-12


def test_step_equals_whole_sequence():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 10, 4, generator=g)
    w, b = torch.randn(4, 4, generator=g), torch.randn(4, generator=g)
    y, _ = causal_conv1d(x, w, b)
    prefix, state = causal_conv1d(x[:, :6], w, b, return_final_state=True)
    steps = [prefix]
    for t in range(6, 10):
        out, state = causal_conv1d_step(x[:, t], state, w, b)
        steps.append(out[:, None])
    assert rel(torch.cat(steps, 1), y) < 1e-6
    assert torch.equal(state, x[:, -3:].transpose(1, 2))


def test_silu_and_conv1d_module_agree():
    conv = torch.nn.Conv1d(5, 5, 4, groups=5, padding=3, dtype=torch.float64)
    x = torch.randn(2, 11, 5, dtype=torch.float64)
    ref = F.silu(conv(x.transpose(1, 2))[..., :11]).transpose(1, 2)
    y, _ = causal_conv1d(x, conv.weight[:, 0], conv.bias)
    assert rel(y, ref) < 1e-12


def test_bad_input_is_one_line():
    x, w = torch.randn(1, 4, 3), torch.randn(3, 4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        causal_conv1d(x, w, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="states for"):
        causal_conv1d(x, w, cu_seqlens=torch.tensor([0, 2, 4]), initial_state=torch.zeros(3, 3, 3))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, activation="gelu")
    with pytest.raises(ValueError, match="channels"):
        causal_conv1d(torch.randn(1, 4, 2), w)
