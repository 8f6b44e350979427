"""The contract between the core and its plugins.

Every extension point of mcore is a ``typing.Protocol`` here. Plugins implement them
structurally (no base class to inherit); ``mypy`` checks conformance statically and the
conformance suites in ``mcore-testing`` check behaviour.

This package imports ``torch`` only for type checking, so importing it (and listing
plugins) stays cheap.
"""

from mcore.protocols.block import (
    AuxLosses,
    BlockContext,
    BlockShared,
    FlopsShape,
    KVCacheHandle,
    ModelBlock,
    ModelFactory,
)
from mcore.protocols.dispatcher import DispatchResult, Router, RoutingDecision, TokenDispatcher
from mcore.protocols.layout import BatchShardingLayout, DataParallelInfo, ParallelLayout, ScheduledLayout
from mcore.protocols.optimizer import MeshOptimizer, OptimizerFactory, OptimizerStateSize
from mcore.protocols.precision import GatherPayload, PrecisionRecipe

__all__ = [
    "AuxLosses",
    "BatchShardingLayout",
    "BlockContext",
    "BlockShared",
    "DataParallelInfo",
    "DispatchResult",
    "FlopsShape",
    "GatherPayload",
    "KVCacheHandle",
    "MeshOptimizer",
    "ModelBlock",
    "ModelFactory",
    "OptimizerFactory",
    "OptimizerStateSize",
    "ParallelLayout",
    "PrecisionRecipe",
    "Router",
    "RoutingDecision",
    "ScheduledLayout",
    "TokenDispatcher",
]
