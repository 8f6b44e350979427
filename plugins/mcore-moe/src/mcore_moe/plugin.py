"""Registers the ``topk`` and ``hash`` routers, the ``allgather``, ``alltoall`` and ``allgatherv``
dispatchers and the ``moe`` block with mcore (lazy references: no torch import)."""

from __future__ import annotations

from typing import Any

from mcore.plugins import hookimpl

MCORE_PLUGIN_API = 1


@hookimpl
def mcore_register(registry: Any) -> None:
    registry.add(
        "router",
        "topk",
        "mcore_moe.router:TopKRouter",
        summary="top-k router: softmax/sigmoid/sqrtsoftplus scores, group-limited, aux losses, aux-loss-free bias",
    )
    registry.add(
        "router",
        "hash",
        "mcore_moe.hash_router:HashRouter",
        summary="hash router: a token-id table picks the experts (balanced from token counts), logits the weights",
    )
    registry.add(
        "dispatcher",
        "allgather",
        "mcore_moe.dispatcher:AllGatherDispatcher",
        summary="all-gather tokens over the ep group, reduce-scatter the combined outputs (local at ep=1)",
    )
    registry.add(
        "dispatcher",
        "alltoall",
        "mcore_moe.dispatcher:AllToAllDispatcher",
        summary="token counts exchanged first, then an all-to-all of the routed rows and its inverse for combine",
    )
    registry.add(
        "dispatcher",
        "allgatherv",
        "mcore_moe.dispatcher:AllGatherVDispatcher",
        summary="allgather into fixed-capacity buffers with device-side counts: static shapes, no host sync in forward",
    )
    registry.add(
        "block",
        "moe",
        "mcore_moe.block:MoE",
        summary="mixture of experts: router + dispatcher + grouped-GEMM SwiGLU experts, shared experts",
    )
    from mcore_moe.presets import PRESETS  # names and summaries only: no torch

    for name, (attr, summary) in PRESETS.items():
        registry.add("preset", name, f"mcore_moe.presets:{attr}", summary=summary)
    registry.add(
        "layout",
        "ep",
        "mcore_moe.ep:EPLayout",
        summary="expert parallel over ep (carved out of data parallel): experts sharded, tokens dispatched to them",
    )
