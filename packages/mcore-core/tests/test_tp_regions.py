"""``BlockContext.share_across_heads``: identity forward; with a head group, the gradient of a tensor
every head reads is summed over the ranks holding the other heads (MLA's rope key under ``tp``)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from mcore.protocols import BlockContext
from mcore_testing import run_distributed


def test_without_a_group_it_is_the_identity() -> None:
    t = torch.randn(3, requires_grad=True)
    out = BlockContext().share_across_heads(t)
    assert out is t


def _summed() -> None:
    rank = dist.get_rank()
    shared = torch.ones(4, requires_grad=True)
    out = BlockContext(head_group=dist.group.WORLD).share_across_heads(shared)
    assert torch.equal(out.detach(), shared.detach())
    (out * (rank + 1)).sum().backward()  # each rank's heads read it with their own weight
    assert shared.grad is not None and shared.grad.tolist() == [3.0] * 4  # 1 + 2: the whole gradient


def test_gradient_is_summed_over_the_head_group() -> None:
    run_distributed(_summed, 2, timeout=60)
