"""The ``fsdp`` layout on one process (no launcher): a 1-rank group, every path that needs no peer.

fp32 with divisor 1 aliases the shard (no copies); a divisor or a compute dtype goes through
the pooled gather/reduce buffers. The layout starts no process group (``test_no_default_group``);
PyTorch's FSDP2, the bf16 reference, needs one: the test starts a 1-rank group for it and
destroys it at the end.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from helpers import UNEVEN, reference_trace, train
from torch.distributed.fsdp import MixedPrecisionPolicy as TorchMP
from torch.distributed.fsdp import fully_shard as torch_fully_shard

from mcore.mesh import build_mesh
from mcore_fsdp.api import pool_of
from mcore_fsdp.layout import FSDPLayout
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyTransformer


def _apply(config: FSDPLayout.Config) -> tuple[FSDPLayout, torch.nn.Module]:
    layout = FSDPLayout(config)
    mesh = build_mesh(layout.mesh_dims, fill="dp_shard", device_type="cpu")
    return layout, layout.apply(TinyTransformer(copy.deepcopy(UNEVEN), seed=0), mesh)


def test_one_process_paths() -> None:
    assert not dist.is_initialized()
    try:
        ref = reference_trace()
        layout, model = _apply(FSDPLayout.Config())
        assert layout.data_parallel().size == 1
        trace = train(model)
        for step in range(len(ref.losses)):
            assert_rel_close(torch.tensor(trace.losses[step]), torch.tensor(ref.losses[step]), 1e-6, name="loss")
        for name, p in trace.params.items():
            assert_rel_close(p, ref.params[name], 1e-6, name=f"param {name}")
        assert pool_of(model).allocations == 0  # fp32 on one shard: compute views alias the shard

        _, model = _apply(FSDPLayout.Config(gradient_divide_factor=2.0))
        trace = train(model, steps=1)
        for name, g in trace.grads[0].items():
            assert_rel_close(g * 2, ref.grads[0][name], 1e-6, name=f"grad/2 {name}")

        _, ours = _apply(FSDPLayout.Config(param_dtype="bf16", reduce_dtype="fp32"))
        assert not dist.is_initialized()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # for torch's fully_shard
        theirs = TinyTransformer(copy.deepcopy(UNEVEN), seed=0)
        mp = TorchMP(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in theirs.layers:
            torch_fully_shard(block, mp_policy=mp)
        torch_fully_shard(theirs, mp_policy=mp)
        a, b = train(ours), train(theirs)
        assert_rel_close(torch.tensor(a.losses), torch.tensor(b.losses), 1e-2, name="bf16 losses vs FSDP2")
        for name, p in a.params.items():
            assert p.dtype == torch.float32
            assert_rel_close(p, b.params[name], 1e-2, name=f"bf16 param {name} vs FSDP2")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
