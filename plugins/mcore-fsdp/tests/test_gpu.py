"""On one CUDA device (1-rank NCCL group): numerics through the stream/pool paths; the pool
allocates nothing after step 1 and the CUDA caching allocator's segment count (cudaMalloc calls)
stays flat from step 2 on (step 1 creates the optimizer state and grad shards).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from helpers import UNEVEN, batches
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy as TorchMP
from torch.distributed.fsdp import fully_shard as torch_fully_shard

from mcore_fsdp import MixedPrecisionPolicy, fully_shard
from mcore_fsdp.api import pool_of
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyTransformer

pytestmark = pytest.mark.gpu


def _steps(model, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, counts = [], []
    data = batches()
    for i in range(steps):
        tokens, labels = data[i % len(data)]
        loss = model(tokens.cuda(), labels=labels.cuda())
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        losses.append(loss.item())
        pool = pool_of(model)
        counts.append((torch.cuda.memory_stats()["segment.all.allocated"], pool.allocations if pool else None))
    return losses, counts


def _shard(model, impl, mp):
    mesh = init_device_mesh("cuda", (1,))
    for block in model.layers:
        impl(block, mesh=mesh, mp_policy=mp)
    return impl(model, mesh=mesh, mp_policy=mp)


def test_cuda_paths() -> None:
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fresh = lambda: TinyTransformer(copy.deepcopy(UNEVEN), seed=0).cuda()  # noqa: E731
        ref_losses, _ = _steps(fresh())
        losses, _ = _steps(_shard(fresh(), fully_shard, MixedPrecisionPolicy()))
        assert_rel_close(torch.tensor(losses), torch.tensor(ref_losses), 1e-5, name="fp32 losses")

        # bf16 compute goes through the pool and the comm streams; compare with torch FSDP2
        ours = _shard(
            fresh(), fully_shard, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        )
        theirs = _shard(fresh(), torch_fully_shard, TorchMP(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        a, counts = _steps(ours, steps=5)
        b, _ = _steps(theirs, steps=5)
        assert_rel_close(torch.tensor(a), torch.tensor(b), 1e-2, name="bf16 losses vs FSDP2")
        segments, pools = zip(*counts)
        assert pools[0] > 0 and pools == (pools[0],) * 5, f"pool allocations after each step: {pools}"
        assert segments[1:] == (segments[1],) * 4, f"CUDA segments after each step: {segments}"
    finally:
        if created:
            dist.destroy_process_group()
