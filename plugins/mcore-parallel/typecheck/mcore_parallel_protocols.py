"""Static protocol conformance of mcore-parallel's layouts (mypy in ``nox -s lint``)."""

from mcore.protocols import ParallelLayout
from mcore.protocols.sharded_grads import GradientShardingLayout
from mcore_parallel.ddp import DDPLayout


def layouts(d: DDPLayout) -> list[ParallelLayout]:
    return [d]


def zero_layouts(d: DDPLayout) -> list[GradientShardingLayout]:
    return [d]
