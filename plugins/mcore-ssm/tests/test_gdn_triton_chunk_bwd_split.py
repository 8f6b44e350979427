"""The split backward of the GDN per-chunk terms (``mcore_ssm.gdn_triton_chunk_bwd_split``: three kernels in place of
``gdn_triton_chunk_bwd``'s one) against autograd of the torch per-chunk terms in fp64 (``chunk_terms_bwd_reference``)
and against the one-kernel version, in Triton's CPU interpreter (a subprocess: ``ssm_cases.run_interpreted``; fp32,
the interpreter's bf16 ``tl.dot`` is wrong, see test_gdn_triton_wy); the bench's head shape in bf16 on CUDA (``gpu``).

Cases as test_gdn_triton_bwd: packed documents whose last chunks are partial (70 = 64 + 6 tokens, 1 token, 79 = 64 +
15), two value heads per q/k head, dk != dv with value blocks part-masked (80 = 32 + 32 + 16), gates down to -30 a
token; and dk 80 (two blocks of 64 key dims, the second part-masked: kernel 2's partial row sums and the gate
kernel's sum over them), dv 48."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ssm_cases import rel, run_interpreted

TERMS = """
import torch, torch.nn.functional as F
from mcore_ssm.gdn_triton import launch_for, prepare, run_states
from mcore_ssm.gdn_triton_bwd import chunk_terms_bwd_reference
from mcore_ssm.gdn_triton_chunk_bwd import chunk_terms_bwd
from mcore_ssm.gdn_triton_chunk_bwd_split import chunk_terms_bwd_split

