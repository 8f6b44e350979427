"""The gated delta rule references (``mcore_ssm.gdn_reference``): recurrence vs the formula written out,
chunked WY form vs recurrence (forward and every gradient), packed documents, the decode step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ssm_cases import gdn_strong_decay_errors

from mcore_ssm.gdn_reference import chunk_gated_delta_rule, gated_delta_rule_step, recurrent_gated_delta_rule


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def inputs(batch, seq, hk, hv, dk, dv, *, states=0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, seq, hk, dk, generator=g, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(batch, seq, hk, dk, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(batch, seq, hv, dv, generator=g, dtype=dtype)
    gate = -F.softplus(torch.randn(batch, seq, hv, generator=g, dtype=dtype)) * 0.5  # log decay < 0
    beta = torch.sigmoid(torch.randn(batch, seq, hv, generator=g, dtype=dtype))
    out = [q, k, v, gate, beta]
    if states:
        out.append(torch.randn(states, hv, dk, dv, generator=g, dtype=dtype) * 0.3)
    return [t.requires_grad_() for t in out]


def written_out(q, k, v, g, beta, state, scale):
    """One sequence ``(L, ...)`` head by head, token by token, exactly the issue's formula."""
    hk, hv = q.shape[1], v.shape[1]
    outs = torch.zeros(v.shape, dtype=v.dtype)
    final = state.clone()
    for h in range(hv):
        s = state[h].clone()
        for t in range(v.shape[0]):
            kt, qt = k[t, h // (hv // hk)], q[t, h // (hv // hk)] * scale
            s = torch.exp(g[t, h]) * s
            u = beta[t, h] * (v[t, h] - s.T @ kt)
            s = s + torch.outer(kt, u)
            outs[t, h] = s.T @ qt
        final[h] = s
    return outs, final


def test_recurrence_is_the_formula():
    q, k, v, g, beta, s0 = inputs(2, 5, 1, 2, 3, 4, states=2)
    out, final = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    for r in range(2):
        ref, ref_s = written_out(q[r], k[r], v[r], g[r], beta[r], s0[r], 3**-0.5)
        assert rel(out[r], ref) < 1e-12 and rel(final[r], ref_s) < 1e-12


def grads(fn, args, probe_out, probe_state):
    out, final = fn(*args)
    loss = (out * probe_out).sum() + (final * probe_state).sum()
    return out, final, torch.autograd.grad(loss, args)


@pytest.mark.parametrize(("chunk", "seq"), [(8, 29), (16, 16), (64, 150)])
def test_chunked_equals_recurrence_with_gradients(chunk, seq):
    args = inputs(2, seq, 2, 4, 8, 6, states=2, seed=chunk)
    gen = torch.Generator().manual_seed(9)
    probe_out = torch.randn(2, seq, 4, 6, generator=gen, dtype=torch.float64)
    probe_state = torch.randn(2, 4, 8, 6, generator=gen, dtype=torch.float64)

    def run(fn, **kw):
        return lambda q, k, v, g, b, s: fn(q, k, v, g, b, initial_state=s, output_final_state=True, **kw)

    out, final, got = grads(run(chunk_gated_delta_rule, chunk_size=chunk), args, probe_out, probe_state)
    ref, ref_final, want = grads(run(recurrent_gated_delta_rule), args, probe_out, probe_state)
    assert rel(out, ref) < 1e-10 and rel(final, ref_final) < 1e-10
    for name, a, e in zip(("q", "k", "v", "g", "beta", "initial_state"), got, want, strict=True):
        assert rel(a, e) < 1e-10, name


def test_chunked_fp32_within_1e5_of_fp64_recurrence():
    args64 = inputs(1, 200, 2, 2, 16, 16, states=1, seed=3)
    args32 = [a.detach().float().requires_grad_() for a in args64]
    gen = torch.Generator().manual_seed(4)
    probe_out = torch.randn(1, 200, 2, 16, generator=gen, dtype=torch.float64)
    probe_state = torch.randn(1, 2, 16, 16, generator=gen, dtype=torch.float64)

    def run(fn):
        return lambda q, k, v, g, b, s: fn(q, k, v, g, b, initial_state=s, output_final_state=True)

    out, final, got = grads(run(chunk_gated_delta_rule), args32, probe_out.float(), probe_state.float())
    assert out.dtype == torch.float32 and final.dtype == torch.float32
    ref, ref_final, want = grads(run(recurrent_gated_delta_rule), args64, probe_out, probe_state)
    assert rel(out.double(), ref) < 1e-5 and rel(final.double(), ref_final) < 1e-5
    for name, a, e in zip(("q", "k", "v", "g", "beta", "initial_state"), got, want, strict=True):
        assert rel(a.double(), e) < 1e-5, name


@pytest.mark.parametrize("gate_min", [-30.0, -100.0])
def test_chunked_fp32_with_strong_decay_equals_fp64_recurrence(gate_min):
    """Gates down to -30 / -100 a token: finite, and ``dg`` within 1e-5 (with ``G_i - G_j`` formed as a difference
    of cumulative sums its gradient cancelled to 3e-5 relative at -30)."""
    errors = gdn_strong_decay_errors(gate_min, rule="chunked")
    assert all(e < 1e-5 for e in errors), errors


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule, recurrent_gated_delta_rule])
def test_packed_equals_each_document_alone(fn):
    cu = torch.tensor([0, 5, 6, 20, 31, 40], dtype=torch.int32)  # in 2 rows of 20: none crosses a row end
    q, k, v, g, beta, s0 = inputs(2, 20, 1, 2, 4, 3, states=5, seed=5)
    kw = {"chunk_size": 4} if fn is chunk_gated_delta_rule else {}
    out, final = fn(q, k, v, g, beta, initial_state=s0, cu_seqlens=cu, output_final_state=True, **kw)
    flat = [t.flatten(0, 1) for t in (q, k, v, g, beta)]
    outs, finals = [], []
    for d in range(5):
        lo, hi = int(cu[d]), int(cu[d + 1])
        one, last = fn(*(t[None, lo:hi] for t in flat), initial_state=s0[d : d + 1], output_final_state=True, **kw)
        outs.append(one[0])
        finals.append(last[0])
    assert rel(out, torch.cat(outs).view(out.shape)) < 1e-12
    assert rel(final, torch.stack(finals)) < 1e-12
    probe = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad((out * probe).sum(), (q, k, v, g, beta, s0))
    want = torch.autograd.grad((torch.cat(outs).view(out.shape) * probe).sum(), (q, k, v, g, beta, s0))
    for a, e in zip(got, want, strict=True):
        assert rel(a, e) < 1e-12


