"""The Triton chunked gated delta rule (``mcore_ssm.gdn_triton``, ``gdn_triton_bwd``), forward and backward, against
the torch references, and the kernel choice (``mcore_ssm.gdn_kernels``). The kernel tests need CUDA (``gpu``); one
runs the kernels in Triton's CPU interpreter (``slow``: a subprocess, as the interpreter is chosen when Triton is
imported). The forward is the default one (``MCORE_SSM_GDN_FWD`` unset: v2 where dk <= 128, v1 for wider keys);
``test_gdn_triton_state_v2`` names v1 and v2 explicitly."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from ssm_cases import gdn_strong_decay_errors, rel, run_interpreted

from mcore.protocols.block import BlockContext
from mcore_ssm.gdn import GatedDeltaNet
from mcore_ssm.gdn_kernels import pick
from mcore_ssm.gdn_reference import chunk_gated_delta_rule, recurrent_gated_delta_rule


def inputs(batch, seq, hk, hv, dk, dv, *, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, seq, hk, dk, generator=g), dim=-1)
    k = F.normalize(torch.randn(batch, seq, hk, dk, generator=g), dim=-1)
    v = torch.randn(batch, seq, hv, dv, generator=g)
    gate = -F.softplus(torch.randn(batch, seq, hv, generator=g)) * 0.3
    beta = torch.sigmoid(torch.randn(batch, seq, hv, generator=g))
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v, gate, beta)]


def test_auto_takes_the_reference_on_cpu_and_names_bad_kernels(monkeypatch):
    assert pick("auto", torch.device("cpu"), 64) == "torch"
    assert pick("torch", torch.device("cuda"), 64) == "torch"
    assert pick("triton", torch.device("cpu"), 64) == "triton"
    with pytest.raises(ValueError, match="kernel = 'cuda'"):
        pick("cuda", torch.device("cpu"), 64)
    with pytest.raises(ValueError, match="kernel = 'fast'"):
        GatedDeltaNet.Config(kernel="fast")
    monkeypatch.delenv("MCORE_SSM_KERNELS", raising=False)  # the default on CUDA: the kernel, where Triton is
    assert pick("auto", torch.device("cuda"), 64) == ("triton" if importlib.util.find_spec("triton") else "torch")
    for opt_out in ("torch", "reference"):
        monkeypatch.setenv("MCORE_SSM_KERNELS", opt_out)
        assert pick("auto", torch.device("cuda"), 64) == "torch"


INTERPRETED = """
import torch, torch.nn.functional as F
from mcore_ssm.gdn_triton import gated_delta_rule_triton
from mcore_ssm.gdn_reference import chunk_gated_delta_rule, recurrent_gated_delta_rule
g = torch.Generator().manual_seed(0)
B, T, hk, hv, dk, dv = 2, 70, 1, 2, 12, 20
q = F.normalize(torch.randn(B, T, hk, dk, generator=g), dim=-1)
k = F.normalize(torch.randn(B, T, hk, dk, generator=g), dim=-1)
v = torch.randn(B, T, hv, dv, generator=g)
gate = -F.softplus(torch.randn(B, T, hv, generator=g)) * 0.3
beta = torch.sigmoid(torch.randn(B, T, hv, generator=g))
cu = torch.tensor([0, 3, 70, 140], dtype=torch.int32)
h0 = torch.randn(3, hv, dk, dv, generator=g) * 0.3
args = [t.requires_grad_() for t in (q, k, v, gate, beta, h0)]
out, final = gated_delta_rule_triton(*args[:5], cu_seqlens=cu, initial_state=args[5], output_final_state=True)
ref, ref_final = recurrent_gated_delta_rule(
    *(t.detach().double() for t in args[:5]), cu_seqlens=cu, initial_state=h0.detach().double(), output_final_state=True
)
rel = lambda a, b: float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())
errors = [rel(out, ref), rel(final, ref_final)]
probe, probe_s = torch.randn(out.shape, generator=g), torch.randn(final.shape, generator=g)
got = torch.autograd.grad((out * probe).sum() + (final * probe_s).sum(), args)
want_out, want_final = chunk_gated_delta_rule(*args[:5], cu_seqlens=cu, initial_state=args[5], output_final_state=True)
want = torch.autograd.grad((want_out * probe).sum() + (want_final * probe_s).sum(), args)
errors += [rel(a, b) for a, b in zip(got, want)]
print(*errors)
"""


@pytest.mark.slow
def test_kernels_in_triton_interpreter_equal_references():
    """Forward (vs the fp64 recurrence) and every gradient (vs the torch chunked reference's autograd), packed
    documents with initial states, in Triton's interpreter on the CPU."""
    errors = run_interpreted(INTERPRETED, 8)
    assert all(e < 1e-5 for e in errors), errors


STRONG_DECAY = """
import numpy
numpy.seterr(over="raise", invalid="raise")  # the interpreter's exp runs in numpy: an overflow fails the run
from ssm_cases import gdn_strong_decay_errors
print(*gdn_strong_decay_errors(-30.0), *gdn_strong_decay_errors(-100.0))
"""


def test_strong_decay_in_triton_interpreter_is_finite_and_equals_recurrence():
    """Gates down to -30 and -100 per token (a chunk's decay reaches -6400; Qwen3-Next's reach -20..-50): every
    output and gradient finite and equal to the fp64 recurrence (``ssm_cases.gdn_strong_decay_errors``), and no exp
    in the kernels overflows (numpy raises on it). The kernels once took exp(G_i - G_j) of padding rows that held
    G = 0: inf in the forward's masked-out rows, NaN through the backward."""
    errors = run_interpreted(STRONG_DECAY, 16)
    assert all(e < 1e-5 for e in errors), errors


@pytest.mark.gpu
@pytest.mark.parametrize("gate_min", [-30.0, -100.0])
def test_strong_decay_on_cuda_is_finite_and_equals_recurrence(gate_min):
    errors = gdn_strong_decay_errors(gate_min, device="cuda")
    assert all(e < 1e-5 for e in errors), errors


@pytest.mark.gpu
@pytest.mark.parametrize(("dk", "dv"), [(16, 16), (12, 80), (128, 128)])
def test_kernel_fp32_equals_recurrence_packed_with_states(dk, dv):
    from mcore_ssm.gdn_triton import gated_delta_rule_triton

    q, k, v, gate, beta = inputs(2, 300, 2, 4, dk, dv, device="cuda")
    cu = torch.tensor([0, 1, 64, 65, 300, 429, 600], dtype=torch.int32, device="cuda")
    h0 = (torch.randn(6, 4, dk, dv, device="cuda") * 0.3).requires_grad_()
    out, final = gated_delta_rule_triton(q, k, v, gate, beta, cu_seqlens=cu, initial_state=h0, output_final_state=True)
    args64 = [t.detach().double() for t in (q, k, v, gate, beta)]
    ref, ref_final = recurrent_gated_delta_rule(
        *args64, cu_seqlens=cu, initial_state=h0.detach().double(), output_final_state=True
    )
    assert rel(out, ref) < 1e-5 and rel(final, ref_final) < 1e-5
    probe, probe_s = torch.randn_like(out), torch.randn_like(final)
    got = torch.autograd.grad((out * probe).sum() + (final * probe_s).sum(), [q, k, v, gate, beta, h0])
    exact = [t.detach().double().requires_grad_() for t in (q, k, v, gate, beta, h0)]
    want_out, want_final = chunk_gated_delta_rule(
        *exact[:5], cu_seqlens=cu, initial_state=exact[5], output_final_state=True
    )
    want = torch.autograd.grad((want_out * probe.double()).sum() + (want_final * probe_s.double()).sum(), exact)
    for a, e in zip(got, want, strict=True):
        assert rel(a, e) < 1e-5


@pytest.mark.gpu
def test_kernel_bf16_within_1e2_forward_and_gradients():
    from mcore_ssm.gdn_triton import gated_delta_rule_triton

    args = inputs(2, 512, 2, 4, 64, 64, device="cuda")
    low = [t.detach().bfloat16().requires_grad_() if i < 3 else t.detach().requires_grad_() for i, t in enumerate(args)]
    out, _ = gated_delta_rule_triton(*low)
    exact = [t.detach().double().requires_grad_() for t in low]
    ref, _ = chunk_gated_delta_rule(*exact)
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 1e-2
    probe = torch.randn(out.shape, device="cuda", dtype=torch.float64)
    got = torch.autograd.grad((out.double() * probe).sum(), low)
    want = torch.autograd.grad((ref * probe).sum(), exact)
    for a, e in zip(got, want, strict=True):
        assert rel(a, e) < 1e-2


@pytest.mark.gpu
def test_block_triton_kernel_equals_torch_kernel_on_cuda():
    """Was xfail (H100, 2026-12-06: a gradient not finite): the block's gates reach ~-20 a token, enough for the
    padding-row overflow that ``test_strong_decay_*`` pins."""
    cfg = {"num_qk_heads": 2, "num_v_heads": 4, "head_k_dim": 32, "head_v_dim": 32}
    auto = GatedDeltaNet(GatedDeltaNet.Config(**cfg, kernel="triton"), hidden_size=64).cuda()
    ref = GatedDeltaNet(GatedDeltaNet.Config(**cfg, kernel="torch"), hidden_size=64).cuda()
    ref.load_state_dict(auto.state_dict())
    hidden = torch.randn(2, 200, 64, device="cuda", requires_grad=True)
    cu = torch.tensor([0, 70, 200, 400], dtype=torch.int32, device="cuda")
    out = auto(hidden, BlockContext(cu_seqlens=cu))
    want = ref(hidden, BlockContext(cu_seqlens=cu))
    assert rel(out, want) < 1e-5
    (grad,) = torch.autograd.grad(out.sum(), [hidden])
    (grad_ref,) = torch.autograd.grad(want.sum(), [hidden])
    assert rel(grad, grad_ref) < 1e-5
