"""Conformance checks for ``Router`` implementations (single process).

Whatever its score function, a router's decision must be one the dispatchers and experts can consume:
``(N, K)`` int64 expert ids in ``[0, E)`` (``-1`` for a slot a capacity limit dropped, with weight 0),
no expert twice for one token, finite non-negative fp32 weights, the same decision for the same input
and state, gradients from the weights back to the hidden states, named scalar auxiliary losses, and
state (expert bias, hash table) that survives a ``state_dict`` round trip.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch

from mcore.protocols import Router, RoutingDecision
from mcore_testing.numerics import seeded_generator, seeded_randn


class RouterConformance:
    """Subclass and implement ``make_router(num_experts, top_k, hidden_size)`` (an ``nn.Module`` router).

    ``vocab_size``: token ids are drawn below it and passed to ``route`` (hash routers read them).
    """

    num_experts: ClassVar[int] = 8
    top_k: ClassVar[int] = 2
    hidden_size: ClassVar[int] = 16
    num_tokens: ClassVar[int] = 24
    vocab_size: ClassVar[int] = 32

    def make_router(self, num_experts: int, top_k: int, hidden_size: int) -> Any:
        raise NotImplementedError("subclass must implement make_router()")

    def _inputs(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = seeded_randn(self.num_tokens, self.hidden_size, seed=seed)  # (N, H)
        token_ids = torch.randint(0, self.vocab_size, (self.num_tokens,), generator=seeded_generator(seed + 1))
        return hidden, token_ids

    def _router(self) -> Any:
        torch.manual_seed(0)
        return self.make_router(self.num_experts, self.top_k, self.hidden_size)

    def test_is_router(self) -> None:
        assert isinstance(self._router(), Router)

    def test_decision_is_well_formed(self) -> None:
        router = self._router()
        hidden, token_ids = self._inputs(1)
        decision = router.route(hidden, token_ids)
        assert isinstance(decision, RoutingDecision) and decision.num_experts == self.num_experts
        experts, weights = decision.experts, decision.weights
        assert experts.shape == weights.shape == (self.num_tokens, self.top_k), (experts.shape, weights.shape)
        assert experts.dtype == torch.int64 and weights.dtype == torch.float32
        assert ((experts >= -1) & (experts < self.num_experts)).all(), experts
        dropped = experts == -1
        assert torch.isfinite(weights).all() and (weights >= 0).all() and (weights[dropped] == 0).all()
        for row in experts.tolist():
            kept = [e for e in row if e >= 0]
            assert len(kept) == len(set(kept)), f"a token picked an expert twice: {row}"

    def test_same_input_same_decision(self) -> None:
        router = self._router()
        hidden, token_ids = self._inputs(2)
        first = router.route(hidden, token_ids)
        again = router.route(hidden, token_ids)
        assert torch.equal(first.experts, again.experts) and torch.equal(first.weights, again.weights)

    def test_weights_carry_gradient_to_hidden_states(self) -> None:
        router = self._router()
        hidden, token_ids = self._inputs(3)
        hidden.requires_grad_()
        decision = router.route(hidden, token_ids)
        probe = seeded_randn(*decision.weights.shape, seed=4)
        (decision.weights * probe).sum().backward()
        assert hidden.grad is not None and torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0

    def test_aux_losses_are_named_finite_scalars(self) -> None:
        router = self._router()
        router.route(*self._inputs(5))
        for name, loss in router.aux_losses():
            assert isinstance(name, str) and name and loss.dim() == 0 and torch.isfinite(loss), (name, loss)

    def test_state_survives_a_state_dict_round_trip(self) -> None:
        router = self._router()
        hidden, token_ids = self._inputs(6)
        load = torch.arange(self.num_experts, dtype=torch.float32) * 3  # skewed: moves a bias where there is one
        router.update_bias(load)
        want = router.route(hidden, token_ids)
        fresh = self.make_router(self.num_experts, self.top_k, self.hidden_size)
        fresh.load_state_dict(copy.deepcopy(router.state_dict()))
        got = fresh.route(hidden, token_ids)
        assert torch.equal(got.experts, want.experts) and torch.allclose(got.weights, want.weights)
