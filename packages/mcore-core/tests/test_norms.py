"""``mcore.norms.fp32_norms``: the per-gradient norms behind the finiteness check and the global norm."""

from __future__ import annotations

import math

import torch


def test_fp32_norms_mixed_dtypes_and_non_finite() -> None:
    """Gradients of fp64 (a recipe keeping doubles), fp32 and bf16 in one call: each norm right, NaN and inf kept."""
    from mcore.norms import fp32_norms

    grads = [
        torch.tensor([3.0, 4.0], dtype=torch.float64),
        torch.tensor([1.0, -2.0, 2.0]),
        torch.tensor([6.0, 8.0], dtype=torch.bfloat16),
        torch.tensor([1.0, float("nan")]),
        torch.tensor([float("-inf"), 1.0], dtype=torch.float64),
    ]
    two = fp32_norms(grads, 2.0)
    assert [n.dtype for n in two] == [torch.float64, torch.float32, torch.float32, torch.float32, torch.float64]
    assert [float(n) for n in two[:3]] == [5.0, 3.0, 10.0]
    assert torch.isnan(two[3]) and torch.isinf(two[4])
    peaks = fp32_norms(grads, math.inf)
    assert [float(n) for n in peaks[:3]] == [4.0, 2.0, 8.0] and torch.isnan(peaks[3]) and torch.isinf(peaks[4])
    assert fp32_norms([], 2.0) == []
