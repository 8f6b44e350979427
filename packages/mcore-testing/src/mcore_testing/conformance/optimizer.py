"""Conformance checks for ``OptimizerFactory`` implementations (single process).

A factory that implements the optional ``OptimizerStateSize`` (what ``mcore plan`` reads) must
report exactly the state its optimizer holds (``check_state_size``).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from mcore.layouts.single import SingleLayout
from mcore.mesh import ParallelMesh
from mcore.protocols import MeshOptimizer, OptimizerFactory
from mcore_testing.conformance.params import check_state_size
from mcore_testing.reference import TinyConfig, TinyTransformer, tiny_batches


def single_mesh() -> ParallelMesh:
    return ParallelMesh((), (), "cpu")


class OptimizerConformance:
    """Subclass and implement ``make_factory()`` returning a configured factory instance.

    ``steps_to_learn``: steps on a fixed batch after which the loss must have dropped by
    ``min_loss_drop`` (relative).
    """

    steps_to_learn: int = 20
    min_loss_drop: float = 0.1

    def make_factory(self) -> Any:
        raise NotImplementedError("subclass must implement make_factory()")

    def _build(self, cfg: TinyConfig | None = None, seed: int = 0) -> tuple[TinyTransformer, Any]:
        model = TinyTransformer(cfg, seed=seed)
        factory = self.make_factory()
        optimizer = factory.build(model, mesh=single_mesh(), layouts=[SingleLayout()])
        return model, optimizer

    @staticmethod
    def _step(model: TinyTransformer, optimizer: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(batch[0], labels=batch[1])
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def test_protocols(self) -> None:
        factory = self.make_factory()
        assert isinstance(factory, OptimizerFactory)
        _, optimizer = self._build()
        assert isinstance(optimizer, MeshOptimizer)

    def test_param_groups_cover_every_parameter_once(self) -> None:
        model, optimizer = self._build()
        seen: list[int] = []
        for group in optimizer.param_groups:
            assert "lr" in group and "params" in group
            seen += [id(p) for p in group["params"]]
        assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)

    def test_loss_decreases(self) -> None:
        model, optimizer = self._build()
        batch = tiny_batches(1, seed=1)[0]
        first = self._step(model, optimizer, batch)
        for _ in range(self.steps_to_learn - 1):
            last = self._step(model, optimizer, batch)
        assert last < first * (1 - self.min_loss_drop), f"loss went {first:.4f} -> {last:.4f}"

    def test_zero_grad_clears(self) -> None:
        model, optimizer = self._build()
        batch = tiny_batches(1, seed=1)[0]
        model(batch[0], labels=batch[1]).backward()
        optimizer.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in model.parameters())

    def test_state_dict_round_trip_gives_identical_next_step(self) -> None:
        batches = tiny_batches(5, seed=2)
        model, optimizer = self._build()
        for b in batches[:3]:
            self._step(model, optimizer, b)
        model_state = copy.deepcopy(model.state_dict())
        opt_state = copy.deepcopy(optimizer.state_dict())
        self._step(model, optimizer, batches[3])

        resumed, resumed_opt = self._build(seed=123)  # different init: everything must come from the state
        resumed.load_state_dict(model_state)
        resumed_opt.load_state_dict(opt_state)
        self._step(resumed, resumed_opt, batches[3])
        for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
            assert torch.equal(p, q), f"parameter {name} differs after resume"

    def test_reported_state_size_matches_the_state(self) -> None:
        factory = self.make_factory()
        model = TinyTransformer(seed=0)
        optimizer = factory.build(model, mesh=single_mesh(), layouts=[SingleLayout()])
        self._step(model, optimizer, tiny_batches(1)[0])
        check_state_size(factory, model, optimizer)

    def test_refuses_state_for_other_shapes(self) -> None:
        model, optimizer = self._build()
        self._step(model, optimizer, tiny_batches(1)[0])
        state = optimizer.state_dict()
        _, other = self._build(TinyConfig(hidden_size=48, num_heads=4, ffn_size=64))
        with pytest.raises((ValueError, KeyError, RuntimeError)):
            other.load_state_dict(state)
