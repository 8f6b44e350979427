"""Bin packing, the data-parallel group taken from layouts, and layerwise config errors (one process)."""

from __future__ import annotations

import pytest

from mcore.protocols.layout import DataParallelInfo
from mcore_optim.dist import data_parallel
from mcore_optim.layerwise import LayerwiseFactory
from mcore_optim.packing import assign


def test_assign_balances_whole_items() -> None:
    costs = [("a", 10.0), ("b", 7.0), ("c", 6.0), ("d", 5.0), ("e", 4.0), ("f", 2.0)]
    owners = assign(costs, 2)
    loads = [sum(c for n, c in costs if owners[n] == r) for r in range(2)]
    assert sorted(loads) == [17.0, 17.0]
    assert assign(costs, 2) == owners  # every rank computes the same assignment
    assert set(assign(costs, 8).values()) == set(range(6))  # more ranks than items: one each


def test_assign_balances_around_fixed_loads() -> None:
    """Items go around each rank's fixed load (e.g. matrices it alone holds), still deterministically."""
    costs = [("a", 4.0), ("b", 3.0), ("c", 2.0), ("d", 1.0)]
    owners = assign(costs, 2, loads=[10.0, 0.0])
    assert owners == {"a": 1, "b": 1, "c": 1, "d": 1}  # rank 0 already carries more than all of them
    fixed = [5.0, 0.0, 3.0]
    owners = assign(costs, 3, loads=fixed)
    assert [fixed[r] + sum(c for n, c in costs if owners[n] == r) for r in range(3)] == [6.0, 6.0, 6.0]
    assert assign(costs, 3, loads=fixed) == owners
    assert assign(costs, 2) == assign(costs, 2, loads=[0.0, 0.0])


class FakeLayout:
    def __init__(self, size: int, group: object = None) -> None:
        self.size, self.group = size, group

    def data_parallel(self) -> DataParallelInfo:
        return DataParallelInfo(rank=0, size=self.size, group=self.group)  # type: ignore[arg-type]


def test_data_parallel_group_from_layouts() -> None:
    assert data_parallel([FakeLayout(1)], optimizer="x").size == 1
    assert data_parallel([FakeLayout(1), FakeLayout(4, "g")], optimizer="x").group == "g"
    with pytest.raises(ValueError, match=r"layouts \['FakeLayout', 'FakeLayout'\] each report a data-parallel size"):
        data_parallel([FakeLayout(2, "g"), FakeLayout(2, "h")], optimizer="distributed-adamw")
    with pytest.raises(ValueError, match=r"reports data-parallel size 2 but no process group"):
        data_parallel([FakeLayout(2)], optimizer="distributed-adamw")


def test_layerwise_config_errors() -> None:
    with pytest.raises(ValueError, match=r"inner = 'sgd'; allowed: \['adamw', 'muon'\]"):
        LayerwiseFactory(LayerwiseFactory.Config(inner="sgd"))
    with pytest.raises(ValueError, match=r"options.momentum = 0.9 is not a setting of inner optimizer 'adamw'"):
        LayerwiseFactory(LayerwiseFactory.Config(options={"momentum": 0.9}))
    with pytest.raises(ValueError, match=r"options.lr is set; allowed: set lr at the top level"):
        LayerwiseFactory(LayerwiseFactory.Config(options={"lr": 0.1}))
    factory = LayerwiseFactory(
        LayerwiseFactory.Config(lr=0.02, inner="muon", options={"ns_coefficients": "deepseek-v4"})
    )
    assert len(factory.inner.triples) == 10 and factory.inner.config.lr == 0.02


def test_sharding_options_without_data_parallelism() -> None:
    """One process: the sharded optimizers build plain ones; a reduction option left idle warns."""
    from helpers import SINGLE, tiny_model

    from mcore_optim.adamw import AdamW
    from mcore_optim.distributed_adamw import DistributedAdamWFactory
    from mcore_optim.muon import Muon

    with pytest.warns(UserWarning, match=r"reduce_grads = True is ignored: there is no data parallelism"):
        built = DistributedAdamWFactory(DistributedAdamWFactory.Config(reduce_grads=True)).build(
            tiny_model(), mesh=SINGLE, layouts=[FakeLayout(1)]
        )
    assert type(built) is AdamW
    layerwise = LayerwiseFactory(LayerwiseFactory.Config(inner="muon")).build(tiny_model(), mesh=SINGLE, layouts=[])
    assert type(layerwise) is Muon and layerwise.ns_group is None
