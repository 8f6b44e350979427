"""The fused Triton gated RMSNorm (``mcore_ssm.norm_triton``) against ``norm.gated_rms_norm``'s autograd.

CPU: in Triton's interpreter (a child process, ``mcore_testing.interpreted``, the bounds checker on), fp32: the output
and the gradients of ``x``, the gate (a split view of a wider projection: the whole projection's gradient compared)
and the weight within 1e-5 of the torch path, for GDN's form (norm before the gate, per value head, one ``(dv,)``
weight shared by the heads, ``dv`` not a power of two; called on ``(..., hv * dv)`` with ``group_size = dv`` and on
``(..., hv, dv)``) and Mamba2's (gate before the norm, in groups and whole), one backward program walking every token
tile. GPU (``-m gpu``): bf16 at ``hybrid-bench``'s GDN shape and a Mamba2 one within 1e-2 of the fp32 torch path.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from ssm_cases import needs_triton, raises_value_error

from mcore_testing.interpreted import interpreted_records

# (name, B, T, heads, head dim, norm_before_gate, group_size for Mamba2's form, backward programs or None)
CASES: list[tuple[str, int, int, int, int, bool, int | None, int | None]] = [
    ("gdn-heads-flat", 2, 37, 3, 12, True, None, None),
    ("gdn-heads-4d", 2, 37, 3, 12, True, None, 1),
    ("mamba2-groups", 2, 37, 1, 24, False, 8, None),
    ("mamba2-whole-one-program", 2, 37, 1, 24, False, None, 1),
]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp64; NaN where either is not finite (NaN never passes)."""
    a, b = out.detach().double(), ref.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(
    name: str,
    batch: int,
    seq: int,
    heads: int,
    head_dim: int,
    before: bool,
    group: int | None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> list[float]:
    """The relative errors of the output and the gradients of ``x``, the whole gate projection and the weight."""
    from mcore_ssm.norm import gated_rms_norm
    from mcore_ssm.norm_triton import gated_rms_norm_triton

    gen = torch.Generator().manual_seed(0)
    features = heads * head_dim
    x = torch.randn(batch, seq, features, generator=gen)
    wide = torch.randn(batch, seq, features + 7, generator=gen) * 2  # the gate is columns 3 .. 3 + F
    weight = 1 + 0.3 * torch.randn(head_dim if before else features, generator=gen)
    probe = torch.randn(batch, seq, features, generator=gen)
    results = []
    for fused in (True, False):
        kind = dtype if fused else torch.float32
        leaves = [t.to(device=device, dtype=kind).clone().requires_grad_() for t in (x, wide, weight)]
        xl, wl = leaves[0], leaves[2]
        gate = leaves[1][..., 3 : 3 + features]  # (B, T, F) strided view
        if before and name.endswith("4d"):  # (B, T, hv, dv), the whole last dim
            heads_x, heads_g = xl.unflatten(-1, (heads, head_dim)), gate.unflatten(-1, (heads, head_dim))
            norm = gated_rms_norm_triton if fused else gated_rms_norm
            y = norm(heads_x, heads_g, wl, 1e-6).flatten(-2)
        elif before:  # (B, T, hv * dv), one (dv,) weight over groups of dv
            if fused:
                y = gated_rms_norm_triton(xl, gate, wl, 1e-6, group_size=head_dim)
            else:
                heads_x, heads_g = xl.unflatten(-1, (heads, head_dim)), gate.unflatten(-1, (heads, head_dim))
                y = gated_rms_norm(heads_x, heads_g, wl, 1e-6).flatten(-2)
        else:
            norm = gated_rms_norm_triton if fused else gated_rms_norm
            y = norm(xl, gate, wl, 1e-6, norm_before_gate=False, group_size=group)
        (y.float() * probe.to(device)).sum().backward()
        results.append([y, *(leaf.grad for leaf in leaves)])
    return [_rel(a, b) for a, b in zip(*results, strict=True)]


def _empty() -> list[list[int]]:
    """No tokens (found by review: the backward divided by zero programs): empty output and gradients."""
    from mcore_ssm.norm_triton import gated_rms_norm_triton

    x, gate = torch.randn(0, 2, 8, requires_grad=True), torch.randn(0, 2, 8, requires_grad=True)
    weight = torch.ones(8, requires_grad=True)
    out = gated_rms_norm_triton(x, gate, weight, 1e-6)
    grads = torch.autograd.grad(out.sum(), (x, gate, weight))
    return [list(out.shape), *[list(g.shape) for g in grads], [int(grads[2].abs().sum())]]


def _bad_calls() -> list[bool]:
    """Each malformed call raises a ``ValueError``: a gate of another shape, a weight of neither size, a group size
    not dividing the features."""
    from mcore_ssm.norm_triton import gated_rms_norm_triton

    x = torch.randn(3, 12)
    bad = [
        lambda: gated_rms_norm_triton(x, torch.randn(3, 11), torch.ones(12), 1e-6),
        lambda: gated_rms_norm_triton(x, x, torch.ones(5), 1e-6, group_size=4),
        lambda: gated_rms_norm_triton(x, x, torch.ones(12), 1e-6, group_size=5),
    ]
    return raises_value_error(bad)


def interpreted_main() -> None:
    """(Child process, ``TRITON_INTERPRET=1``.) One JSON line per case."""
    import mcore_ssm.norm_triton as norm_triton

    for name, batch, seq, heads, head_dim, before, group, programs in CASES:
        norm_triton._BWD_PROGRAMS = programs or 1024
        print(json.dumps({"name": name, "rels": compare(name, batch, seq, heads, head_dim, before, group)}))
    print(json.dumps({"name": "bad-calls", "raised": _bad_calls()}))
    print(json.dumps({"name": "empty", "shapes": _empty()}))


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, Any]]:
    return interpreted_records(__file__)


@needs_triton
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_fused_norm_equals_the_torch_path_in_interpreter(records: dict[str, dict[str, Any]], name: str) -> None:
    """Output, d(x), d(gate projection), d(weight) within 1e-5 of the torch path (fp32; NaN fails)."""
    rels = records[name]["rels"]
    assert len(rels) == 4 and all(r < 1e-5 for r in rels), rels


@needs_triton
def test_malformed_calls_raise(records: dict[str, dict[str, Any]]) -> None:
    assert records["bad-calls"]["raised"] == [True, True, True]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "heads, head_dim, before, group",
    [(16, 128, True, None), (1, 2048, False, 256)],
    ids=["gdn-hybrid-bench", "mamba2-8-groups"],
)
def test_bf16_within_1e2(heads: int, head_dim: int, before: bool, group: int | None) -> None:
    """bf16 on CUDA at B 2 x T 4096: output and every gradient within 1e-2 of the fp32 torch path."""
    rels = compare("cuda", 2, 4096, heads, head_dim, before, group, dtype=torch.bfloat16, device="cuda")
    assert all(r < 1e-2 for r in rels), rels


@needs_triton
def test_zero_tokens(records: dict[str, dict[str, Any]]) -> None:
    assert records["empty"]["shapes"] == [[0, 2, 8], [0, 2, 8], [0, 2, 8], [8], [0]]
