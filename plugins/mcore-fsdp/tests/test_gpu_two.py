"""On two CUDA devices (NCCL, one process each): row-split and whole-on-one-rank placements
train as one process does, through the comm streams, pooled buffers and the gathers/reduce-
scatters of real NCCL collectives.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from helpers import UNEVEN, reference_trace, shard_model, train
from torch.distributed.device_mesh import init_device_mesh

from mcore_testing import run_distributed
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyTransformer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]


def _two_gpus() -> None:
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    mesh = init_device_mesh("cuda", (2,))
    ref = reference_trace()  # one process, on the CPU
    for whole in (False, True):
        model = TinyTransformer(copy.deepcopy(UNEVEN), seed=0).cuda()
        keep = (lambda p: p.dim() >= 2) if whole else False
        trace = train(shard_model(model, mesh, keep_whole=keep), dp_rank=rank, dp_size=2)
        for step in range(len(ref.losses)):
            assert_rel_close(torch.tensor(trace.losses[step]), torch.tensor(ref.losses[step]), 1e-5, name="loss")
            for name, g in trace.grads[step].items():
                assert_rel_close(g.cpu(), ref.grads[step][name], 1e-5, name=f"grad {name} (whole={whole})")
        for name, p in trace.params.items():
            assert_rel_close(p.cpu(), ref.params[name], 1e-5, name=f"param {name} (whole={whole})")


def test_two_gpus_equal_one_process() -> None:
    run_distributed(_two_gpus, 2, backend="nccl", timeout=300)
