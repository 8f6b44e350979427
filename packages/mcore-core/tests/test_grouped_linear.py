"""MoE's grouped expert GEMM seam: the plain reference, a recipe that takes it over through the
context, one that declines, and the precision conformance check of a recipe's grouped GEMM."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mcore.precision.basic import FP32
from mcore.precision.grouped import grouped_linear, grouped_linear_reference
from mcore.protocols import BlockContext
from mcore_testing.conformance import PrecisionConformance


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(9, 8, generator=g), torch.randn(3, 5, 8, generator=g), torch.tensor([4, 0, 5])


def test_reference_is_one_gemm_per_expert_over_consecutive_rows() -> None:
    x, w, sizes = _inputs()
    out = grouped_linear_reference(x, w, sizes)
    expert_of_row = [0] * 4 + [2] * 5
    want = torch.stack([w[e] @ x[i] for i, e in enumerate(expert_of_row)])
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    empty = grouped_linear_reference(x[:0], w, torch.zeros(3, dtype=torch.long))
    assert empty.shape == (0, 5)
    padded = grouped_linear_reference(x, w, torch.tensor([4, 0, 4]))  # the last row is padding: zeros
    torch.testing.assert_close(padded[:8], out[:8])
    assert torch.equal(padded[8], torch.zeros(5))
    with pytest.raises(ValueError, match="sum to 10"):
        grouped_linear_reference(x, w, torch.tensor([4, 0, 6]))
    with pytest.raises(ValueError, match="negative: True"):
        grouped_linear_reference(x, w, torch.tensor([4, -1, 5]))
    with pytest.raises(ValueError, match=r"must be \(N, K\), \(E, F, K\)"):
        grouped_linear_reference(x, w[0], sizes)


class TakesGroupedGemm(FP32):
    """fp32 with its own grouped GEMM (one batched matmul over padded groups), counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def grouped_linear(self, x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor) -> Any:
        self.calls += 1
        expert = torch.repeat_interleave(torch.arange(weight.shape[0]), group_sizes)  # (N,)
        return torch.einsum("nk,nfk->nf", x, weight[expert])


class Declines(FP32):
    def grouped_linear(self, x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor) -> Any:
        return NotImplemented


class WrongGroupedGemm(TakesGroupedGemm):
    def grouped_linear(self, x: torch.Tensor, weight: torch.Tensor, group_sizes: torch.Tensor) -> Any:
        return super().grouped_linear(x, weight.flip(0), group_sizes)  # experts swapped


def test_the_context_recipe_takes_the_call_or_declines() -> None:
    x, w, sizes = _inputs()
    want = grouped_linear_reference(x, w, sizes)
    taking = TakesGroupedGemm()
    torch.testing.assert_close(grouped_linear(x, w, sizes, ctx=BlockContext(precision=taking)), want)
    assert taking.calls == 1
    torch.testing.assert_close(grouped_linear(x, w, sizes, ctx=BlockContext(precision=Declines())), want)
    torch.testing.assert_close(grouped_linear(x, w, sizes, ctx=BlockContext()), want)
    torch.testing.assert_close(grouped_linear(x, w, sizes), want)


class TestRecipeWithGroupedGemm(PrecisionConformance):
    def make_recipe(self) -> Any:
        return TakesGroupedGemm()


def test_conformance_catches_a_wrong_grouped_gemm() -> None:
    class Broken(PrecisionConformance):
        def make_recipe(self) -> Any:
            return WrongGroupedGemm()

    with pytest.raises(AssertionError, match="grouped_linear"):
        Broken().test_grouped_linear_matches_reference()
