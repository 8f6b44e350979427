"""The contract between the core and its plugins.

Every extension point of mcore is a ``typing.Protocol`` here. Plugins implement them
structurally (no base class to inherit); ``mypy`` checks conformance statically and the
conformance suites in ``mcore-testing`` check behaviour.

This package imports ``torch`` only for type checking, so importing it (and listing
plugins) stays cheap.
"""

from mcore.protocols.attention import AttentionBackend
from mcore.protocols.block import (
    LOGIT_ROWS,
    MTP_AHEAD,
    AttentionCacheSpec,
    AttentionKVCache,
    AuxLosses,
    BlockContext,
    BlockShared,
    DeclaresCache,
    FlopsShape,
    KVCacheHandle,
    LayerCacheSpec,
    ModelBlock,
    ModelFactory,
    PagedKV,
    RecurrentStateCache,
    RecurrentStateSpec,
)
from mcore.protocols.dispatcher import DispatchResult, Router, RoutingDecision, TokenDispatcher
from mcore.protocols.engine import GenerationEngine
from mcore.protocols.layout import BatchShardingLayout, DataParallelInfo, ParallelLayout, ScheduledLayout, StagePlan
from mcore.protocols.model import LossHead, StagedModel
from mcore.protocols.optimizer import (
    GuardedStep,
    MeshOptimizer,
    OptimizerFactory,
    OptimizerStateSize,
    ScaledStep,
)
from mcore.protocols.precision import GatherPayload, PrecisionRecipe
from mcore.protocols.sharded_grads import GradientShardingLayout, GradShards, ShardPiece, grad_sharding_layout
from mcore.protocols.step import AfterOptimizerStep, ReportsStepMetrics

__all__ = [
    "AfterOptimizerStep",
    "AttentionBackend",
    "AttentionCacheSpec",
    "AttentionKVCache",
    "AuxLosses",
    "BatchShardingLayout",
    "BlockContext",
    "BlockShared",
    "DataParallelInfo",
    "StagePlan",
    "DeclaresCache",
    "DispatchResult",
    "FlopsShape",
    "GatherPayload",
    "GenerationEngine",
    "grad_sharding_layout",
    "GradientShardingLayout",
    "GradShards",
    "KVCacheHandle",
    "LayerCacheSpec",
    "LOGIT_ROWS",
    "MTP_AHEAD",
    "LossHead",
    "GuardedStep",
    "MeshOptimizer",
    "ModelBlock",
    "ModelFactory",
    "OptimizerFactory",
    "OptimizerStateSize",
    "ScaledStep",
    "PagedKV",
    "ParallelLayout",
    "PrecisionRecipe",
    "RecurrentStateCache",
    "RecurrentStateSpec",
    "ReportsStepMetrics",
    "Router",
    "RoutingDecision",
    "ScheduledLayout",
    "ShardPiece",
    "StagedModel",
    "TokenDispatcher",
]
