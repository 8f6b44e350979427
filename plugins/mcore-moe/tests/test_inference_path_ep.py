"""Expert-parallel serving of the ``moe`` block's inference path on 2 gloo ranks: each rank holds half the experts
(``Shard(0)`` DTensors, as the ``ep`` layout makes them), tokens go through the static ``allgatherv`` dispatch, and
every rank's output equals the one-process (ep=1) inference forward on its own tokens (fp32), for the ``ep``
layout's ``allgather`` dispatcher (served as ``allgatherv`` over its group: equal token counts) and an
``allgatherv`` one with ``max_tokens`` (unequal counts, down to one decode token)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from mcore.protocols import BlockContext
from mcore_moe.block import MoE, MoEConfig
from mcore_moe.dispatcher import AllGatherDispatcher, AllGatherVDispatcher
from mcore_moe.ep_experts import shard_experts
from mcore_testing.dist import run_distributed
from mcore_testing.numerics import assert_rel_close, seeded_generator, seeded_randn

H, E = 16, 8


def _block() -> MoE:
    config = MoEConfig(num_experts=E, top_k=2, moe_ffn_hidden_size=16, num_shared_experts=1, capacity_factor=0.5)
    block = MoE(config, hidden_size=H)
    block.reset_parameters(seeded_generator(0))
    return block.eval()


def _cached() -> BlockContext:
    """A stand-in inference cache: the block only checks that one is set (it keeps no cache of its own)."""
    return BlockContext(kv_cache=object())  # type: ignore[arg-type]


def _serve(counts: tuple[int, int], max_tokens: int | None) -> None:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    x = seeded_randn(1, counts[rank], H, seed=10 + rank)  # (1, N_r, H): this rank's tokens
    with torch.no_grad():
        want = _block()(x, _cached())  # ep=1: every expert here
        block = _block()
        shard_experts(block.experts, init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)), rank, world)
        group = dist.group.WORLD
        block.dispatcher = (
            AllGatherDispatcher(group, E)
            if max_tokens is None
            else AllGatherVDispatcher(group, E, max_tokens=max_tokens)
        )
        gate = block.experts.gate
        assert isinstance(gate, DTensor) and gate.to_local().shape[0] == E // world
        got = block(x, _cached())
    assert_rel_close(got, want, 1e-5, name=f"rank {rank} of ep={world}, tokens {counts}")


def _check_all() -> None:
    _serve((5, 5), None)
    _serve((6, 1), 8)
    _serve((1, 1), 4)


def test_two_rank_expert_parallel_inference_equals_one_process() -> None:
    run_distributed(_check_all, 2, timeout=120)
