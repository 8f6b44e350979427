"""The Triton backward of the chunked gated delta rule (``mcore_ssm.gdn_triton_bwd``: the reverse state walk, and
``mcore_ssm.gdn_triton_chunk_bwd``: the per-chunk terms' gradients, all chunks in parallel) against autograd of
the torch per-chunk terms in fp64 and the fp64 recurrence, in Triton's CPU interpreter (a subprocess:
``ssm_cases.run_interpreted``); the bench's head shape in bf16 on CUDA (``gpu``).

Cases: packed documents whose last chunks are partial (70 = 64 + 6 tokens, 1 token, 79 = 64 + 15), two value heads
per q/k head, dk != dv with the value dims in blocks (80 = 32 + 32 + 16: the last part-masked), weak gates and
gates down to -30 a token (a chunk's decay reaches -1900), initial states and the final state's gradient."""

from __future__ import annotations

import pytest
import torch
from ssm_cases import bench_like_inputs, rel, run_interpreted

from mcore_ssm.gdn_reference import chunk_gated_delta_rule, recurrent_gated_delta_rule

CASES = """
import torch, torch.nn.functional as F

def leaves(gate_min, hk, hv, dk, dv, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = 150
    q = F.normalize(torch.randn(1, tokens, hk, dk, generator=gen), dim=-1)
    k = F.normalize(torch.randn(1, tokens, hk, dk, generator=gen), dim=-1)
    v = torch.randn(1, tokens, hv, dv, generator=gen)
    g = torch.rand(1, tokens, hv, generator=gen) * gate_min
    beta = torch.rand(1, tokens, hv, generator=gen)
    h0 = torch.randn(3, hv, dk, dv, generator=gen) * 0.3
    cu = torch.tensor([0, 70, 71, 150], dtype=torch.int32)
    return [t.to(dtype) if i < 3 else t for i, t in enumerate((q, k, v, g, beta))], h0, cu, gen
"""

TERMS = (
    CASES
    + """
from mcore_ssm.gdn_triton import launch_for, prepare, run_states
from mcore_ssm.gdn_triton_chunk_bwd import chunk_terms_bwd
from mcore_ssm.gdn_triton_bwd import chunk_terms_bwd_reference

def errors(gate_min, hk, hv, dk, dv):
    (q, k, v, g, beta), h0, cu, gen = leaves(gate_min, hk, hv, dk, dv)
    launch = launch_for(q, k, v, g, beta, None, h0, cu, None)
    chunks = launch.chunk_starts.numel()
    u, states, _ = run_states(launch, k, prepare(launch, k, v, g, beta, torch.float32), h0, final=False,
                              states_dtype=torch.float32)
    saved = (u, states, torch.randn(chunks, hv, dk, dv, generator=gen))  # U, S and a random dS'
    grads = (torch.randn(150, hv, dv, generator=gen), torch.randn(150, hv, dv, generator=gen))  # dO, dU
    got = chunk_terms_bwd(launch, (q, k, v, g, beta), saved, grads)
    want = chunk_terms_bwd_reference(launch, tuple(t.double() for t in (q, k, v, g, beta)), saved, grads)
    assert all(a.dtype == torch.float32 and b.dtype == torch.float64 for a, b in zip(got, want))
    return [float((a.double() - b).norm() / b.norm()) for a, b in zip(got, want)]

print(*errors(-1.0, 2, 4, 12, 80), *errors(-30.0, 2, 4, 12, 80), *errors(-0.1, 1, 1, 16, 16))
"""
)


def test_chunk_terms_kernel_equals_fp64_autograd_in_interpreter():
    """``dq, dk, dv, dg, dbeta`` of the parallel kernel vs autograd through the torch per-chunk terms in fp64 (same
    U, S, dS', dO, dU; dS' random): weak and -30 gates (two value heads per q/k head, dk 12, dv 80 in three blocks),
    and one head of dk = dv = 16."""
    errors = run_interpreted(TERMS, 15)
    assert all(e < 1e-5 for e in errors), errors


FULL = (
    CASES
    + """
from mcore_ssm.gdn_triton import gated_delta_rule_triton
from mcore_ssm.gdn_reference import recurrent_gated_delta_rule

def errors(gate_min, hk, hv, dk, dv, dtype=torch.float32):
    inputs, h0, cu, gen = leaves(gate_min, hk, hv, dk, dv, dtype)
    probe, probe_s = torch.randn(1, 150, hv, dv, generator=gen), torch.randn(3, hv, dk, dv, generator=gen)
    ours = [t.clone().requires_grad_() for t in (*inputs, h0)]
    exact = [t.detach().double().requires_grad_() for t in (*inputs, h0)]  # the same (rounded) inputs
    results = []
    for fn, args in ((gated_delta_rule_triton, ours), (recurrent_gated_delta_rule, exact)):
        out, final = fn(*args[:5], cu_seqlens=cu, initial_state=args[5], output_final_state=True)
        loss = (out.double() * probe.double()).sum() + (final.double() * probe_s.double()).sum()
        results.append([out, final, *torch.autograd.grad(loss, args)])
    assert all(a.dtype == b.dtype for a, b in zip(results[0][2:], ours))
    assert all(torch.isfinite(t).all() for t in results[0])
    return [float((a.double() - b).norm() / b.norm()) for a, b in zip(*results)]

print(*errors(-1.0, 2, 4, 12, 80), *errors(-30.0, 2, 4, 12, 80))
"""
)


