"""fully_shard on 2 gloo ranks equals one process: loss, grads and parameters over 3 AdamW steps.

Tolerance: the project's fp32 standard, relative error < 1e-5 (reduction order differs from
one process; the observed errors are about 1e-6). The model has dimensions that do not
divide the world size (vocab 61, hidden 36, ffn 50).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from helpers import UNEVEN, reference_trace, shard_model, train
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from mcore_fsdp.api import local_shard_numel, pool_of
from mcore_testing import distributed
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyTransformer

TOL = 1e-5


def _check_equal(trace, ref, label: str) -> None:
    for step, (loss, ref_loss) in enumerate(zip(trace.losses, ref.losses)):
        assert_rel_close(torch.tensor(loss), torch.tensor(ref_loss), TOL, name=f"{label} loss step {step}")
    for step, (grads, ref_grads) in enumerate(zip(trace.grads, ref.grads)):
        for name, g in grads.items():
            assert_rel_close(g, ref_grads[name], TOL, name=f"{label} grad {name} step {step}")
    for name, p in trace.params.items():
        assert_rel_close(p, ref.params[name], TOL, name=f"{label} param {name}")


@distributed(2, timeout=240)
def test_matches_single_process_and_shards_memory() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ref = reference_trace()
    for reshard, prefetch in ((True, 1), (False, 1), (True, 2)):
        model = TinyTransformer(copy.deepcopy(UNEVEN), seed=0)
        model = shard_model(model, mesh, reshard_after_forward=reshard, prefetch=prefetch)
        for name, p in model.named_parameters():
            assert isinstance(p, DTensor) and p.placements == (Shard(0),), name
        trace = train(model, dp_rank=rank, dp_size=world)
        _check_equal(trace, ref, f"reshard_after_forward={reshard}, prefetch={prefetch}")

    # -- each rank holds 1/N of parameters, gradients and optimizer state (measured) ----------
    model = shard_model(TinyTransformer(copy.deepcopy(UNEVEN), seed=0), mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    allocations = []
    for step in range(3):
        x = torch.randint(0, UNEVEN.vocab_size, (2, 8), generator=torch.Generator().manual_seed(step))
        model(x, labels=x).backward()
        opt.step()
        allocations.append(pool_of(model).allocations)
        if step < 2:
            opt.zero_grad()
    total = sum(p.numel() for p in model.parameters())
    local = {
        "params": sum(p.to_local().numel() for p in model.parameters()),
        "grads": sum(p.grad.to_local().numel() for p in model.parameters()),
        "optimizer state": sum(
            t.to_local().numel() for s in opt.state.values() for t in s.values() if isinstance(t, DTensor)
        ),
    }
    local["optimizer state"] //= 2  # exp_avg and exp_avg_sq
    counts = torch.tensor(list(local.values()))
    summed = counts.clone()
    dist.all_reduce(summed)
    for (what, n), s in zip(local.items(), summed.tolist()):
        assert s == total, f"{what}: ranks hold {s} elements in all, the model has {total}"
        assert abs(n - total / world) <= total * 0.05, f"{what}: rank {rank} holds {n} of {total} (1/{world} expected)"
    storage = local_shard_numel(model)
    assert storage * world - total < total * 0.05, f"flat shard {storage} x {world} vs {total} parameters"
    # -- the pool stops allocating after the first step --------------------------------------
    assert allocations[0] > 0 and allocations == [allocations[0]] * 3, f"pool allocations per step: {allocations}"
