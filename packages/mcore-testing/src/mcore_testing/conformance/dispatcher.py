"""Conformance checks for ``TokenDispatcher`` implementations (1 rank and multi-process).

With toy experts ``expert_e(x) = (e + 1) * x``, ``combine(dispatch(x))`` must equal
``sum_k w[n, k] * (experts[n, k] + 1) * x[n]`` for every token, on any EP size, and the
gradient with respect to the input must match that formula's. Padding rows after the real ones (a
fixed-capacity dispatcher, ``allgatherv``) get NaN expert outputs, which ``combine`` must ignore.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.distributed as dist

from mcore.protocols import RoutingDecision, TokenDispatcher
from mcore_testing.dist import run_distributed
from mcore_testing.numerics import assert_rel_close, seeded_generator, seeded_randn


def _routing(num_tokens: int, num_experts: int, top_k: int, seed: int) -> RoutingDecision:
    g = seeded_generator(seed)
    experts = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])  # (N, K)
    weights = torch.softmax(torch.randn(num_tokens, top_k, generator=g), dim=-1)  # (N, K)
    return RoutingDecision(experts=experts, weights=weights, num_experts=num_experts)


def _check_round_trip(cls: type[DispatcherConformance]) -> None:
    suite = cls()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    group = dist.group.WORLD if world > 1 else None
    experts_per_rank = suite.num_experts // world
    dispatcher = suite.make_dispatcher(group, suite.num_experts)
    assert isinstance(dispatcher, TokenDispatcher)

    hidden = seeded_randn(suite.num_tokens, suite.hidden_size, seed=100 + rank).requires_grad_()
    routing = _routing(suite.num_tokens, suite.num_experts, suite.top_k, seed=200 + rank)
    result = dispatcher.dispatch(hidden, routing)
    counts = result.tokens_per_expert.tolist()
    padding = result.tokens.shape[0] - sum(counts)  # a fixed-capacity dispatcher's unused rows at the end
    assert len(counts) == experts_per_rank and padding >= 0
    scale = torch.cat(
        [torch.full((c,), float(rank * experts_per_rank + i + 1)) for i, c in enumerate(counts)]
        + [torch.full((padding,), float("nan"))]  # what a grouped GEMM leaves there: must be ignored
    ).unsqueeze(-1)  # (M, 1) toy expert of each row
    out = dispatcher.combine(result.tokens * scale, result)

    ref_hidden = hidden.detach().clone().requires_grad_()
    factor = (routing.weights * (routing.experts.float() + 1)).sum(-1, keepdim=True)  # (N, 1)
    ref = ref_hidden * factor
    assert_rel_close(out, ref, suite.tolerance, name="combined output")
    grad_out = seeded_randn(*out.shape, seed=300 + rank)
    out.backward(grad_out)
    ref.backward(grad_out)
    assert hidden.grad is not None and ref_hidden.grad is not None
    assert_rel_close(hidden.grad, ref_hidden.grad, suite.tolerance, name="input gradient")


class DispatcherConformance:
    """Subclass and implement ``make_dispatcher(group, num_experts)``.

    ``world_sizes``: EP sizes to check (each must divide ``num_experts``).
    """

    world_sizes: ClassVar[tuple[int, ...]] = (1, 2)
    num_experts: ClassVar[int] = 4
    top_k: ClassVar[int] = 2
    num_tokens: ClassVar[int] = 16
    hidden_size: ClassVar[int] = 8
    tolerance: ClassVar[float] = 1e-5

    def make_dispatcher(self, group: Any, num_experts: int) -> Any:
        raise NotImplementedError("subclass must implement make_dispatcher(group, num_experts)")

    def test_round_trip_matches_reference(self) -> None:
        for world_size in self.world_sizes:
            run_distributed(_check_round_trip, world_size, type(self), timeout=120)
