"""The ZeRO-1 handshake (``mcore.protocols.sharded_grads``): the reference pair passes the suite, broken ones fail it."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from mcore.errors import UserError
from mcore.mesh import ParallelMesh
from mcore.protocols.sharded_grads import grad_sharding_layout
from mcore_testing import DistributedTestError
from mcore_testing.conformance import ShardedGradsConformance
from mcore_testing.layouts import AllReduceLayout
from mcore_testing.reference import TinyTransformer
from mcore_testing.zero import FlatZeroLayout, ShardedAdamWFactory


class TestReferenceZeroPair(ShardedGradsConformance):
    def make_layout(self) -> FlatZeroLayout:
        return FlatZeroLayout()

    def make_factory(self) -> ShardedAdamWFactory:
        return ShardedAdamWFactory(ShardedAdamWFactory.Config(**self.adamw))


class ForgetsToGather(FlatZeroLayout):
    """Each rank keeps only its own update: the others' ranges stay stale."""

    def gather_params(self) -> None:
        return None


class DoubleCountsSplitParameter(FlatZeroLayout):
    """Leaves the whole gradient of a parameter split between ranks on both: the norm counts it twice."""

    def finish_grad_sync(self) -> None:
        super().finish_grad_sync()
        if self.shards is None or self.shards.size == 1:
            return
        cuts = {r * self.per for r in range(1, self.shards.size)}
        for piece in self.shards.pieces:
            at, n = self.offsets[piece.name], piece.param.numel()
            if any(at < cut < at + n for cut in cuts) and piece.param.grad is not None:
                dist.all_reduce(piece.param.grad, group=self.shards.group)


class ForgetsToGatherSuite(ShardedGradsConformance):
    world_sizes = (2,)

    def make_layout(self) -> ForgetsToGather:
        return ForgetsToGather()

    def make_factory(self) -> ShardedAdamWFactory:
        return ShardedAdamWFactory(ShardedAdamWFactory.Config(**self.adamw))


class DoubleCountingSuite(ForgetsToGatherSuite):
    def make_layout(self) -> DoubleCountsSplitParameter:
        return DoubleCountsSplitParameter()


@pytest.mark.parametrize(
    ("suite", "symptom"),
    [(ForgetsToGatherSuite, "step 1: "), (DoubleCountingSuite, "gradient")],
)
def test_suite_catches_broken_pairs(suite: type[ShardedGradsConformance], symptom: str) -> None:
    with pytest.raises(DistributedTestError, match=symptom):
        suite().test_matches_single_process_and_reshards()


def test_optimizer_without_a_sharding_layout_is_a_one_line_error() -> None:
    layout = AllReduceLayout()
    model = layout.apply(TinyTransformer(), ParallelMesh(("dp_replicate",), (1,), "cpu"))
    with pytest.raises(UserError, match="needs a layout that hands it reduce-scattered gradients") as info:
        ShardedAdamWFactory().build(model, mesh=None, layouts=[layout])
    assert "\n" not in str(info.value)


def test_two_sharding_layouts_are_refused() -> None:
    with pytest.raises(UserError, match="at most one layout"):
        grad_sharding_layout([FlatZeroLayout(), FlatZeroLayout()])
    assert grad_sharding_layout([AllReduceLayout()]) is None
