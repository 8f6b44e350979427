"""Four gloo ranks: ``hsdp`` 2x2 equals one process, and a DCP checkpoint saved under ``fsdp``
on 4 ranks loads under ``fsdp`` on 2 ranks and into a plain model on one process.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from helpers import UNEVEN, full, reference_trace, shard_model, train
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from mcore.mesh import build_mesh
from mcore_fsdp.layout import FSDPLayout
from mcore_testing import run_distributed
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyTransformer


def _hsdp_and_save(path: str) -> None:
    rank = dist.get_rank()
    # -- hsdp: replicate 2 x shard 2 ---------------------------------------------------------------
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    model = shard_model(TinyTransformer(copy.deepcopy(UNEVEN), seed=0), mesh)
    assert all(p.placements == (Replicate(), Shard(0)) for p in model.parameters())
    trace = train(model, dp_rank=rank, dp_size=4)
    ref = reference_trace()
    for step in range(len(ref.losses)):
        assert_rel_close(
            torch.tensor(trace.losses[step]), torch.tensor(ref.losses[step]), 1e-5, name=f"hsdp loss {step}"
        )
        for name, g in trace.grads[step].items():
            assert_rel_close(g, ref.grads[step][name], 1e-5, name=f"hsdp grad {name} step {step}")
    for name, p in trace.params.items():
        assert_rel_close(p, ref.params[name], 1e-5, name=f"hsdp param {name}")

    # -- fsdp layout on 4 ranks, one step, then a DCP checkpoint ---------------------------------
    layout = FSDPLayout()
    model = layout.apply(
        TinyTransformer(copy.deepcopy(UNEVEN), seed=0), build_mesh(layout.mesh_dims, fill="dp_shard", device_type="cpu")
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_one(model, opt, layout)
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=path)
    expected = {"model": {k: full(v) for k, v in model.state_dict().items()}}
    expected["exp_avg"] = {n: full(opt.state[p]["exp_avg"]) for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(expected, Path(path) / "expected.pt")
    dist.barrier()


def train_one(model: torch.nn.Module, opt: torch.optim.Optimizer, layout: FSDPLayout | None) -> None:
    tokens = torch.randint(0, UNEVEN.vocab_size, (4, 8), generator=torch.Generator().manual_seed(5))
    if layout is not None:
        dp = layout.data_parallel()
        tokens = tokens[dp.rank * 4 // dp.size : (dp.rank + 1) * 4 // dp.size]
    model(tokens, labels=tokens).backward()
    opt.step()
    opt.zero_grad()


def _check_loaded(model: torch.nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    expected = torch.load(Path(path) / "expected.pt", weights_only=True)
    for name, value in model.state_dict().items():
        assert_rel_close(full(value), expected["model"][name], 1e-7, name=f"loaded {name}")
    for name, p in model.named_parameters():
        assert_rel_close(full(opt.state[p]["exp_avg"]), expected["exp_avg"][name], 1e-7, name=f"loaded exp_avg {name}")


def _load_fsdp(path: str) -> None:
    layout = FSDPLayout()
    model = layout.apply(
        TinyTransformer(copy.deepcopy(UNEVEN), seed=1), build_mesh(layout.mesh_dims, fill="dp_shard", device_type="cpu")
    )
    assert isinstance(next(model.parameters()), DTensor)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_one(model, opt, layout)  # creates the optimizer state to load into
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    _check_loaded(model, opt, path)


def _load_single(path: str) -> None:
    model = TinyTransformer(copy.deepcopy(UNEVEN), seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_one(model, opt, None)
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    _check_loaded(model, opt, path)


def test_hsdp_and_checkpoint_reshard(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    run_distributed(_hsdp_and_save, 4, path, timeout=300)
    run_distributed(_load_fsdp, 2, path, timeout=180)
    _load_single(path)
