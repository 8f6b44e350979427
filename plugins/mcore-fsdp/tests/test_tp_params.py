"""``fully_shard`` accepts parameters that are already tensor-parallel DTensors, as FSDP2 does.

A toy residual MLP is split with torch's own ``ColwiseParallel`` (weight and bias ``Shard(0)``) and
``RowwiseParallel`` (weight ``Shard(1)``, bias ``Replicate()``) over ``tp``, then ``fully_shard`` is
called on each block and the root over the dp dims. On 4 gloo ranks in one spawned group:

* ``tp2 x fsdp2``: parameters become DTensors over ``(dp_shard, tp)`` — rows tp splits take FSDP2's
  ``_StridedShard(0, split_factor=2)``, row-parallel weights ``(Shard(0), Shard(1))``, the replicated
  bias ``(Shard(0), Replicate())``, plain parameters ``(Shard(0),)`` over ``dp_shard`` only — with the
  tp-local rows (5) split 3 + 2; over 3 SGD steps (the second with two micro-batches, the first without
  gradient sync) the loss and every gradient equal one process (rel 1e-5), with and without
  resharding after forward;
* ``tp4 x fsdp1`` (one rank per shard group: gradients handed over without a reduction) and
  ``tp2 x hsdp 2x1`` equal one process too;
* a gradient autograd leaves in other placements than its parameter's (``Partial``) is redistributed
  to them before its local tensor is reduced;
* a DTensor over fsdp's own dim, or over a mesh that does not combine with fsdp's, is a one-line error.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard

from mcore.mesh import ParallelMesh, build_mesh
from mcore_fsdp import fully_shard
from mcore_fsdp.groups import mesh_groups
from mcore_fsdp.tp_params import describe_params
from mcore_testing import run_distributed
from mcore_testing.numerics import assert_rel_close

HIDDEN, BATCH = 6, 4
FFN = 10  # over tp 2: 5 tp-local rows, 3 + 2 over dp_shard 2 (tp 4 takes 12: 3 rows each)


class Block(nn.Module):
    def __init__(self, ffn: int) -> None:
        super().__init__()
        self.up = nn.Linear(HIDDEN, ffn)
        self.down = nn.Linear(ffn, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))  # (B, T, H)


class Toy(nn.Module):
    def __init__(self, ffn: int = FFN) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(ffn), Block(ffn)])
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, HIDDEN))
        self.head = nn.Linear(HIDDEN, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x * self.scale).pow(2).mean()


def _shard(model: Toy, mesh: ParallelMesh, dp_dims: tuple[str, ...], **kwargs: Any) -> Toy:
    tp_mesh, dp_mesh = mesh.submesh(["tp"]), mesh.submesh(list(dp_dims))
    for layer in model.layers:
        parallelize_module(layer, tp_mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(layer, mesh=dp_mesh, **kwargs)
    fully_shard(model, mesh=dp_mesh, **kwargs)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _equal_one_process(mesh: ParallelMesh, dp_dims: tuple[str, ...], what: str, ffn: int = FFN, **kwargs: Any) -> None:
    torch.manual_seed(0)
    reference = Toy(ffn)
    model = _shard(copy.deepcopy(reference), mesh, dp_dims, **kwargs)
    dp_size = mesh.size("dp_replicate") * mesh.size("dp_shard")
    dp_rank = mesh.rank("dp_replicate") * mesh.size("dp_shard") + mesh.rank("dp_shard")
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (reference, model)]
    rows = slice(dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size)
    for step in range(3):
        micro = [
            torch.randn(BATCH, 3, HIDDEN, generator=torch.Generator().manual_seed(10 * step + i))
            for i in range(1 + (step == 1))
        ]
        ref_loss = sum(reference(x) for x in micro) / len(micro)
        ref_loss.backward()  # type: ignore[union-attr]
        loss = torch.zeros(())
        for i, x in enumerate(micro):
            model.set_requires_gradient_sync(i == len(micro) - 1)  # type: ignore[operator]
            part = model(x[rows]) / len(micro)
            part.backward()
            loss += part.detach()
        for dim in dp_dims:  # summed over every data-parallel rank
            if mesh.group(dim) is not None:
                dist.all_reduce(loss, group=mesh.group(dim))
        assert_rel_close(loss / dp_size, ref_loss.detach(), 1e-5, name=f"{what}: loss of step {step}")  # type: ignore[union-attr]
        ref = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            assert p.grad is not None and isinstance(p.grad, DTensor), f"{what}: {name}"
            assert p.grad.placements == p.placements, (what, name, p.grad.placements)
            assert_rel_close(_full(p.grad), ref[name].grad, 1e-5, name=f"{what}: grad of {name}, step {step}")  # type: ignore[arg-type]
        for opt in opts:
            opt.step()
            opt.zero_grad()


def _placements(mesh: ParallelMesh) -> None:
    model = _shard(Toy(), mesh, ("dp_shard",))
    block: Any = model.layers[0]
    up, down = block.up, block.down
    assert up.weight.placements == (_StridedShard(0, split_factor=2), Shard(0))
    assert up.bias.placements == (_StridedShard(0, split_factor=2), Shard(0))
    assert down.weight.placements == (Shard(0), Shard(1)) and down.bias.placements == (Shard(0), Replicate())
    assert up.weight.device_mesh.mesh_dim_names == ("dp_shard", "tp")
    assert model.scale.placements == (Shard(0),) and model.scale.device_mesh.mesh_dim_names == ("dp_shard",)
    assert up.weight.to_local().shape == ((3, HIDDEN) if mesh.rank("dp_shard") == 0 else (2, HIDDEN))


def _partial_grad(mesh: ParallelMesh) -> None:
    tp_mesh = mesh.submesh(["tp"])
    bias = distribute_tensor(torch.zeros(4), tp_mesh, [Replicate()])
    (layout,) = describe_params(["bias"], [bias], mesh_groups(mesh.submesh(["dp_shard"])))  # type: ignore[arg-type]
    grad = DTensor.from_local(torch.full((4,), 1.0 + mesh.rank("tp")), tp_mesh, [Partial()])  # 1 and 2: sum 3
    assert torch.equal(layout.local_grad(grad), torch.full((4,), 3.0))


def _refused(mesh: ParallelMesh) -> None:
    linear = nn.Linear(4, 4, bias=False)
    over_dp = distribute_tensor(linear.weight.detach(), mesh.submesh(["dp_shard", "tp"]), [Shard(0), Replicate()])
    linear.weight = nn.Parameter(over_dp)
    with pytest.raises(ValueError, match=r"^fully_shard: parameter weight is a DTensor over mesh dims") as info:
        fully_shard(linear, mesh=mesh.submesh(["dp_shard"]))
    assert "\n" not in str(info.value) and "'dp_shard'" in str(info.value)
    other = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))  # every rank: overlaps dp_shard
    linear.weight = nn.Parameter(distribute_tensor(torch.zeros(4, 4), other, [Shard(0)]))
    with pytest.raises(
        ValueError, match=r"^fully_shard: parameter weight is a DTensor over mesh dims \('tp',\) that do not combine"
    ) as info:
        fully_shard(linear, mesh=mesh.submesh(["dp_shard"]))
    assert "\n" not in str(info.value)


def _all() -> None:
    fsdp = build_mesh(("dp_shard", "tp"), {"tp": 2}, fill="dp_shard", device_type="cpu")
    _placements(fsdp)
    _refused(fsdp)
    _partial_grad(fsdp)
    _equal_one_process(fsdp, ("dp_shard",), "tp2 x fsdp2")
    _equal_one_process(fsdp, ("dp_shard",), "tp2 x fsdp2, kept gathered", reshard_after_forward=False)
    tp4 = build_mesh(("dp_shard", "tp"), {"tp": 4, "dp_shard": 1}, device_type="cpu")
    _equal_one_process(tp4, ("dp_shard",), "tp4 x fsdp1", ffn=12)
    hsdp = build_mesh(
        ("dp_replicate", "dp_shard", "tp"), {"tp": 2, "dp_replicate": 2, "dp_shard": 1}, device_type="cpu"
    )
    _equal_one_process(hsdp, ("dp_replicate", "dp_shard"), "tp2 x hsdp 2x1")


def test_tp_dtensor_parameters_shard_like_fsdp2_and_equal_one_process() -> None:
    run_distributed(_all, 4, timeout=240)
