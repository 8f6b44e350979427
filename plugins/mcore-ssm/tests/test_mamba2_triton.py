"""The Triton forward of Mamba2's chunked scan (``mcore_ssm.mamba2_triton``) against the torch references, and
the kernel choice (``mcore_ssm.mamba2_kernels``). The kernel tests need CUDA (``gpu``); one runs the kernels in
Triton's CPU interpreter (``slow``: a subprocess, since the interpreter is chosen when Triton is imported)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from ssm_cases import SCAN_NAMES, rel, run_interpreted
from ssm_cases import scan_inputs as inputs

from mcore.protocols.block import BlockContext
from mcore_ssm.mamba2 import Mamba2
from mcore_ssm.mamba2_kernels import pick
from mcore_ssm.mamba2_reference import ssd_chunked, ssd_sequential


def test_auto_takes_the_reference_on_cpu_and_names_bad_kernels(monkeypatch):
    assert pick("auto", torch.device("cpu"), 64) == "torch"
    assert pick("torch", torch.device("cuda"), 64) == "torch"
    assert pick("triton", torch.device("cpu"), 64) == "triton"
    with pytest.raises(ValueError, match="kernel = 'cuda'"):
        pick("cuda", torch.device("cpu"), 64)
    with pytest.raises(ValueError, match="kernel = 'fast'"):
        Mamba2.Config(kernel="fast")
    monkeypatch.delenv("MCORE_SSM_KERNELS", raising=False)  # the default on CUDA: the kernel, where Triton is
    assert pick("auto", torch.device("cuda"), 64) == ("triton" if importlib.util.find_spec("triton") else "torch")
    for opt_out in ("torch", "reference"):
        monkeypatch.setenv("MCORE_SSM_KERNELS", opt_out)
        assert pick("auto", torch.device("cuda"), 64) == "torch"


def test_auto_on_cuda_needs_a_power_of_two_chunk(monkeypatch):
    monkeypatch.setenv("MCORE_SSM_KERNELS", "triton")
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
    errors = run_interpreted(INTERPRETED, 6)
    assert all(e < 1e-5 for e in errors), errors


BACKWARD = """
import torch
from mcore_ssm.mamba2_triton import ssd_chunked_triton
from mcore_ssm.mamba2_reference import ssd_chunked
from ssm_cases import rel, scan_inputs
errors = []
cases = [  # (rows, seq, heads, p, groups, n, states, cu_seqlens, chunk, outputs the loss reads)
    (1, 100, 2, 80, 1, 8, 2, [0, 70, 100], 64, "y"),  # two p blocks, a segment of two chunks
    (1, 100, 2, 80, 1, 8, 2, [0, 70, 100], 64, "final"),  # only the final state's gradient
    (2, 40, 4, 16, 2, 5, None, None, 16, "both"),  # rows, no initial state, 2 heads a group
    (1, 100, 2, 40, 1, 72, 2, [0, 70, 100], 32, "both"),  # d_state in 3 blocks (the last masked), 2 p blocks
]
for b, t, h, p, g, n, states, cu, chunk, reads in cases:
    args = scan_inputs(b, t, h, p, g, n, states, seed=len(errors))
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    grads, outputs = [], []
    for fn in (ssd_chunked_triton, ssd_chunked):
        leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
        y, final = fn(**leaves, cu_seqlens=cu, chunk_size=chunk)
        gen = torch.Generator().manual_seed(7)
        wy, ws = torch.randn(y.shape, generator=gen), torch.randn(final.shape, generator=gen)
        loss = (y * wy).sum() * (reads != "final") + (final * ws).sum() * (reads != "y")
        loss.backward()
        grads.append({k: v.grad for k, v in leaves.items()})
        outputs.append((y.detach(), final.detach()))
    errors += [rel(outputs[0][0], outputs[1][0]), rel(outputs[0][1], outputs[1][1])]
    for name, want in grads[1].items():  # the loss reads y times 0 for "final": zero gradients must match too
        errors.append(rel(grads[0][name], want))
print(*errors)
"""


@pytest.mark.slow
def test_triton_backward_in_interpreter_equals_the_reference_gradients():
    """The Triton backward (``mamba2_triton_bwd``: ``_entering_grad``, ``_state_passing_bwd``, ``_chunk_bwd_dx``,
    ``_chunk_bwd_bc``) against the torch chunked reference's autograd, fp32: the outputs and every input's gradient,
    several p blocks, several d_state blocks, the final state's gradient alone, rows."""
    errors = run_interpreted(BACKWARD, 4 * 2 + 8 + 8 + 7 + 8)
    assert all(e < 1e-5 for e in errors), errors


