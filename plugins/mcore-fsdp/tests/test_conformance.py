"""The core's layout conformance suite: ``fsdp`` on 2 ranks, ``hsdp`` on 4 (2 x 2)."""

from __future__ import annotations

from mcore_fsdp.layout import FSDPLayout, HSDPLayout
from mcore_testing.conformance import LayoutConformance


class TestFSDPConformance(LayoutConformance):
    world_size = 2
    fill_dim = "dp_shard"

    def make_layout(self) -> FSDPLayout:
        return FSDPLayout()


class TestHSDPConformance(LayoutConformance):
    world_size = 4
    mesh_sizes = {"dp_replicate": 2, "dp_shard": 2}

    def make_layout(self) -> HSDPLayout:
        return HSDPLayout()
