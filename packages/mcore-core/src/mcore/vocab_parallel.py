"""Cross-entropy over a vocabulary split across ranks: no rank forms the full logits.

Shape legend: N tokens, H hidden, V vocabulary, Vr this rank's vocabulary rows.

Under tensor parallelism the output weight is split by rows (``ParamSpec.tp = "vocab"``): rank
``r`` holds vocabulary rows ``[vocab_start, vocab_start + Vr)``. For each chunk of tokens every
rank computes its logits ``hidden @ weight_shard.T * scale`` ``(chunk, Vr)``; the row maxima are
combined with an all-reduce (max), the sums of exponentials and the target logits (each label's
logit lives on one rank) with all-reduces (sum), and ``loss = log(sum exp) + max - target``. The
backward recomputes each chunk's logits (nothing ``(N, Vr)`` is kept), forms ``softmax - onehot``
on the rank's rows and sums the hidden-state gradient over the ranks (every rank holds the whole
hidden states). A model's loss head calls this (``LossHead.vocab_parallel``); the layout only
splits the weight and hands the head its group. ``local_vocab_rows`` reads a rank's rows and
where they start from the split weight, and ``vocab_parallel_logits`` gives every rank the whole
logits (a differentiable gather), so model code needs no ``torch.distributed`` of its own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from mcore.tp_regions import sum_grad_over

IGNORE_INDEX = -100


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32, or wider when it already is (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _chunks(n: int, size: int | None) -> list[slice]:
    step = n if not size or size <= 0 else size
    return [slice(i, min(i + step, n)) for i in range(0, max(n, 1), step)] if n else []


def _stats(
    logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(max, sum_exp, target, local_target_mask)`` of fp32 ``logits (n, Vr)`` over the whole vocabulary."""
    row_max = logits.max(dim=1).values  # (n,)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    sum_exp = (logits - row_max[:, None]).exp().sum(dim=1)  # (n,)
    local = labels - vocab_start
    mine = (local >= 0) & (local < logits.shape[1]) & (labels != IGNORE_INDEX)  # (n,)
    target = torch.where(mine, logits.gather(1, local.clamp(0, logits.shape[1] - 1)[:, None])[:, 0], 0.0)
    both = torch.stack([sum_exp, target])  # (2, n): one all-reduce
    dist.all_reduce(both, group=group)
    return row_max, both[0], both[1], mine


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, group, chunk_size, scale):  # type: ignore[override]
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        for part in _chunks(hidden.shape[0], chunk_size):
            logits = _wide(hidden[part] @ weight.T) * scale  # (n, Vr)
            row_max, sum_exp, target, _ = _stats(logits, labels[part], vocab_start, group)
            valid = labels[part] != IGNORE_INDEX
            total += torch.where(valid, sum_exp.log() + row_max - target, 0.0).sum()
        ctx.save_for_backward(hidden, weight, labels)
        ctx.vocab_start, ctx.group, ctx.chunk_size, ctx.scale = vocab_start, group, chunk_size, scale
        return total

    @staticmethod
    def backward(ctx, grad_total):  # type: ignore[override]
        hidden, weight, labels = ctx.saved_tensors
        grad_hidden = _wide(torch.zeros_like(hidden))
        grad_weight = _wide(torch.zeros_like(weight))
        for part in _chunks(hidden.shape[0], ctx.chunk_size):
            h, y = hidden[part], labels[part]
            logits = _wide(h @ weight.T) * ctx.scale  # (n, Vr)
            row_max, sum_exp, _, mine = _stats(logits, y, ctx.vocab_start, ctx.group)
            grad = (logits - row_max[:, None]).exp() / sum_exp[:, None]  # softmax on this rank's rows
            rows = torch.nonzero(mine)[:, 0]
            grad[rows, (y[rows] - ctx.vocab_start)] -= 1.0
            grad *= (y != IGNORE_INDEX)[:, None].to(grad.dtype) * grad_total * ctx.scale  # (n, Vr)
            grad_hidden[part] = grad @ _wide(weight)
            grad_weight += grad.T @ _wide(h)
        dist.all_reduce(grad_hidden, group=ctx.group)  # every rank's vocabulary rows contribute
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy_sum(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int,
    group: Any,
    chunk_size: int | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Sum over the non-ignored tokens of ``-log softmax(hidden @ W.T * scale)[label]``, ``W`` split by rows.

    ``hidden (N, H)`` whole on every rank of ``group``; ``weight_shard (Vr, H)`` this rank's rows,
    starting at vocabulary row ``vocab_start``; ``labels (N,)`` int64 with ``-100`` ignored. Every
    rank of ``group`` calls it with the same ``hidden``, ``labels`` and ``chunk_size`` (collectives).
    Returns a 0-d fp32 tensor (fp64 for fp64 inputs), the same on every rank; differentiable in ``hidden`` and ``weight_shard``.
    """
    if hidden.dim() != 2 or weight_shard.dim() != 2 or hidden.shape[1] != weight_shard.shape[1]:
        raise ValueError(
            f"vocab_parallel_cross_entropy_sum: hidden {tuple(hidden.shape)} and weight {tuple(weight_shard.shape)} "
            "must be (N, H) and (Vr, H)"
        )
    return _VocabParallelCE.apply(hidden, weight_shard, labels, vocab_start, group, chunk_size, scale)


def group_size(group: Any) -> int:
    """Ranks of ``group`` (the default group for ``None``)."""
    return int(dist.get_world_size(group))


def local_vocab_rows(weight: torch.Tensor, vocab_size: int, group: Any) -> tuple[torch.Tensor, int]:
    """This rank's rows ``(V / world, H)`` of an output weight split over ``group``, and the vocabulary
    index of the first: a ``DTensor`` placed ``Shard(0)`` over a 1-D mesh of the group's ranks (in
    the group's order), or a plain tensor already holding the rank's rows. ``ValueError`` (one
    line) for any other layout."""
    from torch.distributed.tensor import DTensor, Shard

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if isinstance(weight, DTensor):
        mesh = weight.device_mesh
        if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),) or mesh.size() != world:
            raise ValueError(
                f"vocab-parallel loss: the output weight is a DTensor placed {tuple(weight.placements)} over a mesh "
                f"of shape {tuple(mesh.shape)}; expected (Shard(0),) over the {world} ranks of its group"
            )
        if mesh.get_local_rank() != rank:
            raise ValueError(
                f"vocab-parallel loss: this rank is {mesh.get_local_rank()} of the weight's mesh but {rank} of the "
                "group; the mesh and the group must order the ranks alike"
            )
        return weight.to_local(), rank * (weight.shape[0] // world)
    if weight.shape[0] * world != vocab_size:
        raise ValueError(
            f"vocab-parallel loss: the output weight holds {weight.shape[0]} rows on each of {world} ranks for a "
            f"vocabulary of {vocab_size}; expected this rank's {vocab_size // world} rows or a Shard(0) DTensor"
        )
    return weight, rank * weight.shape[0]


class _GatherLastDim(torch.autograd.Function):
    """All-gather over ``group`` along the last dim, in rank order; backward keeps this rank's slice
    (every rank consumes the gathered tensor alike)."""

    @staticmethod
    def forward(ctx, local, group):  # type: ignore[override]
        ctx.group, ctx.width = group, local.shape[-1]
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        start = dist.get_rank(ctx.group) * ctx.width
        return grad[..., start : start + ctx.width].contiguous(), None


def vocab_parallel_logits(
    hidden: torch.Tensor, weight_shard: torch.Tensor, *, group: Any, scale: float = 1.0
) -> torch.Tensor:
    """The whole logits ``(..., V)`` on every rank of ``group`` from ``hidden (..., H)`` (the same on every
    rank) and this rank's rows ``(Vr, H)``: each rank's slice, gathered in rank order. Differentiable,
    for a loss every rank computes alike from the whole logits: a rank's slice gets its slice of the
    gradient and the hidden states' gradient is summed over the group."""
    local = torch.nn.functional.linear(sum_grad_over(hidden, group), weight_shard) * scale  # (..., Vr)
    return _GatherLastDim.apply(local, group)  # (..., V)
