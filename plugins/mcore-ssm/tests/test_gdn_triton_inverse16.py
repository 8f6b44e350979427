"""The per-chunk inverse ``T = (I + A)^-1`` from 16 x 16 diagonal blocks (``MCORE_SSM_GDN_INVERSE=blocks16``, issue 22;
an opt-in not yet run on a GPU): ``T``, ``W`` and ``U~`` of the WY kernel against the default doubling and fp64
``torch.linalg.solve_triangular``, and the forward and gradients with it against the fp64 recurrence, in Triton's CPU
interpreter (``slow``: a subprocess) and on CUDA (``gpu``). Each test sets the variable for every path it runs; it is
read when the forward starts (``kernel_choice.gdn_kernels_for``) and the backward runs the same."""

from __future__ import annotations

import pytest
import torch
from ssm_cases import bench_like_inputs, gdn_inverse_fp64, rel, run_interpreted, worst_chunk

from mcore_ssm.gdn_reference import chunk_gated_delta_rule, recurrent_gated_delta_rule

WY = """
import torch, torch.nn.functional as F
from ssm_cases import gdn_inverse_fp64, rel, worst_chunk, wy_case
from mcore_ssm.gdn_triton import launch_for, prepare
import numpy
numpy.seterr(over="raise", invalid="raise")  # the interpreter's exp runs in numpy: an overflow fails the run
errors = []
for gate_min, repeated, dk in ((-0.05, False, 16), (-30.0, False, 16), (-0.05, True, 16), (-3.0, True, 80)):
    k, v, g, beta, cu = wy_case(gate_min, repeated, dk)  # chunks of 64, 64, 22 | 1 | 64
    launch = launch_for(k, k, v, g, beta, None, None, cu, None)
    want = gdn_inverse_fp64(launch.chunk_starts, launch.chunk_lengths, k, g, beta)
    got = {}
    for by, narrow in (("doubling", False), ("blocks16", False), ("blocks16", True)):
        inverse = torch.full_like(want, float("nan"), dtype=torch.float32)  # every entry must be written
        factors = prepare(launch, k, v, g, beta, torch.float32, narrow=narrow, inverse=inverse, inverse_by=by)
        got[by, narrow] = (inverse, *factors)
    blocks, doubling = got["blocks16", False], got["doubling", False]
    errors += [worst_chunk(blocks[0], want), worst_chunk(blocks[0], doubling[0])]
    errors += [rel(a, b) for a, b in zip(blocks[1:], doubling[1:])]  # W, U~, G
    errors += [rel(a, b) for a, b in zip(got["blocks16", True], blocks)]  # the narrow launch: T, W, U~, G
print(*errors)
"""


def test_blocks16_inverse_in_interpreter_equals_triangular_solve_and_doubling():
    """fp32: each chunk's ``T`` within 1e-5 (relative, the worst chunk) of fp64 ``solve_triangular`` and of the
    doubling's ``T``; ``W``, ``U~``, ``G`` within 1e-5 of the doubling's; the narrow launch (v2) the same. Weak and
    strong decays (gates down to -30 a token), keys repeated (three directions, beta near 1), dk 16 and 80, packed
    documents with partial chunks (22 tokens, 1 token)."""
    errors = run_interpreted(WY, 4 * (2 + 3 + 4))
    assert all(e < 1e-5 for e in errors), errors


# the forward and gradients with blocks16 (alone, with the saved T, with the v1 forward), and what the backward ran
FULL = """
import os, numpy
numpy.seterr(over="raise", invalid="raise")
import mcore_ssm.gdn_triton_bwd as bwd
from ssm_cases import gdn_strong_decay_errors
seen = []
def recording(fn):
    def call(*args, **kwargs):
        seen.append(kwargs.get("inverse_by"))
        return fn(*args, **kwargs)
    return call
bwd.prepare, bwd.chunk_terms_bwd_split = recording(bwd.prepare), recording(bwd.chunk_terms_bwd_split)
errors = []
for extra, gate_min in (({}, -1.0), ({}, -30.0), ({"MCORE_SSM_GDN_PAIRS_T": "saved"}, -30.0),
                        ({"MCORE_SSM_GDN_FWD": "v1"}, -1.0)):
    for key in ("MCORE_SSM_GDN_PAIRS_T", "MCORE_SSM_GDN_FWD"):
        os.environ.pop(key, None)
    os.environ.update({"MCORE_SSM_GDN_INVERSE": "blocks16", **extra})
    errors += gdn_strong_decay_errors(gate_min)
print(*errors, seen.count("blocks16"), len(seen))
"""


