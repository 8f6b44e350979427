"""Two gloo ranks (one spawn for all checks, to keep CI short): ``fp16`` ranks change their loss scale
alike when only one rank's gradients overflow; ``fp8-delayed`` ranks end each step with the same amax
histories (the max over the ranks), and bound to a mesh with pipeline stages each stage reduces its own
amaxes only while the checkpointed state holds every stage's; an FP8 linear refuses a sharded ``DTensor`` weight (per-tensor scales
need the global amax) with a one-line error."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mcore.errors import UserError
from mcore_precision.formats import E4M3, amax_to_scale
from mcore_precision.fp8 import FP8Current, FP8Delayed
from mcore_precision.fp16 import FP16
from mcore_testing.dist import run_distributed
from mcore_testing.reference import TinyTransformer, tiny_batches


def _ranks_back_off_alike() -> None:
    recipe = FP16(FP16.Config(initial_scale=2.0**8, growth_interval=1))
    model = recipe.prepare(TinyTransformer(seed=0))
    tokens, labels = tiny_batches(1, seed=dist.get_rank())[0]
    recipe.scale_loss(model(tokens, labels=labels)).backward()
    if dist.get_rank() == 0:  # only rank 0's gradients (its shard, its pipeline stage) hold an inf
        next(model.parameters()).grad.view(-1)[0] = float("inf")
    assert bool(recipe.unscale_grads(model)) is (dist.get_rank() == 1)
    recipe.update()  # as the run loop calls it: without the agreed answer
    scales = [torch.zeros(1), torch.zeros(1)]
    dist.all_gather(scales, recipe.scale.reshape(1))
    assert [s.item() for s in scales] == [2.0**7, 2.0**7], scales  # both backed off; none grew


def _sharded_weight_refused() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = FP8Current(FP8Current.Config(params="fp32")).prepare(nn.Sequential(nn.Linear(8, 8, bias=False)))
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(0)]))
    with pytest.raises(UserError, match="global amax") as err:
        model(torch.ones(2, 8))
    assert "\n" not in str(err.value)


def _delayed_histories_agree() -> None:
    recipe = FP8Delayed(FP8Delayed.Config(amax_history_len=2, params="fp32"))
    model = recipe.prepare(TinyTransformer(seed=0))
    rank = dist.get_rank()
    tokens, labels = tiny_batches(1, seed=rank)[0]  # each rank its own data: its own activation amaxes
    if rank == 1:  # an input only rank 1 sees
        model.layers[1].mlp.down(torch.full((1, 64), 3.0))
    model(tokens, labels=labels * (1 + rank) % 64).backward()
    local = recipe.scalers["layers.0.attn.qkv.input"].history[0].clone()
    recipe.update()
    state = recipe.state_dict()
    gathered: list[dict | None] = [None, None]
    dist.all_gather_object(gathered, {k: v.tolist() for k, v in state.items()})
    assert gathered[0] == gathered[1]  # the same histories and scales on every rank
    down = recipe.scalers["layers.1.mlp.down.input"]
    assert down.history[1].item() == 3.0  # an amax only rank 1 saw, known to both
    assert state["layers.0.attn.qkv.input.history"][1] >= local  # the max over the ranks


def _delayed_stages_reduce_apart() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from mcore.mesh import ParallelMesh

    rank = dist.get_rank()
    mesh = ParallelMesh(("pp",), (2,), "cpu", init_device_mesh("cpu", (2,), mesh_dim_names=("pp",)))
    recipe = FP8Delayed(FP8Delayed.Config(amax_history_len=2, params="fp32"))
    model = recipe.prepare(TinyTransformer(seed=0))  # the whole model on each rank, as before the layouts
    recipe.bind_mesh(mesh)
    model.layers[rank].mlp.down(torch.full((1, 64), 2.0 + rank))  # stage `rank` runs layer `rank` only
    recipe.update()
    own, other = (recipe.scalers[f"layers.{i}.mlp.down.input"] for i in (rank, 1 - rank))
    assert own.history[1].item() == 2.0 + rank and other.history[1].item() == 0.0  # nothing crossed the stages
    assert own.current.item() == amax_to_scale(torch.tensor(2.0 + rank), E4M3).item()
    assert not bool(other.seen)
    state = recipe.state_dict()  # the checkpoint's one copy holds every stage's linears
    gathered: list[dict | None] = [None, None]
    dist.all_gather_object(gathered, {k: v.tolist() for k, v in state.items()})
    assert gathered[0] == gathered[1]
    assert [state[f"layers.{i}.mlp.down.input.history"][1].item() for i in (0, 1)] == [2.0, 3.0]
    assert state["layers.1.mlp.down.input.scale"].item() == amax_to_scale(torch.tensor(3.0), E4M3).item()


def _all_checks() -> None:
    _ranks_back_off_alike()
    _sharded_weight_refused()
    _delayed_histories_agree()
    _delayed_stages_reduce_apart()


def test_two_ranks_agree_on_scales_and_refuse_sharded_weights() -> None:
    run_distributed(_all_checks, 2)
