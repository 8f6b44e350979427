"""The Triton scans under ``torch.compile`` (``train.compile = "blocks"`` on a hybrid model): they run as they are,
the graph broken around them (``torch.compiler.disable``), instead of the compiled torch reference (~3x slower; the
choice fell back to it while tracing) or a trace into the kernels (which fails). CPU: Triton's interpreter, fp32,
``backend="aot_eager"``: output and every gradient equal to the eager call, for GDN and Mamba2."""

from __future__ import annotations

from ssm_cases import run_interpreted

SCRIPT = """
import torch, torch.nn.functional as F
torch.set_num_threads(1)
from mcore_ssm.gdn_kernels import gated_delta_rule
from mcore_ssm.mamba2_kernels import ssd_scan

gen = torch.Generator().manual_seed(0)
rel = lambda a, b: float((a - b).double().norm() / b.double().norm())
cu = torch.tensor([0, 30, 70], dtype=torch.int32)


def check(fn, inputs):
    leaves = [t.clone().requires_grad_() for t in inputs]
    eager = fn(*leaves)
    grads = torch.autograd.grad(eager, leaves)
    again = [t.clone().requires_grad_() for t in inputs]
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=False)(*again)
    cgrads = torch.autograd.grad(compiled, again)
    print(rel(compiled, eager), max(rel(a, b) for a, b in zip(cgrads, grads)))


def gdn(q, k, v, g, beta):
    out, _ = gated_delta_rule(q * 1.0, k, v, g, beta, cu_seqlens=cu, kernel="triton")
    return (out * out).sum()


q = F.normalize(torch.randn(1, 70, 1, 16, generator=gen), dim=-1)
k = F.normalize(torch.randn(1, 70, 1, 16, generator=gen), dim=-1)
check(gdn, [q, k, torch.randn(1, 70, 2, 16, generator=gen), -torch.rand(1, 70, 2, generator=gen),
            torch.sigmoid(torch.randn(1, 70, 2, generator=gen))])


def mamba(x, dt, A, B, C):
    out, _ = ssd_scan(x * 1.0, dt, A, B, C, None, cu_seqlens=cu, kernel="triton")
    return (out * out).sum()


check(mamba, [torch.randn(1, 70, 2, 8, generator=gen), torch.rand(1, 70, 2, generator=gen) * 0.5 + 0.01,
              -torch.rand(2, generator=gen) - 0.5, torch.randn(1, 70, 1, 16, generator=gen),
              torch.randn(1, 70, 1, 16, generator=gen)])
"""


def test_compiled_calls_run_the_kernels_and_equal_eager() -> None:
    gdn_out, gdn_grads, mamba_out, mamba_grads = run_interpreted(SCRIPT, 4, timeout=600)
    assert gdn_out == 0.0 and gdn_grads == 0.0  # the same kernels on the same inputs: bit-equal
    assert mamba_out == 0.0 and mamba_grads == 0.0