@pytest.mark.slow
def test_blocks16_forward_and_gradients_in_interpreter_equal_fp64_recurrence():
    """fp32 with ``MCORE_SSM_GDN_INVERSE=blocks16``, packed documents with partial chunks, initial and final states,
    gates down to -1 and -30 a token (``ssm_cases.gdn_strong_decay_errors``), alone, with the saved ``T``
    (``MCORE_SSM_GDN_PAIRS_T=saved``) and with the v1 forward: output, final state and every gradient within 1e-5 of
    the fp64 recurrence's, no exp overflowing; the backward's rerun and terms ran blocks16 every time."""
    numbers = run_interpreted(FULL, 4 * 8 + 2)
    errors, (blocks16, calls) = numbers[:-2], numbers[-2:]
    assert all(e < 1e-5 for e in errors), errors
    assert blocks16 == calls == 8, numbers[-2:]


HALF = """
import os, torch, torch.nn.functional as F
from mcore_ssm.gdn_triton import gated_delta_rule_triton
from mcore_ssm.gdn_reference import chunk_gated_delta_rule, recurrent_gated_delta_rule
os.environ["MCORE_SSM_GDN_INVERSE"] = "blocks16"
gen = torch.Generator().manual_seed(0)
B, T, hk, hv, dk, dv = 1, 150, 1, 2, 32, 48
q = F.normalize(torch.randn(B, T, hk, dk, generator=gen), dim=-1).half()
k = F.normalize(torch.randn(B, T, hk, dk, generator=gen), dim=-1).half()
v = torch.randn(B, T, hv, dv, generator=gen).half()
gate = -F.softplus(torch.randn(B, T, hv, generator=gen)) * 0.3
beta = torch.sigmoid(torch.randn(B, T, hv, generator=gen))
cu = torch.tensor([0, 3, 150], dtype=torch.int32)
out, _ = gated_delta_rule_triton(q, k, v, gate, beta, cu_seqlens=cu)
ref, _ = recurrent_gated_delta_rule(*(t.double() for t in (q, k, v, gate, beta)), cu_seqlens=cu)
print(float((out.double() - ref).norm() / ref.norm()))
"""


def test_blocks16_half_precision_forward_in_interpreter_within_1e2():
    """The 16-bit path (tf32 merges, fp16 scratch; the interpreter's bf16 dot is wrong, see
    ``test_gdn_triton_wy``) with blocks16 against the fp64 recurrence on the same fp16 inputs."""
    errors = run_interpreted(HALF, 1)
    assert all(e < 1e-2 for e in errors), errors


def test_inverse_choice_is_read_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """``MCORE_SSM_GDN_INVERSE`` unset or empty picks ``doubling``, ``blocks16`` blocks16 (any dk); anything else is a
    ``UserError`` naming the allowed values, when a forward starts (``gdn_kernels_for``)."""
    from mcore.errors import UserError
    from mcore_ssm.kernel_choice import gdn_kernels_for

    monkeypatch.delenv("MCORE_SSM_GDN_INVERSE", raising=False)
    assert gdn_kernels_for(128).inverse == "doubling"
    monkeypatch.setenv("MCORE_SSM_GDN_INVERSE", "")
    assert gdn_kernels_for(128).inverse == "doubling"
    monkeypatch.setenv("MCORE_SSM_GDN_INVERSE", "blocks16")
    assert [gdn_kernels_for(bk).inverse for bk in (16, 128, 256)] == ["blocks16"] * 3
    monkeypatch.setenv("MCORE_SSM_GDN_INVERSE", "blocks32")
    with pytest.raises(UserError, match="MCORE_SSM_GDN_INVERSE = 'blocks32'; allowed: doubling, blocks16"):
        gdn_kernels_for(128)


def _grads(monkeypatch: pytest.MonkeyPatch, leaves, cu, probes, inverse: str) -> list[torch.Tensor]:
    """Output, final state and the gradients of every leaf with ``MCORE_SSM_GDN_INVERSE=inverse``."""
    from mcore_ssm.gdn_triton import gated_delta_rule_triton

    monkeypatch.setenv("MCORE_SSM_GDN_INVERSE", inverse)
    out, final = gated_delta_rule_triton(*leaves[:5], cu_seqlens=cu, initial_state=leaves[5], output_final_state=True)
    monkeypatch.delenv("MCORE_SSM_GDN_INVERSE")  # the backward runs what the forward chose
    loss = (out.double() * probes[0]).sum() + (final.double() * probes[1]).sum()
    return [out, final, *torch.autograd.grad(loss, leaves)]