@pytest.mark.gpu
@pytest.mark.parametrize(("head_dim", "d_state", "chunk"), [(16, 16, 16), (20, 17, 64), (64, 128, 64), (64, 64, 128)])
def test_kernel_fp32_equals_recurrence_packed_with_states(head_dim, d_state, chunk):
    from mcore_ssm.mamba2_triton import ssd_chunked_triton

    cu = torch.tensor([0, 1, 64, 65, 300, 429, 600], dtype=torch.int32, device="cuda")
    args = inputs(2, 300, 4, head_dim, 2, d_state, 6, device="cuda")
    leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
    y, final = ssd_chunked_triton(**leaves, cu_seqlens=cu, chunk_size=chunk)
    ref_y, ref_final = ssd_sequential(**{k: v.double() for k, v in args.items()}, cu_seqlens=cu)
    assert rel(y, ref_y) < 1e-5 and rel(final, ref_final) < 1e-5
    probe, probe_s = torch.randn_like(y), torch.randn_like(final)
    ((y * probe).sum() + (final * probe_s).sum()).backward()
    want = {k: v.clone().requires_grad_() for k, v in args.items()}
    y2, final2 = ssd_chunked(**want, cu_seqlens=cu, chunk_size=chunk)
    ((y2 * probe).sum() + (final2 * probe_s).sum()).backward()
    for name in SCAN_NAMES:
        assert rel(leaves[name].grad, want[name].grad) < 1e-5, name


@pytest.mark.gpu
def test_kernel_bf16_within_1e2():
    from mcore_ssm.mamba2_triton import ssd_chunked_triton

    args = inputs(2, 512, 8, 64, 1, 128, None, device="cuda")
    low = {k: v.bfloat16() if k in ("x", "B", "C") else v for k, v in args.items()}
    y, _ = ssd_chunked_triton(**low)
    ref, _ = ssd_sequential(**{k: v.double() for k, v in args.items()})
    assert y.dtype == torch.bfloat16 and rel(y, ref) < 1e-2


@pytest.mark.gpu
def test_kernel_bf16_gradients_within_1e2():
    """bf16 x, B, C (bf16 tile products, fp32 accumulation): every gradient within 1e-2 of the fp32 reference's."""
    from mcore_ssm.mamba2_triton import ssd_chunked_triton

    cu = torch.tensor([0, 700, 701, 1024], dtype=torch.int32, device="cuda")
    args = inputs(1, 1024, 8, 64, 2, 128, 3, device="cuda")
    low = {k: (v.bfloat16() if k in ("x", "B", "C") else v).clone().requires_grad_() for k, v in args.items()}
    y, final = ssd_chunked_triton(**low, cu_seqlens=cu)
    probe, probe_s = torch.randn_like(y, dtype=torch.float32), torch.randn_like(final)
    ((y.float() * probe).sum() + (final * probe_s).sum()).backward()
    want = {k: v.clone().requires_grad_() for k, v in args.items()}
    y2, final2 = ssd_chunked(**want, cu_seqlens=cu)
    ((y2 * probe).sum() + (final2 * probe_s).sum()).backward()
    for name in SCAN_NAMES:
        assert low[name].grad is not None and rel(low[name].grad, want[name].grad) < 1e-2, name


@pytest.mark.gpu
def test_block_triton_kernel_equals_torch_kernel_on_cuda():
    torch.manual_seed(0)
    block = Mamba2(Mamba2.Config(d_state=64, headdim=32, ngroups=2, kernel="triton"), hidden_size=128).cuda()
    hidden = torch.randn(1, 300, 128, device="cuda", requires_grad=True)
    ctx = BlockContext(cu_seqlens=torch.tensor([0, 100, 101, 300], dtype=torch.int32, device="cuda"), max_seqlen=199)
    out = block(hidden, ctx)
    (grad,) = torch.autograd.grad(out.square().sum(), hidden)
    block.config.kernel = "torch"
    ref = block(hidden, ctx)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), hidden)
    assert rel(out, ref) < 1e-5 and rel(grad, ref_grad) < 1e-5
