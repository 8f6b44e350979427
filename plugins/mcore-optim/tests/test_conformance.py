"""The optimizer conformance suite of mcore-testing, for every optimizer registered here."""

from __future__ import annotations

from typing import Any

from mcore_optim.adamw import AdamWFactory
from mcore_optim.distributed_adamw import DistributedAdamWFactory
from mcore_optim.layerwise import LayerwiseFactory
from mcore_optim.muon import MuonFactory
from mcore_testing.conformance import OptimizerConformance


class TestAdamWConformance(OptimizerConformance):
    def make_factory(self) -> Any:
        return AdamWFactory(AdamWFactory.Config(lr=1e-2))


class TestDistributedAdamWConformance(OptimizerConformance):
    def make_factory(self) -> Any:
        return DistributedAdamWFactory(DistributedAdamWFactory.Config(lr=1e-2))


class TestMuonConformance(OptimizerConformance):
    def make_factory(self) -> Any:
        return MuonFactory(MuonFactory.Config(lr=0.02, ns_coefficients="polar-express"))


class TestLayerwiseMuonConformance(OptimizerConformance):
    def make_factory(self) -> Any:
        return LayerwiseFactory(LayerwiseFactory.Config(lr=0.02, inner="muon", options={"split_heads": True}))
