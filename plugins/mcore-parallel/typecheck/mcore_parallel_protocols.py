"""Static protocol conformance of mcore-parallel's layouts (mypy in ``nox -s lint``)."""

from mcore.protocols import ParallelLayout
from mcore.protocols.sharded_grads import GradientShardingLayout
from mcore_parallel.ddp import DDPLayout
from mcore_parallel.tp import TPLayout


def layouts(d: DDPLayout, t: TPLayout) -> list[ParallelLayout]:
    return [d, t]


def zero_layouts(d: DDPLayout) -> list[GradientShardingLayout]:
    return [d]