def test_documents_crossing_rows_restart_without_state():
    cu = torch.tensor([0, 3, 13, 16])  # document 2 runs from row 0 into row 1: it restarts at the row end
    q, k, v, g, beta = inputs(2, 8, 1, 1, 4, 4, seed=6)
    out, _ = chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu, chunk_size=2)
    ref, _ = recurrent_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 3, 8, 13, 16]))
    assert rel(out, ref) < 1e-12


def test_step_equals_recurrence():
    q, k, v, g, beta, s0 = inputs(3, 6, 2, 4, 5, 3, states=3, seed=7)
    ref, ref_final = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    state, outs = s0.detach().float(), []
    for t in range(6):
        o, state = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o)
    assert state.dtype == torch.float32
    assert rel(torch.stack(outs, 1), ref) < 1e-6 and rel(state.double(), ref_final) < 1e-6


def test_bad_shapes_are_one_line():
    q, k, v, g, beta = (t.detach() for t in inputs(1, 4, 3, 4, 2, 2))
    with pytest.raises(ValueError, match="hk dividing hv"):
        chunk_gated_delta_rule(q, k, v, g, beta)
    q, k, v, g, beta = (t.detach() for t in inputs(1, 4, 2, 4, 2, 2))
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gated_delta_rule(q, k, v, g, beta, initial_state=torch.zeros(1, 4, 2, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=0)
