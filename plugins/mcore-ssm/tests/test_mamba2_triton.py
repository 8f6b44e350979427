"""The Triton forward of Mamba2's chunked scan (``mcore_ssm.mamba2_triton``) against the torch references, and
the kernel choice (``mcore_ssm.mamba2_kernels``). The kernel tests need CUDA (``gpu``); one runs the kernels in
Triton's CPU interpreter (``slow``: a subprocess, since the interpreter is chosen when Triton is imported)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mcore.protocols.block import BlockContext
from mcore_ssm.mamba2 import Mamba2
from mcore_ssm.mamba2_kernels import pick
from mcore_ssm.mamba2_reference import ssd_chunked, ssd_sequential

NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm())


def inputs(batch, seq, heads, head_dim, groups, d_state, states, *, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {
        "x": torch.randn(batch, seq, heads, head_dim, generator=g),
        "dt": torch.randn(batch, seq, heads, generator=g) - 1.0,
        "A": -(torch.rand(heads, generator=g) * 3 + 0.5),
        "B": torch.randn(batch, seq, groups, d_state, generator=g),
        "C": torch.randn(batch, seq, groups, d_state, generator=g),
        "D": torch.randn(heads, generator=g),
        "dt_bias": torch.randn(heads, generator=g) * 0.5,
        "initial_state": None if states is None else torch.randn(states, heads, head_dim, d_state, generator=g),
    }
    return {k: None if v is None else v.to(device) for k, v in out.items()}


def test_auto_takes_the_reference_on_cpu_and_names_bad_kernels(monkeypatch):
    assert pick("auto", torch.device("cpu"), 64) == "torch"
    assert pick("torch", torch.device("cuda"), 64) == "torch"
    assert pick("triton", torch.device("cpu"), 64) == "triton"
    with pytest.raises(ValueError, match="kernel = 'cuda'"):
        pick("cuda", torch.device("cpu"), 64)
    with pytest.raises(ValueError, match="kernel = 'fast'"):
        Mamba2.Config(kernel="fast")
    monkeypatch.setenv("MCORE_SSM_KERNELS", "reference")
    assert pick("auto", torch.device("cuda"), 64) == "torch"


def test_auto_on_cuda_needs_a_power_of_two_chunk(monkeypatch):
    monkeypatch.delenv("MCORE_SSM_KERNELS", raising=False)
    for chunk in (8, 48):  # too small for tl.dot, not a power of two: the reference
        assert pick("auto", torch.device("cuda"), chunk) == "torch"


INTERPRETED = """
import torch
from mcore_ssm.mamba2_triton import ssd_chunked_triton
from mcore_ssm.mamba2_reference import ssd_chunked, ssd_sequential
from mcore_ssm.mamba2 import Mamba2
from mcore.protocols.block import BlockContext
g = torch.Generator().manual_seed(0)
heads, p, groups, n = 4, 20, 2, 17  # p, n not powers of two: masked blocks
args = dict(
    x=torch.randn(1, 50, heads, p, generator=g), dt=torch.randn(1, 50, heads, generator=g) - 1,
    A=-(torch.rand(heads, generator=g) * 3 + 0.5), B=torch.randn(1, 50, groups, n, generator=g),
    C=torch.randn(1, 50, groups, n, generator=g), D=torch.randn(heads, generator=g),
    dt_bias=torch.randn(heads, generator=g) * 0.5, initial_state=torch.randn(4, heads, p, n, generator=g),
)
cu = torch.tensor([0, 1, 17, 49, 50], dtype=torch.int32)  # one token, a chunk and one, two chunks, one token
rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())
ref_y, ref_s = ssd_sequential(**{k: v.double() for k, v in args.items()}, cu_seqlens=cu)
leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
y, s = ssd_chunked_triton(**leaves, cu_seqlens=cu, chunk_size=16)
(y.square().sum() + s.square().sum()).backward()
torch_leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
y2, s2 = ssd_chunked(**torch_leaves, cu_seqlens=cu, chunk_size=16)
(y2.square().sum() + s2.square().sum()).backward()
grad = max(rel(leaves[k].grad, torch_leaves[k].grad) for k in args)
rows = {k: torch.cat([v, v.flip(1)]) if k in ("x", "dt", "B", "C") else v for k, v in args.items()}  # 2 rows
rows["initial_state"] = args["initial_state"][:2]
y3, s3 = ssd_chunked_triton(**rows, chunk_size=32)  # rows, 50 tokens: a partial last chunk
y4, s4 = ssd_sequential(**{k: v.double() for k, v in rows.items()})
block = Mamba2(Mamba2.Config(d_state=16, headdim=16, ngroups=2, chunk_size=16, kernel="triton"), hidden_size=32)
hidden = torch.randn(1, 40, 32, generator=g)
ctx = BlockContext(cu_seqlens=torch.tensor([0, 7, 40], dtype=torch.int32), max_seqlen=33)
kernel_out = block(hidden, ctx)
block.config.kernel = "torch"
block_rel = rel(kernel_out, block(hidden, ctx))
print(rel(y, ref_y), rel(s, ref_s), grad, rel(y3, y4), rel(s3, s4), block_rel)
"""


@pytest.mark.slow
def test_kernels_in_triton_interpreter_equal_the_references():
    pytest.importorskip("triton")  # not a dependency of the package: only the GPU path needs it
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(INTERPRETED)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    errors = [float(x) for x in run.stdout.split()]
    assert len(errors) == 6 and all(e < 1e-5 for e in errors), errors


@pytest.mark.gpu
@pytest.mark.parametrize(("head_dim", "d_state", "chunk"), [(16, 16, 16), (20, 17, 64), (64, 128, 64), (64, 64, 128)])
def test_kernel_fp32_equals_recurrence_packed_with_states(head_dim, d_state, chunk):
    from mcore_ssm.mamba2_triton import ssd_chunked_triton

    cu = torch.tensor([0, 1, 64, 65, 300, 429, 600], dtype=torch.int32, device="cuda")
    args = inputs(2, 300, 4, head_dim, 2, d_state, 6, device="cuda")
    leaves = {k: None if v is None else v.clone().requires_grad_() for k, v in args.items()}
    y, final = ssd_chunked_triton(**leaves, cu_seqlens=cu, chunk_size=chunk)
    ref_y, ref_final = ssd_sequential(**{k: v.double() for k, v in args.items()}, cu_seqlens=cu)
    assert rel(y, ref_y) < 1e-5 and rel(final, ref_final) < 1e-5
    probe, probe_s = torch.randn_like(y), torch.randn_like(final)
    ((y * probe).sum() + (final * probe_s).sum()).backward()
    want = {k: v.clone().requires_grad_() for k, v in args.items()}
    y2, final2 = ssd_chunked(**want, cu_seqlens=cu, chunk_size=chunk)
    ((y2 * probe).sum() + (final2 * probe_s).sum()).backward()
    for name in NAMES:
        assert rel(leaves[name].grad, want[name].grad) < 1e-5, name


@pytest.mark.gpu
def test_kernel_bf16_within_1e2():
    from mcore_ssm.mamba2_triton import ssd_chunked_triton

    args = inputs(2, 512, 8, 64, 1, 128, None, device="cuda")
    low = {k: None if v is None else (v.bfloat16() if k in ("x", "B", "C") else v) for k, v in args.items()}
    y, _ = ssd_chunked_triton(**low)
    ref, _ = ssd_sequential(**{k: None if v is None else v.double() for k, v in args.items()})
    assert y.dtype == torch.bfloat16 and rel(y, ref) < 1e-2


@pytest.mark.gpu
def test_block_auto_kernel_equals_torch_kernel_on_cuda():
    torch.manual_seed(0)
    block = Mamba2(Mamba2.Config(d_state=64, headdim=32, ngroups=2), hidden_size=128).cuda()
    hidden = torch.randn(1, 300, 128, device="cuda", requires_grad=True)
    ctx = BlockContext(cu_seqlens=torch.tensor([0, 100, 101, 300], dtype=torch.int32, device="cuda"), max_seqlen=199)
    out = block(hidden, ctx)
    (grad,) = torch.autograd.grad(out.square().sum(), hidden)
    block.config.kernel = "torch"
    ref = block(hidden, ctx)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), hidden)
    assert rel(out, ref) < 1e-5 and rel(grad, ref_grad) < 1e-5
