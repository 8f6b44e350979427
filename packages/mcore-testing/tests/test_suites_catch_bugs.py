"""The suites must fail on wrong implementations, or they prove nothing."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_conformance_suites import AllGatherDispatcher, AllReduceLayout, DocumentAttention

from mcore.precision.basic import FP32
from mcore.protocols import RoutingDecision
from mcore_testing import DistributedTestError
from mcore_testing.conformance import (
    BlockConformance,
    DispatcherConformance,
    LayoutConformance,
    PrecisionConformance,
    RouterConformance,
)
from mcore_testing.split_layouts import PipelineLayout, SequenceSplitLayout


class SumInsteadOfMeanLayout(AllReduceLayout):
    """Forgets to divide by the DP size."""

    def finish_grad_sync(self) -> None:
        for p in self.model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)


class BrokenLayoutSuite(LayoutConformance):
    world_size = 2
    fill_dim = "dp_replicate"

    def make_layout(self) -> SumInsteadOfMeanLayout:
        return SumInsteadOfMeanLayout()


class UnsummedSequenceLayout(SequenceSplitLayout):
    """Splits the sequence but forgets to sum the ranks' gradient parts."""

    def finish_grad_sync(self) -> None:
        return None


class BrokenSequenceSuite(LayoutConformance):
    world_size = 2
    fill_dim = "cp"

    def make_layout(self) -> UnsummedSequenceLayout:
        return UnsummedSequenceLayout()


class TwoCopiesPipeline(PipelineLayout):
    """Cuts stages but says two stages hold each parameter: the gradient norm comes out too small."""

    def grad_norm_replicas(self, name: str, param: torch.Tensor) -> int:
        return 2


class BrokenPipelineSuite(LayoutConformance):
    world_size = 2
    fill_dim = "pp"

    def make_layout(self) -> TwoCopiesPipeline:
        return TwoCopiesPipeline()


