"""A training script written against PyTorch's documented FSDP2 API only.

The one line that differs between PyTorch's FSDP2 and mcore-fsdp is the import of
``FSDP_IMPL`` (``torch.distributed.fsdp`` or ``mcore_fsdp``); the test runs it both ways
and compares. Launch: ``torchrun --nproc-per-node 2 fsdp2_script.py [torch|mcore]``.
"""

from __future__ import annotations

import importlib
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

from mcore_testing.reference import TinyConfig, TinyTransformer, tiny_batches

IMPLS = {"torch": "torch.distributed.fsdp", "mcore": "mcore_fsdp"}


def main(impl: str = "torch", ckpt_dir: str | None = None) -> list[float]:
    fsdp = importlib.import_module(IMPLS[impl])  # from torch.distributed.fsdp import fully_shard, ...
    fully_shard, FSDPModule, MixedPrecisionPolicy = fsdp.fully_shard, fsdp.FSDPModule, fsdp.MixedPrecisionPolicy

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = TinyTransformer(TinyConfig(num_layers=3, vocab_size=61, hidden_size=36, ffn_size=50), seed=0)
    mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    assert isinstance(model, FSDPModule)
    model.layers[0].set_modules_to_forward_prefetch([model.layers[1]])
    model.layers[2].set_modules_to_backward_prefetch([model.layers[1]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    losses = []
    micro = 2
    for step, (tokens, labels) in enumerate(tiny_batches(4, batch_size=4 * micro, vocab_size=61, seed=7)):
        rows = tokens.shape[0] // world
        tokens, labels = tokens[rank * rows : (rank + 1) * rows], labels[rank * rows : (rank + 1) * rows]
        total = torch.zeros(())
        for m in range(micro):
            model.set_requires_gradient_sync(m == micro - 1)
            chunk = slice(m * rows // micro, (m + 1) * rows // micro)
            loss = model(tokens[chunk], labels=labels[chunk]) / micro
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        opt.step()
        opt.zero_grad()
        dist.all_reduce(total)
        losses.append(total.item() / world)
        if step == 1 and ckpt_dir is not None:
            dcp.save(get_model_state_dict(model), checkpoint_id=ckpt_dir)
    if ckpt_dir is not None:  # reload the step-1 weights and check one parameter round-trips
        state = get_model_state_dict(model)
        dcp.load(state, checkpoint_id=ckpt_dir)
        set_model_state_dict(model, state)
    model.unshard()
    model.reshard()
    return losses


if __name__ == "__main__":
    dist.init_process_group("gloo")
    with tempfile.TemporaryDirectory() as d:
        print(main(sys.argv[1] if len(sys.argv) > 1 else "torch", d))
    dist.destroy_process_group()
