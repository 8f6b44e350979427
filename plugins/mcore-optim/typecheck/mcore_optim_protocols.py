"""Static protocol conformance of mcore-optim's registered factories (mypy in ``nox -s lint``)."""

from mcore.protocols import OptimizerFactory, OptimizerStateSize
from mcore_optim.adamw import AdamWFactory
from mcore_optim.distributed_adamw import DistributedAdamWFactory
from mcore_optim.layerwise import LayerwiseFactory
from mcore_optim.muon import MuonFactory


def factories(
    a: AdamWFactory, d: DistributedAdamWFactory, lw: LayerwiseFactory, m: MuonFactory
) -> list[OptimizerFactory]:
    return [a, d, lw, m]


def state_sizes(
    a: AdamWFactory, d: DistributedAdamWFactory, lw: LayerwiseFactory, m: MuonFactory
) -> list[OptimizerStateSize]:
    return [a, d, lw, m]
