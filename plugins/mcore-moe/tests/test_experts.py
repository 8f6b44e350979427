"""Grouped experts: the backend chosen per call gives the per-expert reference (``torch._grouped_mm`` on CUDA)."""

from __future__ import annotations

import pytest
import torch

from mcore.precision.grouped import grouped_linear_reference
from mcore_moe.experts import GroupedSwiGLU, expert_linear, grouped_mm_works


class _Recipe:
    """A precision recipe that takes every grouped GEMM (and says so)."""

    def __init__(self) -> None:
        self.calls = 0

    def grouped_linear(self, x: torch.Tensor, weight: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return grouped_linear_reference(x, weight, sizes)


class _Ctx:
    def __init__(self, precision: object) -> None:
        self.precision = precision


def test_a_precision_recipe_takes_the_expert_gemms() -> None:
    experts = GroupedSwiGLU(3, 8, 16)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    recipe = _Recipe()
    experts(torch.randn(7, 8), torch.tensor([2, 0, 5]), _Ctx(recipe))
    assert recipe.calls == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._grouped_mm runs on CUDA only")
def test_grouped_mm_matches_the_reference_on_cuda() -> None:
    torch.manual_seed(0)
    sizes = torch.tensor([64, 0, 32, 160], device="cuda")
    x = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(4, 64, 128, device="cuda", dtype=torch.bfloat16) * 0.05).requires_grad_()
    assert grouped_mm_works(x.device)
    out = expert_linear(x, weight, sizes, None, grouped_mm=True)
    ref_x, ref_w = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = grouped_linear_reference(ref_x, ref_w, sizes)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(ref)
    out.backward(grad.bfloat16())
    ref.backward(grad)
    assert x.grad is not None and weight.grad is not None and ref_x.grad is not None and ref_w.grad is not None
    torch.testing.assert_close(x.grad.float(), ref_x.grad, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(weight.grad.float(), ref_w.grad, rtol=2e-2, atol=5e-2)
