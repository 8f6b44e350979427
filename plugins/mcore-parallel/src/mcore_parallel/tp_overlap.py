"""Row-parallel linears whose reduction overlaps their own GEMM (``[parallel.tp] overlap_chunks``).

Shape legend: B rows, T tokens per row, Tl = T / tp a rank's tokens (sequence parallel), F/tp this
rank's input features, H output features, C chunks, Tc = Tl / C (or T / C) tokens per chunk.

A row-parallel linear's output is a partial sum on every rank: plain ``tp`` all-reduces it,
sequence parallelism reduce-scatters it by tokens. Issued after the whole GEMM, that collective
sits on the critical path. Here the GEMM runs in ``C`` token chunks and each chunk's reduction is
launched asynchronously as soon as the chunk is computed, so the collective of chunk ``c`` runs
while the GEMM of chunk ``c + 1`` does (on CUDA, NCCL's own stream; on gloo, its threads). Under
sequence parallelism the backward needs the whole output gradient: its all-gather is chunked the
same way, chunk ``c + 1`` arriving while the data and weight gradients of chunk ``c`` are computed.

Chunks keep sequence parallelism's ownership: chunk ``c`` holds, for every rank ``r``, the
``c``-th piece of ``r``'s tokens, laid out rank-major ``(tp, B, Tc, *)``, so reduce-scattering
it hands rank ``r`` exactly its own tokens of the chunk, and the concatenation over chunks is the
same ``(B, Tl, H)`` as one reduce-scatter.

The weight stays a ``Shard(1)`` DTensor (checkpoints as with ``RowwiseParallel``); the forward
uses its local shard. The bias is a plain tensor added after the reduction (under sequence
parallelism it sees a rank's tokens only, so the layout sums its gradient over the group). Under
autocast the input and weight are cast before the chunked GEMMs, as ``F.linear`` would. Under
``torch.compile`` this linear runs eagerly (a graph break): torch's async TP is the compiled way
to overlap. Equal results to the unchunked path are tested on gloo. The other side, the all-gather
before a block's column-parallel GEMMs under sequence parallelism, is ``tp_overlap_gather``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from mcore_parallel.token_comm import all_gather_single, reduce_scatter_single

__all__ = ["OverlappedRowLinear", "chunk_bounds", "rank_major"]


def chunk_bounds(length: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` near-equal ``[lo, hi)`` ranges of ``length`` (fewer when ``length`` is smaller)."""
    n = max(1, min(chunks, length))
    edges = [length * i // n for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n) if edges[i + 1] > edges[i]]


def rank_major(x: torch.Tensor, world: int, lo: int, hi: int) -> torch.Tensor:
    """``(B, world * Tl, *)`` -> ``(world, B, hi - lo, *)``: tokens ``[lo, hi)`` of every rank's share."""
    batch, seq = x.shape[:2]
    return x.view(batch, world, seq // world, *x.shape[2:])[:, :, lo:hi].movedim(1, 0)


class _OverlappedRow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, group, world, chunks, sequence_parallel):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.world, ctx.chunks, ctx.sp = group, world, chunks, sequence_parallel
        batch, seq = x.shape[:2]
        outs, works = [], []
        if sequence_parallel:
            for lo, hi in chunk_bounds(seq // world, chunks):
                partial = rank_major(x, world, lo, hi) @ weight.T  # (world, B, Tc, H): contiguous
                out = partial.new_empty(partial.shape[1:])  # (B, Tc, H): this rank's tokens, summed
                flat = partial.view(-1, *partial.shape[2:])  # (world * B, Tc, H): rank r's part at rows r*B..
                works.append(reduce_scatter_single(out, flat, group=group, async_op=True))
                outs.append(out)
        else:
            for lo, hi in chunk_bounds(seq, chunks):
                out = x[:, lo:hi] @ weight.T  # (B, Tc, H) partial
                works.append(dist.all_reduce(out, group=group, async_op=True))
                outs.append(out)
        for work in works:
            work.wait()
        return torch.cat(outs, dim=1)  # (B, Tl or T, H)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch.empty_like(x)  # (B, T, F/tp)
        grad_w = torch.zeros_like(weight)  # (H, F/tp)
        features = x.shape[-1]
        if not ctx.sp:  # the all-reduce's backward is the identity: every rank holds the whole gradient
            torch.matmul(grad, weight, out=grad_x)
            grad_w.addmm_(grad.reshape(-1, grad.shape[-1]).T, x.reshape(-1, features))
            return grad_x, grad_w, None, None, None, None
        bounds = chunk_bounds(grad.shape[1], ctx.chunks)

        def start(lo: int, hi: int) -> tuple[torch.Tensor, Any]:
            piece = grad[:, lo:hi].contiguous()  # (B, Tc, H) of this rank's tokens
            whole = piece.new_empty((ctx.world * piece.shape[0], *piece.shape[1:]))  # (world * B, Tc, H)
            return whole, all_gather_single(whole, piece, group=ctx.group, async_op=True)

        pending = start(*bounds[0])
        for index, (lo, hi) in enumerate(bounds):
            whole, work = pending
            work.wait()
            if index + 1 < len(bounds):
                pending = start(*bounds[index + 1])  # the next chunk travels while this one computes
            g = whole.view(ctx.world, -1, hi - lo, whole.shape[-1])  # (world, B, Tc, H)
            rank_major(grad_x, ctx.world, lo, hi).copy_(g @ weight)  # (world, B, Tc, F/tp)
            grad_w.addmm_(g.reshape(-1, g.shape[-1]).T, rank_major(x, ctx.world, lo, hi).reshape(-1, features))
        return grad_x, grad_w, None, None, None, None


@torch.compiler.disable
def _overlapped(
    x: torch.Tensor, weight: torch.Tensor, group: Any, world: int, chunks: int, sequence_parallel: bool
) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):  # inputs are already in the compute dtype
        return _OverlappedRow.apply(x, weight, group, world, chunks, sequence_parallel)  # type: ignore[no-any-return]


class OverlappedRowLinear(nn.Linear):
    """An ``nn.Linear`` with a ``Shard(1)`` DTensor weight whose reduction overlaps its chunked GEMM."""

    tp_group: Any
    tp_world: int
    overlap_chunks: int
    sequence_parallel: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight  # (H, F/tp)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
        lead = x.shape[:-1]
        if self.sequence_parallel:  # (B, T, F/tp): tokens on dim 1, as the layout split them
            if x.dim() != 3:
                raise ValueError(
                    f"tp overlap: a sequence-parallel row linear takes (B, T, F) inputs, not {tuple(x.shape)}"
                )
            rows = x.contiguous()
        else:
            rows = x.reshape(1, -1, x.shape[-1]).contiguous()  # (1, N, F/tp): any leading dims
        out = _overlapped(rows, weight, self.tp_group, self.tp_world, self.overlap_chunks, self.sequence_parallel)
        if not self.sequence_parallel:
            out = out.view(*lead, out.shape[-1])
        return out if self.bias is None else out + self.bias.to(out.dtype)
