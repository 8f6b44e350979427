"""Gated RMSNorm (``mcore_ssm.norm``) against its formula written out."""

from __future__ import annotations

import pytest
import torch

from mcore_ssm.norm import GatedRMSNorm, gated_rms_norm


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("group_size", [None, 4])
def test_formula(norm_before_gate, group_size):
    g = torch.Generator().manual_seed(0)
    x, z = (
        torch.randn(3, 5, 8, generator=g, dtype=torch.float64),
        torch.randn(3, 5, 8, generator=g, dtype=torch.float64),
    )
    w = torch.randn(8, generator=g, dtype=torch.float64)
    out = gated_rms_norm(x, z, w, 1e-6, norm_before_gate=norm_before_gate, group_size=group_size)
    gate = z * torch.sigmoid(z)
    h = x if norm_before_gate else x * gate
    size = group_size or 8
    parts = [p / (p.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() for p in h.split(size, -1)]
    ref = torch.cat(parts, -1) * w * (gate if norm_before_gate else 1)
    assert rel(out, ref) < 1e-12


def test_module_bf16_keeps_dtype_and_rejects_bad_config():
    norm = GatedRMSNorm(hidden_size=6)
    x = torch.randn(2, 6, dtype=torch.bfloat16)
    assert norm(x, x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="norm_eps"):
        GatedRMSNorm.Config(norm_eps=0.0)
    with pytest.raises(ValueError, match="group_size"):
        GatedRMSNorm(GatedRMSNorm.Config(group_size=4), hidden_size=6)
