"""``mcore.sequence_split.SequenceSplit``: the all-to-all that gives a recurrent block its whole sequence for a
share of the channels, and back, on 2 gloo ranks: exact data movement both ways (padding dropped, then zero),
gradients that are the other direction's movement, ``full_context``, and one-line refusals."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mcore.errors import UserError
from mcore.protocols import BlockContext
from mcore.sequence_split import SequenceSplit
from mcore_testing import run_distributed

ROWS, SEQ, WIDTH, SIZE = 2, 7, 5, 2  # full rows of 7 tokens; each rank holds 5 per row (padding included)


def _index() -> torch.Tensor:
    """``(R, P * L)``: every place of each row once, shuffled over the ranks, with padding (-1) in both ranks."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(ROWS):
        places = torch.randperm(SEQ, generator=g)  # (T,)
        padded = torch.cat([places, torch.full((SIZE * WIDTH - SEQ,), -1)])  # (P * L,)
        rows.append(padded[torch.randperm(SIZE * WIDTH, generator=g)])
    return torch.stack(rows)


def _local(full: torch.Tensor, index: torch.Tensor, rank: int) -> torch.Tensor:
    """``full (R, T, C)`` at rank ``rank``'s tokens, zeros at its padding: ``(R, L, C)``."""
    mine = index[:, rank * WIDTH : (rank + 1) * WIDTH]  # (R, L)
    taken = full.gather(1, mine.clamp(min=0)[..., None].expand(-1, -1, full.shape[-1]))
    return torch.where((mine >= 0)[..., None], taken, torch.zeros_like(taken))


def _checks() -> None:
    rank = dist.get_rank()
    index = _index()
    cu = torch.tensor([0, 3, 7, 14], dtype=torch.int32)
    split = SequenceSplit(group=dist.group.WORLD, index=index, seq_len=SEQ, cu_seqlens=cu, max_seqlen=7)
    assert (split.size, split.rank) == (SIZE, rank)
    g = torch.Generator().manual_seed(5)
    a_full = torch.randn(ROWS, SEQ, 6, generator=g, dtype=torch.float64)  # (R, T, 6): 3 channels a rank
    b_full = torch.randn(ROWS, SEQ, 2, generator=g, dtype=torch.float64)  # (R, T, 2): 1 channel a rank
    w_a = torch.randn(ROWS, SEQ, 6, generator=g, dtype=torch.float64)
    w_b = torch.randn(ROWS, SEQ, 2, generator=g, dtype=torch.float64)

    # forward: every token in row order, this rank's channels; backward: the weights at this rank's tokens
    a = _local(a_full, index, rank).requires_grad_()
    b = _local(b_full, index, rank).requires_grad_()
    full_a, full_b = split.to_full_sequence(a, b)
    assert torch.equal(full_a, a_full[..., 3 * rank : 3 * rank + 3])
    assert torch.equal(full_b, b_full[..., rank : rank + 1])
    assert torch.equal(split.my_channels(a_full, dim=-1), full_a)
    ((full_a * split.my_channels(w_a, -1)).sum() + (full_b * split.my_channels(w_b, -1)).sum()).backward()
    assert a.grad is not None and b.grad is not None
    assert torch.equal(a.grad, _local(w_a, index, rank)) and torch.equal(b.grad, _local(w_b, index, rank))

    # the inverse: this rank's tokens with every channel (zeros at padding); backward: this rank's channels
    ya = a_full[..., 3 * rank : 3 * rank + 3].clone().requires_grad_()
    yb = b_full[..., rank : rank + 1].clone().requires_grad_()
    local_a, local_b = split.to_local_tokens(ya, yb)
    assert torch.equal(local_a, _local(a_full, index, rank)) and torch.equal(local_b, _local(b_full, index, rank))
    ((local_a * _local(w_a, index, rank)).sum() + (local_b * _local(w_b, index, rank)).sum()).backward()
    assert ya.grad is not None and yb.grad is not None
    assert torch.equal(ya.grad, w_a[..., 3 * rank : 3 * rank + 3]) and torch.equal(yb.grad, w_b[..., rank : rank + 1])

    # the round trip is the identity on real tokens
    (back,) = split.to_local_tokens(*split.to_full_sequence(a.detach()))
    assert torch.equal(back, a.detach())

    # the block's view of the full rows
    ctx = BlockContext(
        positions=torch.zeros(ROWS, WIDTH, dtype=torch.int64), token_ids=torch.zeros(1), sequence_split=split
    )
    full = split.full_context(ctx)
    assert full.cu_seqlens is cu and full.max_seqlen == 7 and full.sequence_split is None and full.token_ids is None
    assert full.positions is None and ctx.sequence_split is split  # the original view is unchanged

    # one-line refusals
    with pytest.raises(UserError, match=r"gdn value heads: 3 heads \(per tp rank\) do not split over "):
        split.check_heads("gdn value heads", 3)
    split.check_heads("gdn value heads", 4)
    with pytest.raises(ValueError, match="C divisible by 2 ranks"):
        split.to_full_sequence(torch.zeros(ROWS, WIDTH, 3))
    with pytest.raises(ValueError, match="do not match the split"):
        split.to_full_sequence(torch.zeros(ROWS, WIDTH + 1, 2))
    with pytest.raises(ValueError, match="real tokens"):
        SequenceSplit(group=dist.group.WORLD, index=index, seq_len=SEQ + 1)
    twice = index.clone()
    twice[twice == 1] = 0  # place 0 twice, place 1 never
    with pytest.raises(ValueError, match="every token of its rows once"):
        SequenceSplit(group=dist.group.WORLD, index=twice, seq_len=SEQ)


def test_sequence_split_moves_tokens_and_gradients_exactly() -> None:
    run_distributed(_checks, SIZE, timeout=60)


def test_block_context_has_no_split_by_default() -> None:
    assert BlockContext().sequence_split is None
