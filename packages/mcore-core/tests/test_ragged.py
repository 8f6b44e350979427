"""Row-ragged ``Shard(0)`` DTensors on 2 gloo processes: the real row counts, the whole tensor,
and torch.distributed.checkpoint files that load under another split (even, ragged, plain).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from mcore.ragged import annotate_for_checkpoint, even_counts, full_tensor, row_counts, row_dim
from mcore_testing import distributed, run_distributed

ROWS, COLS = 6, 5


def _whole(mesh, weight: torch.Tensor, owner: int) -> DTensor:
    """``weight`` held whole by rank ``owner`` (the others hold 0 rows)."""
    local = weight.clone() if dist.get_rank() == owner else weight[:0].clone()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=weight.shape, stride=weight.stride())


def _save_load(tmp: str) -> None:
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    weight = torch.arange(ROWS * COLS, dtype=torch.float32).view(ROWS, COLS)
    whole = _whole(mesh, weight, owner=1)
    even = distribute_tensor(weight, mesh, [Shard(0)])

    assert row_dim(whole) == 0 and row_dim(weight) is None
    assert row_counts([whole, even]) == [(0, ROWS), (3, 3)]
    assert torch.equal(full_tensor(whole), weight)
    assert torch.equal(full_tensor(even), weight)

    # save the ragged tensor (and an even one beside it)
    state = {"w": whole.detach().clone(), "e": even}
    assert annotate_for_checkpoint(state) == 1
    dcp.save(state, checkpoint_id=f"{tmp}/ckpt")

    # ... load it evenly chunked, whole on the other rank, and whole as a plain tensor
    as_even = distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0)])
    as_whole0 = _whole(mesh, torch.zeros(ROWS, COLS), owner=0)
    target = {"w": as_even, "e": as_whole0}
    assert annotate_for_checkpoint(target) == 1
    dcp.load(target, checkpoint_id=f"{tmp}/ckpt")
    assert torch.equal(as_even.to_local(), weight[3 * rank : 3 * rank + 3])
    assert torch.equal(as_whole0.to_local(), weight if rank == 0 else weight[:0])
    plain = {"w": torch.zeros(ROWS, COLS)}
    dcp.load(plain, checkpoint_id=f"{tmp}/ckpt")
    assert torch.equal(plain["w"], weight)


def test_ragged_rows_save_and_load_under_other_splits(tmp_path: Path) -> None:
    run_distributed(_save_load, 2, str(tmp_path), timeout=120)


def test_even_counts() -> None:
    assert even_counts(6, 4) == (2, 2, 2, 0)
    assert even_counts(7, 2) == (4, 3)
    assert even_counts(1, 3) == (1, 0, 0)


@distributed(2, timeout=120)
def test_inconsistent_rows_are_refused() -> None:
    mesh = init_device_mesh("cpu", (2,))
    local = torch.zeros(2, 3)  # both ranks claim 2 rows of a 3-row tensor
    bad = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size((3, 3)), stride=(3, 1))
    with pytest.raises(ValueError, match=r"has 4 rows over its ranks \(\(2, 2\)\)"):
        row_counts([bad])


@distributed(2, timeout=120)
def test_finiteness_check_accepts_ranks_without_rows() -> None:
    from mcore.precision.basic import grads_finite

    mesh = init_device_mesh("cpu", (2,))
    layer = torch.nn.Linear(COLS, ROWS, bias=False)
    layer.weight = torch.nn.Parameter(_whole(mesh, layer.weight.detach(), owner=0))
    layer.weight.grad = _whole(mesh, torch.ones(ROWS, COLS), owner=0)  # rank 1 holds no rows
    assert grads_finite(layer)
    layer.weight.grad = _whole(mesh, torch.full((ROWS, COLS), float("nan")), owner=0)
    assert grads_finite(layer) == (dist.get_rank() == 1)  # each rank judges its own rows
