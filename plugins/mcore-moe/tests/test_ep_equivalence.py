"""Experts split over 2 gloo ranks (by hand, as an ``ep`` layout will) give the one-process output and
gradients, for both dispatchers, dropless and with capacity, with unequal token counts per rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mcore.protocols import AuxLosses, BlockContext
from mcore_moe.block import MoE, MoEConfig
from mcore_moe.dispatcher import AllGatherVDispatcher
from mcore_testing.dist import run_distributed
from mcore_testing.numerics import assert_rel_close, seeded_generator, seeded_randn

H, E = 8, 4


def _block(dispatcher: str, capacity: float | None) -> MoE:
    config = MoEConfig(
        num_experts=E,
        top_k=2,
        moe_ffn_hidden_size=12,
        dispatcher=dispatcher,
        capacity_factor=capacity,
        num_shared_experts=1,
        aux_loss_coeff=0.01,
    )
    block = MoE(config, hidden_size=H)
    block.reset_parameters(seeded_generator(0))
    return block


def _inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = 6 if rank == 0 else 4  # unequal: the allgather path pads
    return seeded_randn(1, tokens, H, seed=10 + rank), seeded_randn(1, tokens, H, seed=20 + rank)


def _check(dispatcher: str, capacity: float | None) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = _block(dispatcher, capacity)
    ref_loss = torch.zeros(())
    ref_outs = []
    for q in range(world):  # one process: each rank's micro-batch through the whole block
        x, g = _inputs(q)
        out = ref(x, BlockContext(aux_losses=AuxLosses()))
        ref_outs.append(out.detach())
        ref_loss = ref_loss + (out * g).sum()
    ref_loss.backward()

    block = _block(dispatcher, capacity)
    local = E // world
    for name in ("gate", "up", "down"):  # rank r keeps experts r * E_l .. (r + 1) * E_l - 1
        full = getattr(block.experts, name)
        setattr(block.experts, name, nn.Parameter(full.detach()[rank * local : (rank + 1) * local].clone()))
    if dispatcher == "allgatherv":  # unequal token counts: a capacity every rank shares
        block.dispatcher = AllGatherVDispatcher(dist.group.WORLD, E, max_tokens=8)
    else:
        block.dispatcher = type(block.dispatcher)(dist.group.WORLD, E)
    x, g = _inputs(rank)
    x = x.requires_grad_()
    out = block(x, BlockContext(aux_losses=AuxLosses()))
    assert_rel_close(out, ref_outs[rank], 1e-5, name="output")
    (out * g).sum().backward()
    for name in ("gate", "up", "down"):
        want = getattr(ref.experts, name).grad[rank * local : (rank + 1) * local]
        assert_rel_close(getattr(block.experts, name).grad, want, 1e-5, name=f"experts.{name} grad")
    for param, want in (
        (block.router.weight, ref.router.weight),
        (block.shared_experts.gate.weight, ref.shared_experts.gate.weight),
    ):
        grad = param.grad.clone()
        dist.all_reduce(grad)  # data-parallel sum of the replicated parameters
        assert_rel_close(grad, want.grad, 1e-5, name="replicated grad")


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall", "allgatherv"])
def test_two_ranks_dropless_equal_one_process(dispatcher: str) -> None:
    run_distributed(_check, 2, dispatcher, None, timeout=120)


def test_two_ranks_with_capacity_equal_one_process() -> None:
    run_distributed(_check, 2, "alltoall", 0.75, timeout=120)
