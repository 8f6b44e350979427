"""The WY factors of the Triton gated delta rule (``mcore_ssm.gdn_triton.prepare``: the blocked inverse of
``I + A``) against ``torch.linalg.solve_triangular`` in fp64, and the 16-bit forward path (16-bit dots and
scratch) in Triton's CPU interpreter; the bench-sized head shapes on CUDA (``gpu``).

The interpreter runs in a subprocess (``ssm_cases.run_interpreted``): it is chosen when Triton is imported. Its
bf16 ``tl.dot`` is wrong in Triton 3.9 (a 16 x 16 product off by 4e9 relative, 2026-12-06), so the interpreter
takes the 16-bit path in fp16; the GPU tests take bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ssm_cases import rel, run_interpreted

from mcore_ssm.gdn_reference import chunk_gated_delta_rule, recurrent_gated_delta_rule

WY = """
import torch, torch.nn.functional as F
from ssm_cases import wy_case
from mcore_ssm.gdn_triton import launch_for, prepare

def factors_fp64(launch, k, v, g, beta):
    # W, U~, G of every chunk by torch's triangular solve in fp64, chunk by chunk
    kf, vf, gf, bf = (t.flatten(0, 1).double() for t in (k, v, g, beta))  # (N, h, ...)
    kf = kf.repeat_interleave(launch.hv // launch.hk, dim=1)
    w, u, cum = torch.zeros(kf.shape[0], launch.hv, launch.dk).double(), torch.zeros_like(vf), torch.zeros_like(gf)
    for start, count in zip(launch.chunk_starts.tolist(), launch.chunk_lengths.tolist()):
        rows = slice(start, start + count)
        kc, vc, bc = kf[rows].transpose(0, 1), vf[rows].transpose(0, 1), bf[rows].T  # (hv, c, .), (hv, c)
        gc = gf[rows].T.cumsum(-1)  # (hv, c) G
        between = (gc[:, :, None] - gc[:, None, :]).tril(-1)  # (hv, c, c) G_i - G_j, j < i
        a = (bc[:, :, None] * (kc @ kc.transpose(1, 2)) * between.exp()).tril(-1)
        eye = torch.eye(count, dtype=torch.float64).expand_as(a)
        inv = torch.linalg.solve_triangular(eye + a, eye, upper=False, unitriangular=True)  # (hv, c, c) T
        w[rows] = (inv @ (kc * (bc * gc.exp())[..., None])).transpose(0, 1)
        u[rows] = (inv @ (vc * bc[..., None])).transpose(0, 1)
        cum[rows] = gc.T
    return w, u, cum

def errors(gate_min, repeated):
    k, v, g, beta, cu = wy_case(gate_min, repeated, dk=16)  # dv 80: two value blocks of 64, the second part-masked
    launch = launch_for(k, k, v, g, beta, None, None, cu, None)
    got = prepare(launch, k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(), torch.float32)
    want = factors_fp64(launch, k, v, g, beta)
    assert all(torch.isfinite(t).all() for t in got)
    return [float((a.double() - b).norm() / b.norm()) for a, b in zip(got, want)]

print(*errors(-0.05, False), *errors(-30.0, False), *errors(-0.05, True), *errors(-3.0, True))
"""


def test_blocked_inverse_in_triton_interpreter_equals_triangular_solve():
    """``W``, ``U~`` (``T = (I + A)^-1`` through a full-rank ``V``) and ``G`` of the first kernel against fp64
    ``solve_triangular`` per chunk: weak and strong decays (gates down to -30 a token), keys repeated (three
    directions, beta near 1), packed documents with partial chunks (22 tokens, 1 token)."""
    errors = run_interpreted(WY, 12)
    assert all(e < 1e-5 for e in errors), errors


HALF = """
import torch, torch.nn.functional as F
from mcore_ssm.gdn_triton import gated_delta_rule_triton
from mcore_ssm.gdn_reference import recurrent_gated_delta_rule
gen = torch.Generator().manual_seed(0)
B, T, hk, hv, dk, dv = 2, 150, 2, 4, 32, 48
q = F.normalize(torch.randn(B, T, hk, dk, generator=gen), dim=-1).half()
k = F.normalize(torch.randn(B, T, hk, dk, generator=gen), dim=-1).half()
v = torch.randn(B, T, hv, dv, generator=gen).half()
gate = -F.softplus(torch.randn(B, T, hv, generator=gen)) * 0.3
beta = torch.sigmoid(torch.randn(B, T, hv, generator=gen))
cu = torch.tensor([0, 3, 150, 300], dtype=torch.int32)
h0 = torch.randn(3, hv, dk, dv, generator=gen) * 0.3
out, final = gated_delta_rule_triton(q, k, v, gate, beta, cu_seqlens=cu, initial_state=h0, output_final_state=True)
assert out.dtype == torch.float16 and final.dtype == torch.float32
ref, ref_final = recurrent_gated_delta_rule(
    *(t.double() for t in (q, k, v, gate, beta)), cu_seqlens=cu, initial_state=h0.double(), output_final_state=True
)
rel = lambda a, b: float((a.double() - b).norm() / b.norm())
print(rel(out, ref), rel(final, ref_final))
"""


def test_half_precision_forward_in_triton_interpreter_within_1e2():
    """The 16-bit path (16-bit dots, W, U~, U and chunk states in fp16) against the fp64 recurrence on the same
    fp16 inputs: packed documents, initial and final states."""
    errors = run_interpreted(HALF, 2)
    assert all(e < 1e-2 for e in errors), errors


def _inputs(batch, seq, hk, hv, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, seq, hk, d, generator=gen), dim=-1)
    k = F.normalize(torch.randn(batch, seq, hk, d, generator=gen), dim=-1)
    v = torch.randn(batch, seq, hv, d, generator=gen)
    gate = -F.softplus(torch.randn(batch, seq, hv, generator=gen)) * 0.3
    beta = torch.sigmoid(torch.randn(batch, seq, hv, generator=gen))
    return [t.to(device="cuda", dtype=dtype if i < 3 else torch.float32) for i, t in enumerate((q, k, v, gate, beta))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bench_heads_16bit_forward_within_1e2_packed(dtype):
    """The bench's head shape (dk = dv = 128, two value heads per key head) in 16 bits, packed documents with
    partial chunks and initial/final states, against the fp64 recurrence on the same rounded inputs."""
    from mcore_ssm.gdn_triton import gated_delta_rule_triton

    q, k, v, gate, beta = _inputs(2, 700, 2, 4, 128, dtype)
    cu = torch.tensor([0, 1, 130, 700, 1000, 1400], dtype=torch.int32, device="cuda")
    h0 = torch.randn(5, 4, 128, 128, device="cuda") * 0.1
    out, final = gated_delta_rule_triton(q, k, v, gate, beta, cu_seqlens=cu, initial_state=h0, output_final_state=True)
    ref, ref_final = recurrent_gated_delta_rule(
        *(t.double() for t in (q, k, v, gate, beta)), cu_seqlens=cu, initial_state=h0.double(), output_final_state=True
    )
    assert out.dtype == dtype and rel(out, ref) < 1e-2 and rel(final, ref_final) < 1e-2


@pytest.mark.gpu
def test_bench_heads_fp32_forward_and_gradients_equal_references():
    """dk = dv = 128 in fp32 (the ieee dots, fp32 scratch and states): forward vs the fp64 recurrence, gradients vs
    the fp64 torch chunked form."""
    from mcore_ssm.gdn_triton import gated_delta_rule_triton

    leaves = [t.requires_grad_() for t in _inputs(1, 300, 1, 2, 128, torch.float32)]
    cu = torch.tensor([0, 77, 300], dtype=torch.int32, device="cuda")
    out, _ = gated_delta_rule_triton(*leaves, cu_seqlens=cu)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    ref, _ = recurrent_gated_delta_rule(*(t.detach() for t in exact), cu_seqlens=cu)
    assert rel(out, ref) < 1e-5
    probe = torch.randn_like(out)
    got = torch.autograd.grad((out * probe).sum(), leaves)
    want_out, _ = chunk_gated_delta_rule(*exact, cu_seqlens=cu)
    want = torch.autograd.grad((want_out * probe.double()).sum(), exact)
    for a, e in zip(got, want, strict=True):
        assert rel(a, e) < 1e-5
