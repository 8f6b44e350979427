"""The two forwards ``tp`` replaces from outside a model, and the collectives they need.

Shape legend: N looked-up ids (any shape), H hidden, Vr this rank's vocabulary rows, hs head rows.

Why our own, not ``parallelize_module`` styles, for these two:

* vocab-parallel embedding: torch's ``RowwiseParallel(input_layouts=Replicate())`` on an
  ``nn.Embedding`` (documented since torch 2.3) looks up correctly, but on torch 2.13 the
  weight's gradient comes back a ``Replicate`` DTensor of the whole vocabulary on every rank
  (each rank holds a ``V x H`` gradient: the memory the split was meant to save). Here each rank
  looks up its own rows (ids outside them give zeros), the rows are summed over the group, and the
  weight's gradient is its ``Shard(0)`` shard;
* key/value projections with fewer heads than ranks (GQA, ``kv_heads < tp``): the weight stays
  whole on every rank (one copy in checkpoints) and each rank projects with the rows of the head
  its query heads read. No placement says "rows ``[lo, hi)`` on these ranks, other rows
  elsewhere", so the linear keeps a plain weight and its input's gradient is summed over the group
  here (each rank's keys and values feed only its query heads).

Both are applied by swapping the module's class for a subclass (as ``fully_shard`` does), so the
module path, its parameters' names and ``isinstance`` checks stay as they were.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from mcore.tp_regions import sum_grad_over

__all__ = ["HeadSliceLinear", "VocabShardEmbedding", "copy_to_group", "reduce_from_group", "swap_class"]


class _ReduceFromGroup(torch.autograd.Function):
    """Forward: sum over ``group``; backward: identity (each rank's part already has the whole gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def reduce_from_group(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _ReduceFromGroup.apply(x, group)  # type: ignore[no-any-return]


def copy_to_group(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Forward: identity; backward: sum over ``group`` (each rank's use of a replicated input contributes)."""
    return sum_grad_over(x, group)


class VocabShardEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose weight is a ``Shard(0)`` DTensor: rows ``[vocab_start, vocab_start + Vr)`` here."""

    tp_group: Any
    vocab_start: int

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight  # (Vr, H)
        local = ids - self.vocab_start  # (N,)
        outside = (local < 0) | (local >= weight.shape[0])
        pad = self.padding_idx
        pad = pad - self.vocab_start if pad is not None and 0 <= pad - self.vocab_start < weight.shape[0] else None
        rows = F.embedding(local.masked_fill(outside, 0), weight, pad, None, 2.0, self.scale_grad_by_freq)  # (N, H)
        return reduce_from_group(rows.masked_fill(outside.unsqueeze(-1), 0.0), self.tp_group)


class HeadSliceLinear(nn.Linear):
    """A whole column-parallel ``nn.Linear`` of which this rank uses the rows ``[lo, hi)`` (one head)."""

    tp_group: Any
    rows: tuple[int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.rows
        bias = None if self.bias is None else self.bias[lo:hi]
        return F.linear(copy_to_group(x, self.tp_group), self.weight[lo:hi], bias)  # (..., hs)


@functools.cache
def _subclass(mixin: type, cls: type) -> type:
    if issubclass(cls, mixin):
        return cls
    if cls in mixin.__bases__:  # the plain torch module: the mixin itself
        return mixin
    return type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {"__module__": mixin.__module__})


def swap_class(module: nn.Module, mixin: type, **attrs: Any) -> None:
    """Make ``module`` an instance of a subclass of ``mixin`` and its class, with ``attrs`` set.

    ``mixin``'s forward wins; the module keeps its parameters, hooks and path."""
    cls: type = type(module)
    module.__class__ = _subclass(mixin, cls)  # one subclass per (mixin, class), as fully_shard
    for key, value in attrs.items():
        setattr(module, key, value)
