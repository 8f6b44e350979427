"""Test helpers the mcore-ssm test files share: the relative error, random inputs of the Mamba2 scan, and running a
script in Triton's CPU interpreter (a subprocess: the interpreter is chosen when Triton is imported).

Named uniquely (not ``helpers``): pytest puts each tests folder on ``sys.path`` and other plugins have a ``helpers``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
import torch

#: Tests that run Triton kernels in the interpreter: Triton is not a dependency of the package (only the GPU path
#: needs it), so without it they skip.
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def raises_value_error(calls: list[Callable[[], object]]) -> list[bool]:
    """For each malformed call, whether it raised a ``ValueError``."""
    raised = []
    for call in calls:
        try:
            call()
            raised.append(False)
        except ValueError:
            raised.append(True)
    return raised


#: The Mamba2 scan's tensor arguments, in ``ssd_chunked``'s order.
SCAN_NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp64; NaN or inf in either fails."""
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def scan_inputs(
    batch: int,
    seq: int,
    heads: int,
    head_dim: int,
    groups: int,
    d_state: int,
    states: int | None,
    *,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random fp32 arguments of the Mamba2 scan (``dt`` before softplus, ``A < 0``); ``initial_state`` only when
    ``states`` (its count) is given."""
    g = torch.Generator().manual_seed(seed)
    out = {
        "x": torch.randn(batch, seq, heads, head_dim, generator=g),
        "dt": torch.randn(batch, seq, heads, generator=g) - 1.0,
        "A": -(torch.rand(heads, generator=g) * 3 + 0.5),
        "B": torch.randn(batch, seq, groups, d_state, generator=g),
        "C": torch.randn(batch, seq, groups, d_state, generator=g),
        "D": torch.randn(heads, generator=g),
        "dt_bias": torch.randn(heads, generator=g) * 0.5,
    }
    if states is not None:
        out["initial_state"] = torch.randn(states, heads, head_dim, d_state, generator=g)
    return {k: v.to(device) for k, v in out.items()}


def run_interpreted(script: str, count: int, timeout: int = 300) -> list[float]:
    """Run ``script`` under ``TRITON_INTERPRET=1`` (every masked load and store bounds-checked:
    ``mcore_testing.interpreter_bounds``) and return the ``count`` numbers it prints (skipped without Triton: not a
    dependency of the package, only the GPU path needs it)."""
    pytest.importorskip("triton")
    here = os.path.dirname(os.path.abspath(__file__))  # the script may import this module
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH", "")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    bounds = "from mcore_testing.interpreter_bounds import install\ninstall()\n"  # out-of-bounds accesses raise
    run = subprocess.run(
        [sys.executable, "-c", bounds + textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    numbers = [float(x) for x in run.stdout.split()]
    assert len(numbers) == count, run.stdout[-2000:]
    return numbers


def gdn_strong_decay_errors(gate_min: float, device: str = "cpu", rule: str = "triton") -> list[float]:
    """The gated delta rule in fp32 (``rule``: ``"triton"``, the kernels; ``"chunked"``, the torch chunked form)
    against the fp64 recurrence with per-token gates ``g`` uniform in ``(gate_min, 0)``, packed documents whose
    last chunks are partial, initial and final states: the relative errors of the output, the final state and the
    gradients of ``q, k, v, g, beta, h0`` (``rel`` fails on NaN/inf). The cumulative decay of a chunk reaches
    ``64 * gate_min``: its exp must underflow, never overflow, and ``dg`` must not cancel."""
    import torch.nn.functional as F

    from mcore_ssm.gdn_reference import chunk_gated_delta_rule, recurrent_gated_delta_rule

    if rule == "triton":
        from mcore_ssm.gdn_triton import gated_delta_rule_triton as tested
    else:
        tested = chunk_gated_delta_rule

    gen = torch.Generator().manual_seed(0)
    tokens, hk, hv, dk, dv = 210, 1, 2, 16, 16
    cu = torch.tensor([0, 70, 71, 210], dtype=torch.int32, device=device)  # last chunks of 6, 1 and 11 tokens
    q = F.normalize(torch.randn(1, tokens, hk, dk, generator=gen), dim=-1)
    k = F.normalize(torch.randn(1, tokens, hk, dk, generator=gen), dim=-1)
    v = torch.randn(1, tokens, hv, dv, generator=gen)
    gate = torch.rand(1, tokens, hv, generator=gen) * gate_min
    beta = torch.rand(1, tokens, hv, generator=gen)
    h0 = torch.randn(3, hv, dk, dv, generator=gen) * 0.3
    probe, probe_s = torch.randn(1, tokens, hv, dv, generator=gen), torch.randn(3, hv, dk, dv, generator=gen)
    results = []
    for fn, dtype in ((tested, torch.float32), (recurrent_gated_delta_rule, torch.float64)):
        leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v, gate, beta, h0)]
        out, final = fn(*leaves[:5], cu_seqlens=cu, initial_state=leaves[5], output_final_state=True)
        assert final is not None
        loss = (out * probe.to(out)).sum() + (final * probe_s.to(final)).sum()
        results.append([out, final, *torch.autograd.grad(loss, leaves)])
    return [rel(a, b) for a, b in zip(*results, strict=True)]


def gdn_inverse_fp64(
    chunk_starts: torch.Tensor, chunk_lengths: torch.Tensor, k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """Each chunk's ``T = (I + A)^-1`` of the gated delta rule in fp64 by ``torch.linalg.solve_triangular``, ``(M,
    hv, 64, 64)`` on the CPU: ``I + A`` padded to the chunk with the identity (the Triton WY kernel's rows past a
    segment's end). ``k (B, T, hk, dk)``, ``g, beta (B, T, hv)``; chunks as ``gdn_triton.chunk_layout`` cuts them."""
    chunk = 64
    kf, gf, bf = (t.detach().flatten(0, 1).double().cpu() for t in (k, g, beta))  # (N, h, ...)
    hv = gf.shape[1]
    kf = kf.repeat_interleave(hv // kf.shape[1], dim=1)  # (N, hv, dk)
    out = []
    for start, count in zip(chunk_starts.tolist(), chunk_lengths.tolist(), strict=True):
        rows = slice(start, start + count)
        kc, bc, gc = kf[rows].transpose(0, 1), bf[rows].T, gf[rows].T.cumsum(-1)  # (hv, c, dk), (hv, c) G
        between = (gc[:, :, None] - gc[:, None, :]).tril(-1)  # (hv, c, c) G_i - G_j, j < i
        a = torch.zeros(hv, chunk, chunk, dtype=torch.float64)
        a[:, :count, :count] = (bc[:, :, None] * (kc @ kc.transpose(1, 2)) * between.exp()).tril(-1)
        eye = torch.eye(chunk, dtype=torch.float64).expand_as(a)
        out.append(torch.linalg.solve_triangular(eye + a, eye, upper=False, unitriangular=True))
    return torch.stack(out)  # (M, hv, C, C)


def worst_chunk(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest ``||a - b|| / ||b||`` over the ``(M, hv)`` chunks of two ``(M, hv, C, C)`` inverses (NaN fails)."""
    a, b = a.detach().double().cpu().flatten(2), b.detach().double().cpu().flatten(2)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def bench_like_inputs(
    dtype: torch.dtype, *, seq: int = 1000, hk: int = 4, hv: int = 8, gate_min: float | None = None, seed: int = 0
) -> list[torch.Tensor]:
    """``q, k (2, seq, hk, 128)``, ``v (2, seq, hv, 128)`` in ``dtype`` on CUDA, fp32 gates (``-softplus``: down to ~-7
    a token, or uniform in ``(gate_min, 0)``), betas and initial states for 5 documents ``(5, hv, 128, 128)``: the
    bench's head dims, for the GPU tests."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    batch, d = 2, 128
    q = F.normalize(torch.randn(batch, seq, hk, d, generator=gen), dim=-1)
    k = F.normalize(torch.randn(batch, seq, hk, d, generator=gen), dim=-1)
    v = torch.randn(batch, seq, hv, d, generator=gen)
    gate = -F.softplus(torch.randn(batch, seq, hv, generator=gen) * 2)
    if gate_min is not None:
        gate = torch.rand(batch, seq, hv, generator=gen) * gate_min
    beta = torch.sigmoid(torch.randn(batch, seq, hv, generator=gen))
    h0 = torch.randn(5, hv, d, d, generator=gen) * 0.1
    return [t.to("cuda", dtype if i < 3 else torch.float32) for i, t in enumerate((q, k, v, gate, beta, h0))]


def wy_case(gate_min: float, repeated: bool, dk: int, dv: int = 80) -> tuple[torch.Tensor, ...]:
    """The WY/inverse interpreter tests' inputs (fp32, CPU, seed 1): ``k (1, 215, 1, dk)``, ``v (1, 215, 2, dv)``,
    gates ``g`` in ``[gate_min, 0]``, ``beta``, and ``cu`` (documents of 150, 1 and 64 tokens: chunks of 64, 64, 22 |
    1 | 64). ``repeated``: keys from three directions and beta near 1, so rows of ``A`` nearly cancel."""
    gen = torch.Generator().manual_seed(1)
    tokens, hk, hv = 215, 1, 2
    cu = torch.tensor([0, 150, 151, 215], dtype=torch.int32)
    if repeated:
        pool = torch.nn.functional.normalize(torch.randn(3, hk, dk, generator=gen), dim=-1)
        k = pool[torch.randint(0, 3, (tokens,), generator=gen)][None]
        beta = 0.9 + 0.1 * torch.rand(1, tokens, hv, generator=gen)
    else:
        k = torch.nn.functional.normalize(torch.randn(1, tokens, hk, dk, generator=gen), dim=-1)
        beta = torch.rand(1, tokens, hv, generator=gen)
    v = torch.randn(1, tokens, hv, dv, generator=gen)
    g = torch.rand(1, tokens, hv, generator=gen) * gate_min
    return k, v, g, beta, cu


def small_packed_case(dk: int, dv: int, gate_min: float) -> dict[str, torch.Tensor]:
    """The interpreter tests' GDN inputs (fp32, CPU, seeded by ``dk``): 2 rows of 70 tokens, 1 q/k head and 2 value
    heads, three packed documents of 3, 67 and 70 tokens (``cu``: partial chunks), gates in ``[gate_min, 0]``,
    initial states ``h0`` for the 3 documents, and the probes ``probe`` (output) and ``probe_s`` (final states) that
    the tests' losses take; drawn in that order, so every test sees the same values for the same ``dk``."""
    g = torch.Generator().manual_seed(dk)
    B, T, hk, hv = 2, 70, 1, 2
    case = {
        "q": torch.nn.functional.normalize(torch.randn(B, T, hk, dk, generator=g), dim=-1),
        "k": torch.nn.functional.normalize(torch.randn(B, T, hk, dk, generator=g), dim=-1),
        "v": torch.randn(B, T, hv, dv, generator=g),
        "gate": torch.rand(B, T, hv, generator=g) * gate_min,
        "beta": torch.sigmoid(torch.randn(B, T, hv, generator=g)),
        "cu": torch.tensor([0, 3, 70, 140], dtype=torch.int32),
        "h0": torch.randn(3, hv, dk, dv, generator=g) * 0.3,
    }
    case["probe"] = torch.randn(B, T, hv, dv, generator=g)
    case["probe_s"] = torch.randn(3, hv, dk, dv, generator=g)
    return case