@pytest.mark.slow
def test_forward_and_backward_in_interpreter_equal_fp64_recurrence():
    """The whole function in fp32 (forward, reverse walk, per-chunk terms) vs the fp64 recurrence: the output, the
    final state and the gradients of q, k, v, g, beta and the initial states, weak and -30 gates."""
    errors = run_interpreted(FULL, 16)
    assert all(e < 1e-5 for e in errors), errors


HALF = (
    FULL.split("print(")[0]
    + """
print(*errors(-1.0, 2, 4, 16, 32, torch.float16))
"""
)


def test_half_precision_backward_in_interpreter_within_1e2():
    """The 16-bit path (16-bit ``Q K^T`` / ``K K^T`` dots, fp16 gradients out) vs the fp64 recurrence on the same
    fp16 inputs; fp16, not bf16: the interpreter's bf16 ``tl.dot`` is wrong in Triton 3.9 (see test_gdn_triton_wy)."""
    errors = run_interpreted(HALF, 8)
    assert all(e < 1e-2 for e in errors), errors


@pytest.mark.gpu
def test_bench_heads_bf16_forward_and_backward_within_1e2_deterministic():
    """dk = dv = 128, two value heads per q/k head, bf16 q/k/v, packed documents with partial chunks, initial states
    and the final state's gradient: forward and every gradient within 1e-2 of the fp64 torch chunked form on the same
    rounded inputs; two backward passes give the same bits (no atomics)."""
    from mcore_ssm.gdn_triton import gated_delta_rule_triton

    cu = torch.tensor([0, 1, 130, 1000, 1300, 2000], dtype=torch.int32, device="cuda")
    leaves = [t.requires_grad_() for t in bench_like_inputs(torch.bfloat16)]
    out, final = gated_delta_rule_triton(*leaves[:5], cu_seqlens=cu, initial_state=leaves[5], output_final_state=True)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_final = chunk_gated_delta_rule(*exact[:5], cu_seqlens=cu, initial_state=exact[5], output_final_state=True)
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 1e-2 and rel(final, ref_final) < 1e-2
    probe, probe_s = torch.randn_like(ref), torch.randn_like(ref_final)
    loss = (out.double() * probe).sum() + (final.double() * probe_s).sum()
    got = torch.autograd.grad(loss, leaves, retain_graph=True)
    again = torch.autograd.grad(loss, leaves)
    want = torch.autograd.grad((ref * probe).sum() + (ref_final * probe_s).sum(), exact)
    assert [t.dtype for t in got] == [t.dtype for t in leaves]
    for a, b, e in zip(got, again, want, strict=True):
        assert torch.equal(a, b)
        assert rel(a, e) < 1e-2


@pytest.mark.gpu
def test_bench_heads_fp32_backward_equals_fp64_recurrence_at_strong_gates():
    """fp32 at dk = dv = 128 (the ieee path) with gates down to -30 a token: every gradient within 1e-5 of the fp64
    recurrence's."""
    from mcore_ssm.gdn_triton import gated_delta_rule_triton

    leaves = bench_like_inputs(torch.float32)
    leaves[3] = torch.rand(leaves[3].shape, device="cuda") * -30.0
    leaves = [t[:, :300].contiguous() if i < 5 else t[:2] for i, t in enumerate(leaves)]  # (2, 300): rows
    leaves = [t.requires_grad_() for t in leaves]
    out, final = gated_delta_rule_triton(*leaves[:5], initial_state=leaves[5], output_final_state=True)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_final = recurrent_gated_delta_rule(*exact[:5], initial_state=exact[5], output_final_state=True)
    assert rel(out, ref) < 1e-5 and rel(final, ref_final) < 1e-5
    probe, probe_s = torch.randn_like(ref), torch.randn_like(ref_final)
    got = torch.autograd.grad((out.double() * probe).sum() + (final.double() * probe_s).sum(), leaves)
    want = torch.autograd.grad((ref * probe).sum() + (ref_final * probe_s).sum(), exact)
    for a, e in zip(got, want, strict=True):
        assert rel(a, e) < 1e-5
