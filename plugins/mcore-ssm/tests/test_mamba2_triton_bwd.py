"""The Triton backward of Mamba2's chunked scan (``mcore_ssm.mamba2_triton_bwd``) on the paths the fp32 tests of
``test_mamba2_triton`` do not take: 16-bit operands (the tensor-core path: fp16 in Triton's CPU interpreter,
which cannot run bf16; bf16 on the GPU), no ``D`` skip with rows and no states, fp64 inputs (computed in fp32),
and a group of eight heads (``_chunk_bwd_bc`` sums the group's heads)."""

from __future__ import annotations

import pytest
import torch
from ssm_cases import SCAN_NAMES, rel, run_interpreted
from ssm_cases import scan_inputs as inputs

from mcore_ssm.mamba2_reference import ssd_chunked

HALF = """
import torch
from mcore_ssm.mamba2_triton import ssd_chunked_triton
from mcore_ssm.mamba2_reference import ssd_chunked
from ssm_cases import rel, scan_inputs
cu = torch.tensor([0, 70, 71, 128], dtype=torch.int32)
args = scan_inputs(1, 128, 8, 40, 1, 40, 3, seed=3)  # one group of 8 heads; p, n in masked blocks
low = {k: (v.half() if k in ("x", "B", "C") else v).clone().requires_grad_() for k, v in args.items()}
y, final = ssd_chunked_triton(**low, cu_seqlens=cu, chunk_size=32)
gen = torch.Generator().manual_seed(7)
probe, probe_s = torch.randn(y.shape, generator=gen), torch.randn(final.shape, generator=gen)
((y.float() * probe).sum() + (final * probe_s).sum()).backward()
want = {k: v.clone().requires_grad_() for k, v in args.items()}
y2, final2 = ssd_chunked(**want, cu_seqlens=cu, chunk_size=32)
((y2 * probe).sum() + (final2 * probe_s).sum()).backward()
dtypes = y.dtype == torch.float16 and all(low[k].grad.dtype == low[k].dtype for k in low)
print(float(dtypes), rel(y, y2), rel(final, final2), *(rel(low[k].grad, want[k].grad) for k in args))
"""


@pytest.mark.slow
def test_fp16_operands_in_interpreter_within_1e2_of_the_fp32_reference():
    """fp16 ``x``, ``B``, ``C``: 16-bit tile products with fp32 accumulation, entering states and state gradients
    in fp16; the output, final state and every gradient within 1e-2 of the fp32 torch reference (measured ~5e-4,
    the fp16 rounding of the inputs and operands), each gradient in its input's dtype."""
    same_dtypes, *errors = run_interpreted(HALF, 1 + 2 + 8)
    assert same_dtypes == 1.0
    assert all(e < 1e-2 for e in errors), errors


PLAIN = """
import torch
from mcore_ssm.mamba2_triton import ssd_chunked_triton
from mcore_ssm.mamba2_reference import ssd_chunked, ssd_sequential
from ssm_cases import rel, scan_inputs
errors = []
args = scan_inputs(2, 40, 4, 16, 2, 20, None, seed=5)
del args["D"]  # no D skip, no initial state, rows of 40 tokens: a partial last chunk
for fn in (ssd_chunked_triton, ssd_chunked):
    leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
    y, final = fn(**leaves, chunk_size=16)
    gen = torch.Generator().manual_seed(7)
    ((y * torch.randn(y.shape, generator=gen)).sum() + (final * torch.randn(final.shape, generator=gen)).sum()).backward()
    errors.append((y.detach(), final.detach(), {k: v.grad for k, v in leaves.items()}))
(y, f, g), (y2, f2, g2) = errors
out = [rel(y, y2), rel(f, f2), *(rel(g[k], g2[k]) for k in args)]
wide = {k: v.double() for k, v in scan_inputs(1, 50, 2, 16, 1, 16, 1, seed=6).items()}
y3, f3 = ssd_chunked_triton(**wide, chunk_size=16)
y4, f4 = ssd_sequential(**wide)
out += [float(y3.dtype == f3.dtype == torch.float64), rel(y3, y4), rel(f3, f4)]
print(*out)
"""


@pytest.mark.slow
def test_no_skip_rows_and_fp64_in_interpreter_equal_the_references():
    """No ``D`` (the kernels' ``HAS_D`` off), rows without states: output and gradients against the torch chunked
    reference's autograd in fp32; fp64 inputs computed in fp32, returned in fp64, against the fp64 recurrence."""
    *errors, fp64, y_err, state_err = run_interpreted(PLAIN, 2 + 6 + 3)
    assert fp64 == 1.0
    assert all(e < 1e-5 for e in (*errors, y_err, state_err)), (errors, y_err, state_err)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [32, 64, 128])
def test_bf16_gradients_of_a_group_of_eight_heads_within_1e2(chunk):
    """bf16 on the GPU (wgmma): a group of 8 heads, ``d_state`` 128 (four blocks of n), packed documents with
    states; every gradient within 1e-2 of the fp32 torch reference, in its input's dtype."""
    from mcore_ssm.mamba2_triton import ssd_chunked_triton

    cu = torch.tensor([0, 300, 301, 1024], dtype=torch.int32, device="cuda")
    args = inputs(1, 1024, 8, 64, 1, 128, 3, device="cuda", seed=chunk)
    low = {k: (v.bfloat16() if k in ("x", "B", "C") else v).clone().requires_grad_() for k, v in args.items()}
    y, final = ssd_chunked_triton(**low, cu_seqlens=cu, chunk_size=chunk)
    probe, probe_s = torch.randn_like(y, dtype=torch.float32), torch.randn_like(final)
    ((y.float() * probe).sum() + (final * probe_s).sum()).backward()
    want = {k: v.clone().requires_grad_() for k, v in args.items()}
    y2, final2 = ssd_chunked(**want, cu_seqlens=cu, chunk_size=chunk)
    ((y2 * probe).sum() + (final2 * probe_s).sum()).backward()
    assert rel(y, y2) < 1e-2 and rel(final, final2) < 1e-2
    for name in SCAN_NAMES:
        grad = low[name].grad
        assert grad is not None and grad.dtype == low[name].dtype, name
        assert rel(grad, want[name].grad) < 1e-2, name
