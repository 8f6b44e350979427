"""``init_params`` fills FSDP2's ``_StridedShard`` parts (fsdp over tensor-parallel local rows) alone.

Under ``["tp", "fsdp"]`` a parameter whose rows tp splits is a DTensor over ``(dp_shard, tp)`` placed
``(_StridedShard(0, split_factor=tp), Shard(0))``: rank ``(f, t)`` holds part ``f`` of tp's row chunk
``t``, one box of the full tensor. On 4 gloo ranks (dp_shard 2 x tp 2) each rank allocates and fills only
its box, and the gathered tensors equal the one-process fill bit for bit, for tp-local rows that do and do
not divide by dp_shard (the last rank one row fewer, or none) and a 1-D tensor. A ``_StridedShard`` that is
not such a box (its split factor unlike the later dims' shards) is refused in one line.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from mcore.construct import init_params
from mcore.mesh import build_mesh
from mcore.params import Init, ParamSpec
from mcore_testing import run_distributed

SEED = 3
SHAPES = {"even": (8, 3), "uneven": (10, 3), "few": (2, 5), "vector": (6,)}  # tp-local rows 4, 5, 1, 3


class Weights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name, shape in SHAPES.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))

    def param_specs(self) -> dict[str, ParamSpec]:
        return {name: ParamSpec("matrix", init=Init("normal", std=0.02)) for name in SHAPES}


def _fsdp2_over_tp(p: torch.Tensor, mesh: object, dp: int, tp: int, split_factor: int = 2) -> nn.Parameter:
    """``p`` (on meta) as fsdp holds it after tp: rows ``f`` of tp's chunk ``t``, ``ceil`` rows per dp rank."""
    local_rows = p.shape[0] // 2
    per = -(-local_rows // 2)
    rows = max(0, min(per, local_rows - dp * per))
    local = torch.empty((rows, *p.shape[1:]), device="meta")
    placements = (_StridedShard(0, split_factor=split_factor), Shard(0))
    dt = DTensor.from_local(local, mesh, placements, run_check=False, shape=p.shape, stride=p.stride())  # type: ignore[arg-type]
    return nn.Parameter(dt)


def _check() -> None:
    mesh = build_mesh(("dp_shard", "tp"), {"tp": 2}, fill="dp_shard", device_type="cpu")
    device_mesh = mesh.submesh(["dp_shard", "tp"])
    dp, tp = mesh.rank("dp_shard"), mesh.rank("tp")
    with torch.device("meta"):
        whole, model = Weights(), Weights()
    init_params(whole, seed=SEED, device="cpu")
    for name in SHAPES:
        setattr(model, name, _fsdp2_over_tp(getattr(model, name), device_mesh, dp, tp))
    init_params(model, seed=SEED, device="cpu")
    for name in SHAPES:
        p = getattr(model, name)
        assert isinstance(p, DTensor) and p.to_local().device.type == "cpu", name
        assert p.to_local().shape[0] <= -(-SHAPES[name][0] // 4), f"{name}: more than this rank's rows"
        assert torch.equal(p.full_tensor(), getattr(whole, name)), name
    with torch.device("meta"):
        bad = Weights()
    bad.even = _fsdp2_over_tp(bad.even, device_mesh, dp, tp, split_factor=4)  # 4 chunks, but tp splits in 2
    with pytest.raises(ValueError, match=r"^parameter 'even' has placement _StridedShard\(dim=0, sf=4\)") as info:
        init_params(bad, seed=SEED, device="cpu")
    assert "\n" not in str(info.value)


def test_strided_shards_are_filled_with_the_whole_tensors_values() -> None:
    run_distributed(_check, 4, timeout=120)
