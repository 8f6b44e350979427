"""Static protocol conformance of the harness's reference implementations (mypy in ``nox -s lint``)."""

from mcore.protocols import (
    AttentionBackend,
    BatchShardingLayout,
    GradientShardingLayout,
    MeshOptimizer,
    ModelFactory,
    OptimizerFactory,
    ScheduledLayout,
    StagedModel,
)
from mcore_testing.reference import TinyModelFactory, TinyTransformer
from mcore_testing.reference_optim import NamedAdamW, ReferenceAdamW
from mcore_testing.split_layouts import AllGatherKV, PipelineLayout, SequenceSplitLayout
from mcore_testing.zero import FlatZeroLayout

factory: OptimizerFactory = ReferenceAdamW()
optimizer: MeshOptimizer = NamedAdamW(TinyTransformer(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95))


def model_factory(factory: type[TinyModelFactory]) -> ModelFactory:
    return factory


def staged(m: TinyTransformer) -> StagedModel:
    return m


def split_layouts(s: SequenceSplitLayout, p: PipelineLayout) -> tuple[BatchShardingLayout, ScheduledLayout]:
    return s, p


def all_gather_kv(a: AllGatherKV) -> AttentionBackend:
    return a


def zero_layout(z: FlatZeroLayout) -> GradientShardingLayout:
    return z