def errors(gate_min, hk, hv, dk, dv, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    tokens = 150
    q = F.normalize(torch.randn(1, tokens, hk, dk, generator=gen), dim=-1)
    k = F.normalize(torch.randn(1, tokens, hk, dk, generator=gen), dim=-1)
    v = torch.randn(1, tokens, hv, dv, generator=gen)
    g = torch.rand(1, tokens, hv, generator=gen) * gate_min
    beta = torch.rand(1, tokens, hv, generator=gen)
    h0 = torch.randn(3, hv, dk, dv, generator=gen) * 0.3
    cu = torch.tensor([0, 70, 71, 150], dtype=torch.int32)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    launch = launch_for(q, k, v, g, beta, None, h0, cu, None)
    chunks = launch.chunk_starts.numel()
    u, states, _ = run_states(launch, k, prepare(launch, k, v, g, beta, torch.float32), h0, final=False,
                              states_dtype=torch.float32)
    saved = (u, states, torch.randn(chunks, hv, dk, dv, generator=gen))  # U, S and a random dS'
    grads = (torch.randn(tokens, hv, dv, generator=gen).to(dtype), torch.randn(tokens, hv, dv, generator=gen))  # dO, dU
    inputs = (q, k, v, g, beta)
    got = chunk_terms_bwd_split(launch, inputs, saved, grads)
    assert [t.shape for t in got] == [t.shape for t in inputs]
    assert all(t.dtype == x.dtype and torch.isfinite(t).all() for t, x in zip(got, inputs))
    want = chunk_terms_bwd_reference(launch, tuple(t.double() for t in inputs), saved, grads)
    one_kernel = chunk_terms_bwd(launch, inputs, saved, grads)
    to_fp64 = [float((a.double() - b).norm() / b.norm()) for a, b in zip(got, want)]
    to_one_kernel = [float((a.double() - b.double()).norm() / b.double().norm()) for a, b in zip(got, one_kernel)]
    return to_fp64 + to_one_kernel

"""

FP32 = (
    TERMS
    + """
print(*errors(-1.0, 2, 4, 12, 80), *errors(-30.0, 2, 4, 12, 80), *errors(-0.1, 1, 1, 16, 16),
      *errors(-30.0, 1, 2, 80, 48))
"""
)

HALF = (
    TERMS
    + """
print(*errors(-30.0, 1, 2, 80, 48, torch.float16))
"""
)


def test_split_kernels_equal_fp64_autograd_and_one_kernel_in_interpreter():
    """``dq, dk, dv, dg, dbeta`` (shapes and dtypes of the inputs) vs autograd through the torch per-chunk terms in
    fp64 and vs the one-kernel version in fp32 (same U, S, dS', dO, dU): weak and -30 gates with two value heads per
    q/k head (dk 12, dv 80 in three blocks), one head of dk = dv = 16, and dk 80 in two key blocks at -30 gates."""
    errors = run_interpreted(FP32, 40)
    assert all(e < 1e-5 for e in errors), errors


def test_half_precision_split_kernels_in_interpreter():
    """dk 80 (two key blocks), dv 48, gates down to -30, on the 16-bit path (fp16 q, k, v, dO: 16-bit ``K K^T`` / ``Q K^T`` dots, fp16 dq, dk, dv out) vs the fp64 oracle on
    the same rounded inputs within 1e-3 (fp16 rounding of the results is ~2e-4) and vs the one-kernel version within
    1e-4 (a few results an fp16 ulp apart); fp16, not bf16, for the interpreter's bf16 ``tl.dot``."""
    errors = run_interpreted(HALF, 10)
    assert all(e < 1e-3 for e in errors[:5]), errors
    assert all(e < 1e-4 for e in errors[5:]), errors


def _bench_terms(dtype: torch.dtype, seed: int = 0) -> tuple:
    """The per-chunk terms' arguments at the bench's head shape (dk = dv = 128, two value heads per q/k head) on
    CUDA, from the forward's own kernels: packed documents with partial chunks, initial states, random dS', dO, dU."""
    from mcore_ssm.gdn_triton import launch_for, prepare, run_states

    gen = torch.Generator().manual_seed(seed)
    batch, seq, hk, hv, d = 2, 1000, 4, 8, 128
    q = F.normalize(torch.randn(batch, seq, hk, d, generator=gen), dim=-1)
    k = F.normalize(torch.randn(batch, seq, hk, d, generator=gen), dim=-1)
    v = torch.randn(batch, seq, hv, d, generator=gen)
    gate = -F.softplus(torch.randn(batch, seq, hv, generator=gen) * 2)  # down to ~-7 a token
    beta = torch.sigmoid(torch.randn(batch, seq, hv, generator=gen))
    h0 = torch.randn(5, hv, d, d, generator=gen) * 0.1
    q, k, v = (t.to("cuda", dtype) for t in (q, k, v))
    gate, beta, h0 = (t.cuda() for t in (gate, beta, h0))
    cu = torch.tensor([0, 1, 130, 1000, 1300, 2000], dtype=torch.int32, device="cuda")
    launch = launch_for(q, k, v, gate, beta, None, h0, cu, None)
    u, states, _ = run_states(
        launch, k, prepare(launch, k, v, gate, beta, torch.float32), h0, final=False, states_dtype=torch.float32
    )
    chunks, tokens = launch.chunk_starts.numel(), batch * seq
    dstates = torch.randn(chunks, hv, d, d, generator=gen).cuda() * 0.1
    dout = torch.randn(tokens, hv, d, generator=gen).to("cuda", dtype)
    du = torch.randn(tokens, hv, d, generator=gen).cuda()
    return launch, (q, k, v, gate, beta), (u, states, dstates), (dout, du)


@pytest.mark.gpu
def test_bench_heads_bf16_split_equals_one_kernel_within_1e2_deterministic():
    """dk = dv = 128, bf16 q/k/v/dO: every gradient within 1e-2 of the one-kernel version, in the inputs' dtypes;
    two calls give the same bits (no atomics)."""
    from mcore_ssm.gdn_triton_chunk_bwd import chunk_terms_bwd
    from mcore_ssm.gdn_triton_chunk_bwd_split import chunk_terms_bwd_split

    launch, inputs, saved, grads = _bench_terms(torch.bfloat16)
    got = chunk_terms_bwd_split(launch, inputs, saved, grads)
    again = chunk_terms_bwd_split(launch, inputs, saved, grads)
    want = chunk_terms_bwd(launch, inputs, saved, grads)
    assert [t.dtype for t in got] == [t.dtype for t in inputs]
    for a, b, e in zip(got, again, want, strict=True):
        assert torch.equal(a, b)
        assert rel(a, e) < 1e-2


@pytest.mark.gpu
def test_bench_heads_fp32_split_equals_fp64_autograd():
    """dk = dv = 128 in fp32 (the ieee path): every gradient within 1e-5 of autograd through the fp64 torch terms."""
    from mcore_ssm.gdn_triton_bwd import chunk_terms_bwd_reference
    from mcore_ssm.gdn_triton_chunk_bwd_split import chunk_terms_bwd_split

    launch, inputs, saved, grads = _bench_terms(torch.float32)
    got = chunk_terms_bwd_split(launch, inputs, saved, grads)
    want = chunk_terms_bwd_reference(launch, tuple(t.double() for t in inputs), saved, grads)
    for a, e in zip(got, want, strict=True):
        assert rel(a, e) < 1e-5


def test_the_backward_kernel_is_chosen_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """``MCORE_SSM_GDN_CHUNK_BWD`` picks the split (default) or the one-kernel backward; anything else is refused."""
    from mcore_ssm.kernel_choice import gdn_chunk_bwd

    monkeypatch.delenv("MCORE_SSM_GDN_CHUNK_BWD", raising=False)
    assert gdn_chunk_bwd() == "split"
    monkeypatch.setenv("MCORE_SSM_GDN_CHUNK_BWD", "one")
    assert gdn_chunk_bwd() == "one"
    monkeypatch.setenv("MCORE_SSM_GDN_CHUNK_BWD", "fast")
    from mcore.errors import UserError

    with pytest.raises(UserError, match="MCORE_SSM_GDN_CHUNK_BWD = 'fast'; allowed: split, one"):
        gdn_chunk_bwd()
