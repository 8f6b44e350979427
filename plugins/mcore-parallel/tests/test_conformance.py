"""The harness's suites for ``ddp``: layout conformance on 2 ranks (with accumulation), and the ZeRO-1
handshake paired with the reference sharded AdamW (2 ranks, resumed on 3 and on 1)."""

from __future__ import annotations

from mcore_parallel.ddp import DDPLayout
from mcore_testing.conformance import LayoutConformance, ShardedGradsConformance
from mcore_testing.zero import ShardedAdamWFactory


class TestDDPConformance(LayoutConformance):
    world_size = 2
    fill_dim = "dp_replicate"

    def make_layout(self) -> DDPLayout:
        # small buckets: several collectives per step, issued during backward
        return DDPLayout(DDPLayout.Config(bucket_mb=0.01))


class TestDDPShardedGrads(ShardedGradsConformance):
    def make_layout(self) -> DDPLayout:
        return DDPLayout(DDPLayout.Config(bucket_mb=0.02))

    def make_factory(self) -> ShardedAdamWFactory:
        hp = self.adamw
        config = ShardedAdamWFactory.Config(
            lr=hp["lr"], weight_decay=hp["weight_decay"], beta1=hp["beta1"], beta2=hp["beta2"], eps=hp["eps"]
        )
        return ShardedAdamWFactory(config)
