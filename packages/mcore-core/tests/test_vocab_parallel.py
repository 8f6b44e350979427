"""Vocab-parallel cross-entropy on 2 and 3 gloo ranks equals the plain cross-entropy over the whole
vocabulary: the loss sum, the hidden states' gradient and each rank's rows of the weight gradient."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mcore.vocab_parallel import vocab_parallel_cross_entropy_sum
from mcore_testing import run_distributed
from mcore_testing.numerics import assert_rel_close

ROWS = {2: [6, 5], 3: [4, 4, 3]}  # a vocabulary of 11 rows, uneven splits


def _check() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(11, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (13,), generator=g)
    labels[[2, 7]] = -100
    start = sum(ROWS[world][:rank])
    rows = slice(start, start + ROWS[world][rank])
    for chunk in (None, 3):
        for scale in (1.0, 0.5):
            h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            want = F.cross_entropy(h_ref @ w_ref.T * scale, labels, ignore_index=-100, reduction="sum")
            want.backward()
            h, w = hidden.clone().requires_grad_(), weight[rows].clone().requires_grad_()
            got = vocab_parallel_cross_entropy_sum(
                h, w, labels, vocab_start=start, group=dist.group.WORLD, chunk_size=chunk, scale=scale
            )
            got.backward()
            assert_rel_close(got, want.detach(), 1e-10, name=f"loss (chunk {chunk})")
            assert_rel_close(h.grad, h_ref.grad, 1e-10, name="grad of hidden")  # type: ignore[arg-type]
            assert_rel_close(w.grad, w_ref.grad[rows], 1e-10, name="grad of this rank's rows")  # type: ignore[index]


def _logits_and_rows() -> None:
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.placement_types import Shard

    from mcore.mesh import build_mesh
    from mcore.vocab_parallel import local_vocab_rows, vocab_parallel_logits

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    hidden, weight = (
        torch.randn(2, 3, 8, generator=g, dtype=torch.float64),
        torch.randn(10, 8, generator=g, dtype=torch.float64),
    )
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    probe = torch.randn(2, 3, 10, generator=g, dtype=torch.float64)
    ((h_ref @ w_ref.T * 0.5) * probe).sum().backward()
    mesh = build_mesh(("tp",), {}, fill="tp", device_type="cpu").submesh(["tp"])
    sharded = distribute_tensor(weight.clone(), mesh, [Shard(0)])
    local, start = local_vocab_rows(sharded, 10, dist.group.WORLD)
    assert start == rank * 5 and torch.equal(local, weight[start : start + 5])
    h, w = hidden.clone().requires_grad_(), local.clone().requires_grad_()
    logits = vocab_parallel_logits(h, w, group=dist.group.WORLD, scale=0.5)
    assert_rel_close(logits.detach(), (hidden @ weight.T * 0.5), 1e-12, name="gathered logits")
    (logits * probe).sum().backward()
    assert_rel_close(h.grad, h_ref.grad, 1e-12, name="grad of hidden")  # type: ignore[arg-type]
    assert_rel_close(w.grad, w_ref.grad[start : start + 5], 1e-12, name="grad of rows")  # type: ignore[index]
    with pytest.raises(ValueError, match=r"placed \(Replicate\(\),\)"):
        local_vocab_rows(distribute_tensor(weight.clone(), mesh, [Replicate()]), 10, dist.group.WORLD)
    with pytest.raises(ValueError, match="holds 10 rows on each of 2 ranks"):
        local_vocab_rows(weight, 10, dist.group.WORLD)
    assert world == 2


def test_logits_gather_and_local_rows() -> None:
    run_distributed(_logits_and_rows, 2, timeout=120)


@pytest.mark.parametrize("world", [2, 3])
def test_matches_full_vocabulary_cross_entropy(world: int) -> None:
    run_distributed(_check, world, timeout=120)


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match=r"must be \(N, H\) and \(Vr, H\)"):
        vocab_parallel_cross_entropy_sum(
            torch.zeros(3, 4), torch.zeros(5, 2), torch.zeros(3, dtype=torch.long), vocab_start=0, group=None
        )