class LeakyAttention(DocumentAttention):
    """Ignores document boundaries."""

    def forward(self, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        return super().forward(hidden, dataclasses.replace(ctx, cu_seqlens=None))


class BrokenBlockSuite(BlockConformance):
    def make_block(self, hidden_size: int) -> LeakyAttention:
        return LeakyAttention(hidden_size)


class PositionShiftingAttention(DocumentAttention):
    """Shifts the shared positions in place (as a cache offset would), so a re-run sees other positions."""

    def forward(self, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        ctx.positions.add_(1)
        return super().forward(hidden, ctx)


class ContextChangingBlockSuite(BlockConformance):
    def make_block(self, hidden_size: int) -> PositionShiftingAttention:
        return PositionShiftingAttention(hidden_size)


class DropsSecondChoice(AllGatherDispatcher):
    def combine(self, expert_out: torch.Tensor, result: Any) -> torch.Tensor:
        return super().combine(expert_out, result) * 0.5


class BrokenDispatcherSuite(DispatcherConformance):
    world_sizes = (1,)

    def make_dispatcher(self, group: Any, num_experts: int) -> DropsSecondChoice:
        return DropsSecondChoice(group, num_experts)


class LossyRecipe(FP32):
    def unscale_grads(self, model: Any) -> bool:
        return True  # never reports non-finite gradients


class BrokenPrecisionSuite(PrecisionConformance):
    def make_recipe(self) -> LossyRecipe:
        return LossyRecipe()


def test_layout_suite_catches_unaveraged_gradients() -> None:
    with pytest.raises(DistributedTestError, match="grad of"):
        BrokenLayoutSuite().test_matches_single_process()


def test_layout_suite_catches_a_sequence_split_without_gradient_sum() -> None:
    with pytest.raises(DistributedTestError, match="grad of"):
        BrokenSequenceSuite().test_matches_single_process()


def test_layout_suite_catches_a_wrong_gradient_norm_count() -> None:
    with pytest.raises(DistributedTestError, match="gradient norm"):
        BrokenPipelineSuite().test_matches_single_process()


def test_block_suite_catches_attention_across_documents() -> None:
    with pytest.raises(AssertionError, match="document 3 output"):
        BrokenBlockSuite().test_packed_documents_do_not_mix()


def test_block_suite_catches_a_block_changing_its_context() -> None:
    with pytest.raises(AssertionError, match=r"ctx\.positions in place"):
        ContextChangingBlockSuite().test_leaves_the_context_unchanged()


def test_dispatcher_suite_catches_wrong_combine() -> None:
    with pytest.raises(AssertionError, match="combined output"):
        BrokenDispatcherSuite().test_round_trip_matches_reference()


def test_precision_suite_catches_missed_nan() -> None:
    with pytest.raises(AssertionError):
        BrokenPrecisionSuite().test_non_finite_gradients_detected()


class ToyRouter(torch.nn.Module):
    """A plain top-k softmax router with a bias buffer: passes the router suite."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(hidden_size, num_experts, bias=False)
        self.register_buffer("bias", torch.zeros(num_experts))
        self.num_experts, self.top_k = num_experts, top_k

    def route(self, hidden: torch.Tensor, token_ids: torch.Tensor | None) -> RoutingDecision:
        scores = torch.softmax(self.gate(hidden).float(), dim=-1)  # (N, E)
        experts = torch.topk(scores + self.bias, self.top_k, dim=-1).indices  # (N, K)
        return RoutingDecision(experts=experts, weights=scores.gather(-1, experts), num_experts=self.num_experts)

    def aux_losses(self) -> list[tuple[str, torch.Tensor]]:
        return []

    def update_bias(self, load: torch.Tensor) -> None:
        self.bias += 0.1 * torch.sign(load.float().mean() - load.float())


class TwiceRouter(ToyRouter):
    def route(self, hidden: torch.Tensor, token_ids: torch.Tensor | None) -> RoutingDecision:
        decision = super().route(hidden, token_ids)
        experts = decision.experts[:, :1].expand(-1, self.top_k)  # the first choice in every slot
        return dataclasses.replace(decision, experts=experts.contiguous())


class DetachedRouter(ToyRouter):
    def route(self, hidden: torch.Tensor, token_ids: torch.Tensor | None) -> RoutingDecision:
        decision = super().route(hidden, token_ids)
        return dataclasses.replace(decision, weights=decision.weights.detach())


class UnsavedBiasRouter(ToyRouter):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int) -> None:
        super().__init__(num_experts, top_k, hidden_size)
        del self._buffers["bias"]
        self.__dict__["bias"] = torch.zeros(num_experts)  # a plain attribute: not in the state dict


class ToyRouterSuite(RouterConformance):
    router: type[ToyRouter] = ToyRouter

    def make_router(self, num_experts: int, top_k: int, hidden_size: int) -> Any:
        return self.router(num_experts, top_k, hidden_size)


class TwiceSuite(ToyRouterSuite):
    router = TwiceRouter


class DetachedSuite(ToyRouterSuite):
    router = DetachedRouter


class UnsavedBiasSuite(ToyRouterSuite):
    router = UnsavedBiasRouter


def test_router_suite_passes_a_plain_router() -> None:
    suite = ToyRouterSuite()
    for name in dir(suite):
        if name.startswith("test_"):
            getattr(suite, name)()


def test_router_suite_catches_an_expert_picked_twice() -> None:
    with pytest.raises(AssertionError, match="picked an expert twice"):
        TwiceSuite().test_decision_is_well_formed()


def test_router_suite_catches_weights_without_gradient() -> None:
    with pytest.raises((AssertionError, RuntimeError)):
        DetachedSuite().test_weights_carry_gradient_to_hidden_states()


def test_router_suite_catches_state_missing_from_the_state_dict() -> None:
    with pytest.raises(AssertionError):
        UnsavedBiasSuite().test_state_survives_a_state_dict_round_trip()
