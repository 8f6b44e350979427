"""Conformance suites: one test class per core protocol.

A plugin's tests subclass the class for its protocol and supply only the implementation
(``make_layout``, ``make_factory``, ``make_recipe``, ``make_block``, ``make_dispatcher``, ``make_router``; the
plugins and distribution of ``PresetConformance``)
and its parameters as class attributes. Third-party plugins get the same checks.
Subclasses must be defined at module level (multi-process checks pickle them by name).
"""

from mcore_testing.conformance.block import BlockConformance
from mcore_testing.conformance.dispatcher import DispatcherConformance
from mcore_testing.conformance.kv_cache import KVCacheConformance
from mcore_testing.conformance.layout import LayoutConformance
from mcore_testing.conformance.optimizer import OptimizerConformance
from mcore_testing.conformance.params import ParamSpecConformance
from mcore_testing.conformance.precision import PrecisionConformance
from mcore_testing.conformance.presets import PresetConformance
from mcore_testing.conformance.router import RouterConformance
from mcore_testing.conformance.sharded_grads import ShardedGradsConformance

__all__ = [
    "BlockConformance",
    "DispatcherConformance",
    "KVCacheConformance",
    "LayoutConformance",
    "OptimizerConformance",
    "ParamSpecConformance",
    "PrecisionConformance",
    "PresetConformance",
    "RouterConformance",
    "ShardedGradsConformance",
]
