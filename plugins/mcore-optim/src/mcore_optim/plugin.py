"""The ``optim`` plugin: registers this package's optimizers by name.

References are strings, so listing plugins (``mcore plugins``) imports no torch.
"""

from __future__ import annotations

from typing import Any

from mcore.plugins import hookimpl

MCORE_PLUGIN_API = 1


@hookimpl
def mcore_register(registry: Any) -> None:
    registry.add(
        "optimizer",
        "adamw",
        "mcore_optim.adamw:AdamWFactory",
        summary="AdamW (fused/foreach), fp32 master weights, role-based groups; sharded update under FSDP",
    )
    registry.add(
        "optimizer",
        "distributed-adamw",
        "mcore_optim.distributed_adamw:DistributedAdamWFactory",
        summary="ZeRO-1 AdamW: state and master weights sharded over data-parallel ranks",
    )
    registry.add(
        "optimizer",
        "muon",
        "mcore_optim.muon:MuonFactory",
        summary="Muon: Nesterov momentum + Newton-Schulz orthogonalisation; AdamW for non-matrix params",
    )
    registry.add(
        "optimizer",
        "layerwise-distributed",
        "mcore_optim.layerwise:LayerwiseFactory",
        summary="whole parameters bin-packed over data-parallel ranks, each updated by AdamW or Muon",
    )
