"""The suites must fail on wrong implementations, or they prove nothing."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_conformance_suites import AllGatherDispatcher, AllReduceLayout, DocumentAttention

from mcore.precision.basic import FP32
from mcore_testing import DistributedTestError
from mcore_testing.conformance import BlockConformance, DispatcherConformance, LayoutConformance, PrecisionConformance
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