@pytest.mark.gpu
def test_blocks16_bf16_forward_and_backward_within_1e2_of_fp64_and_near_doubling(monkeypatch: pytest.MonkeyPatch):
    """bf16, dk = dv = 128, packed documents with partial chunks, initial states and the final state's gradient:
    output, final state and every gradient with blocks16 within 1e-2 of the fp64 torch chunked form's and of the
    doubling's (bf16 results: one rounding step is 4e-3)."""
    cu = torch.tensor([0, 1, 130, 1000, 1300, 2000], dtype=torch.int32, device="cuda")
    leaves = [t.requires_grad_() for t in bench_like_inputs(torch.bfloat16, hk=2, hv=4)]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_final = chunk_gated_delta_rule(*exact[:5], cu_seqlens=cu, initial_state=exact[5], output_final_state=True)
    probes = (torch.randn_like(ref), torch.randn_like(ref_final))
    want = [ref, ref_final, *torch.autograd.grad((ref * probes[0]).sum() + (ref_final * probes[1]).sum(), exact)]
    got = _grads(monkeypatch, leaves, cu, probes, "blocks16")
    doubling = _grads(monkeypatch, leaves, cu, probes, "doubling")
    assert [t.dtype for t in got[2:]] == [t.dtype for t in leaves]
    for a, d, e in zip(got, doubling, want, strict=True):
        assert rel(a, e) < 1e-2 and rel(a, d) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("gate_min", [None, -30.0])
def test_blocks16_fp32_forward_and_gradients_equal_fp64_recurrence(monkeypatch: pytest.MonkeyPatch, gate_min):
    """fp32 at dk = dv = 128 (the ieee path), bench-like gates and gates down to -30 a token, packed documents with
    partial chunks: output, final state and every gradient with blocks16 within 1e-5 of the fp64 recurrence's."""
    cu = torch.tensor([0, 1, 130, 300, 450, 600], dtype=torch.int32, device="cuda")
    leaves = [t.requires_grad_() for t in bench_like_inputs(torch.float32, seq=300, hk=2, hv=4, gate_min=gate_min)]
    exact = [t.detach().double().requires_grad_() for t in leaves]
    ref, ref_final = recurrent_gated_delta_rule(
        *exact[:5], cu_seqlens=cu, initial_state=exact[5], output_final_state=True
    )
    probes = (torch.randn_like(ref), torch.randn_like(ref_final))
    want = [ref, ref_final, *torch.autograd.grad((ref * probes[0]).sum() + (ref_final * probes[1]).sum(), exact)]
    for a, e in zip(_grads(monkeypatch, leaves, cu, probes, "blocks16"), want, strict=True):
        assert rel(a, e) < 1e-5


@pytest.mark.gpu
def test_blocks16_inverse_on_cuda_equals_triangular_solve():
    """dk 128, gates down to -1 and -30 a token, packed documents, both WY launches: with fp32 inputs (ieee) each
    chunk's ``T`` within 1e-5 of fp64 ``solve_triangular``; with bf16 inputs (tf32 merges) at most twice as far from it as
    the doubling's ``T`` (the diagonal blocks are fp32 here, tf32 dots there; both end in the same two tf32 levels)."""
    from mcore_ssm.gdn_triton import launch_for, prepare

    cu = torch.tensor([0, 1, 130, 300, 450, 600], dtype=torch.int32, device="cuda")
    for gate_min in (-1.0, -30.0):
        q, k, v, g, beta, _ = bench_like_inputs(torch.float32, seq=300, hk=2, hv=4, gate_min=gate_min)
        for dtype in (torch.float32, torch.bfloat16):
            kd, vd = k.to(dtype).contiguous(), v.to(dtype).contiguous()
            launch = launch_for(kd, kd, vd, g, beta, None, None, cu, None)
            want = gdn_inverse_fp64(launch.chunk_starts, launch.chunk_lengths, kd, g, beta)  # on the rounded keys
            for narrow in (False, True):
                found = {}
                for by in ("doubling", "blocks16"):
                    inverse = torch.full(want.shape, float("nan"), device="cuda")  # every entry must be written
                    prepare(launch, kd, vd, g, beta, dtype, narrow=narrow, inverse=inverse, inverse_by=by)
                    found[by] = worst_chunk(inverse, want)
                if dtype == torch.float32:
                    assert found["blocks16"] < 1e-5, found
                else:
                    assert found["blocks16"] <= 2 * found["doubling"], found  # both end in two tf32 levels
