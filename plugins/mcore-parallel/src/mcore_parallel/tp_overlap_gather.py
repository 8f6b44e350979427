"""The all-gather side of ``[parallel.tp] overlap_chunks``: a block's input gathered in chunks, its GEMMs started on each.

Shape legend: B rows, T tokens per row, Tl = T / tp a rank's tokens, H the block's input width, O a
linear's output features held here, C chunks, Tc tokens of a rank's share per chunk.

Under sequence parallelism each block split over heads (a *region*, ``sequence_parallel.py``)
all-gathers its input by tokens, and only then do the GEMMs that read it (q, k, v; gate, up; MLA's
latent projections) start; in backward their input gradient, summed over the ranks, waits for the
whole data-gradient GEMM. Here (``overlap_chunks = C`` with ``sequence_parallel = true``) the
region's input is gathered in ``C`` chunks laid out rank-major as ``tp_overlap`` does for the row
side (chunk ``c``: tokens ``[lo, hi)`` of every rank's share), all launched at once, and the GEMMs
of every linear reading the input run on chunk ``c`` as soon as it has arrived while the later
chunks travel: one chunked gather per block input, shared by all its linears (a collective matmul,
as Megatron's ``tp_comm_overlap`` and torch's async TP do it with a ring of point-to-point sends).
In backward the data gradients of a chunk, summed over those linears, are reduce-scattered as soon
as they are computed, while the chunk's weight gradients and the next chunk's data gradients are.

Which linears read the input: a region's *candidates* are its column-parallel linears, its key/value
linears kept whole (GQA head slices) and its replicated linears, those whose input width is the
block's. The region's pre-hook computes every candidate on the gathered input (``_GatherGemms``)
and hands the block the gathered input; a candidate called with exactly that tensor returns its
output from there, one called with anything else computes as without overlap (a GEMM of the
pre-hook wasted, never a wrong value). What a call computed is dropped when the block returns, so
repeated calls and ``train.recompute = "full"`` (the whole layer run again, pre-hook included) see
their own. A region whose forward is wrapped on the instance (``train.recompute = "selective"``
wraps the attention, and its recompute in backward runs without the pre-hook) keeps the outputs
its first run took until the recompute takes them again: the projections' outputs are kept from
forward to backward, as Megatron's selective recompute keeps them (the layout drops any left after
the step's backward, in ``finish_grad_sync``).

Gradients: a column-parallel or head-slice candidate's input gradient is this rank's heads' part,
summed over the group by the reduce-scatter (the all-reduce that ``ColwiseParallel`` or
``HeadSliceLinear`` would make, as one reduce-scatter per block); a replicated candidate's output
gradient, like the gradient of the gathered input's other uses, is whole and the same on every rank
(what follows sums it over the heads), so this rank's tokens of it are enough, with no communication.

Under autocast the block's input is cast to the autocast dtype before the gather (half the bytes;
the GEMMs would cast it anyway): the block sees its gathered input in that dtype. Under
``torch.compile`` the gather, its GEMMs and the candidates' forward run eagerly (graph breaks), as
the row side does. Equal results to the unchunked path are tested on gloo.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from mcore_parallel.sequence_parallel import gather_tokens
from mcore_parallel.token_comm import all_gather_single, reduce_scatter_single
from mcore_parallel.tp_modules import HeadSliceLinear, copy_to_group
from mcore_parallel.tp_overlap import chunk_bounds, rank_major

__all__ = ["ColumnShardLinear", "GatherRegion", "GatheredInputLinear"]


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.to_local() if isinstance(t, DTensor) else t


class ColumnShardLinear(nn.Linear):
    """A column-parallel ``nn.Linear`` (weight and bias ``Shard(0)`` DTensors) computing on its local rows.

    What ``ColwiseParallel`` does, without its input hook, so that the input this linear is called
    with stays the tensor the block handed it (``GatherRegion.take`` recognises it)."""

    tp_group: Any

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_group(x, self.tp_group), _local(self.weight), _local(self.bias))  # type: ignore[arg-type]


def _operands(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """``(weight (O, H), bias (O,) or None, partial)``: what this rank computes of ``linear``; ``partial``
    when its input gradient is this rank's heads' part only (summed over the group)."""
    if isinstance(linear, HeadSliceLinear):
        lo, hi = linear.rows
        return linear.weight[lo:hi], None if linear.bias is None else linear.bias[lo:hi], True
    if isinstance(linear, ColumnShardLinear):
        return _local(linear.weight), _local(linear.bias), True  # type: ignore[return-value]
    return linear.weight, linear.bias, False  # replicated: whole on every rank


class _GatherGemms(torch.autograd.Function):
    """Forward: ``(B, Tl, H)`` -> the gathered ``(B, T, H)`` and each linear's ``(B, T, O)``; backward: this
    rank's ``(B, Tl, H)`` input gradient (module docstring)."""

    @staticmethod
    def forward(ctx, x, group, rank, world, chunks, partial, biased, *params):  # type: ignore[override]
        weights, biases = _unpack(params, biased)
        batch, local, width = x.shape
        bounds = chunk_bounds(local, chunks)
        pieces, works = [], []
        for lo, hi in bounds:  # every chunk on the wire at once: the GEMMs wait only for the chunk they read
            whole = x.new_empty((world * batch, hi - lo, width))  # ranks' pieces one after another on dim 0
            works.append(all_gather_single(whole, x[:, lo:hi].contiguous(), group=group, async_op=True))
            pieces.append(whole)
        full = x.new_empty((batch, world * local, width))  # (B, T, H)
        outs = [x.new_empty((batch, world * local, w.shape[0])) for w in weights]  # (B, T, O) each
        for (lo, hi), whole, work in zip(bounds, pieces, works, strict=True):
            work.wait()
            piece = whole.view(world, batch, hi - lo, width)  # (world, B, Tc, H): rank-major
            rank_major(full, world, lo, hi).copy_(piece)
            for w, b, out in zip(weights, biases, outs, strict=True):
                rank_major(out, world, lo, hi).copy_(F.linear(piece, w, b))  # (world, B, Tc, O)
        ctx.save_for_backward(full, *weights)
        ctx.group, ctx.rank, ctx.world, ctx.chunks = group, rank, world, chunks
        ctx.partial, ctx.biased = partial, biased
        return (full, *outs)

    @staticmethod
    def backward(ctx, grad_full, *grads):  # type: ignore[override]
        full, *weights = ctx.saved_tensors
        world, rank = ctx.world, ctx.rank
        batch, tokens, width = full.shape
        local = tokens // world
        mine = slice(rank * local, (rank + 1) * local)
        grads = [None if g is None else g.contiguous() for g in grads]
        needs = ctx.needs_input_grad[7:]  # each weight's, then its bias's when it has one
        firsts = [0, *itertools.accumulate(1 + int(b) for b in ctx.biased)][:-1]  # each weight's place in params
        grad_w = [
            torch.zeros_like(w) if g is not None and needs[at] else None
            for w, g, at in zip(weights, grads, firsts, strict=True)
        ]
        split = [i for i, (g, part) in enumerate(zip(grads, ctx.partial, strict=True)) if g is not None and part]
        pending = []
        for lo, hi in chunk_bounds(local, ctx.chunks):
            if split:  # this chunk's partial input gradient travels while its weight gradients are computed
                summed = sum(rank_major(grads[i], world, lo, hi) @ weights[i] for i in split)  # (world, B, Tc, H)
                piece = full.new_empty((batch, hi - lo, width))  # this rank's tokens of the chunk, summed
                flat = summed.reshape(-1, hi - lo, width)  # (world * B, Tc, H): rank r's part at rows r*B..
                pending.append((lo, hi, piece, reduce_scatter_single(piece, flat, group=ctx.group, async_op=True)))
            inputs = rank_major(full, world, lo, hi).reshape(-1, width)  # (world * B * Tc, H)
            for w_grad, g in zip(grad_w, grads, strict=True):
                if w_grad is not None and g is not None:
                    w_grad.addmm_(rank_major(g, world, lo, hi).reshape(-1, g.shape[-1]).T, inputs)
        # whole gradients (the gathered input's other uses, replicated linears): this rank's tokens suffice,
        # computed while the last chunks' reduce-scatters travel
        grad_x = full.new_zeros((batch, local, width)) if grad_full is None else grad_full[:, mine].clone()
        for w, g, part in zip(weights, grads, ctx.partial, strict=True):
            if g is not None and not part:
                grad_x += g[:, mine] @ w  # (B, Tl, H)
        for lo, hi, piece, work in pending:
            work.wait()
            grad_x[:, lo:hi] += piece
        param_grads = []
        for w_grad, g, has_bias in zip(grad_w, grads, ctx.biased, strict=True):
            param_grads.append(w_grad)
            if has_bias:
                param_grads.append(None if g is None else g.sum(dim=(0, 1)))
        param_grads = [p if need else None for p, need in zip(param_grads, needs, strict=True)]
        return (grad_x, None, None, None, None, None, None, *param_grads)


def _unpack(
    params: tuple[torch.Tensor, ...], biased: tuple[bool, ...]
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """``(w0, [b0,] w1, [b1,] ...)`` -> weights and biases (``None`` where a linear has none)."""
    weights: list[torch.Tensor] = []
    biases: list[torch.Tensor | None] = []
    it = iter(params)
    for has_bias in biased:
        weights.append(next(it))
        biases.append(next(it) if has_bias else None)
    return weights, biases


@torch.compiler.disable
def _gather_gemms(
    x: torch.Tensor, linears: list[nn.Linear], group: Any, rank: int, world: int, chunks: int
) -> list[torch.Tensor]:
    operands = [_operands(linear) for linear in linears]
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    params: list[torch.Tensor] = []
    for w, b, _ in operands:
        params.extend(t if dtype is None else t.to(dtype) for t in (w, b) if t is not None)
    partial = tuple(part for _, _, part in operands)
    biased = tuple(b is not None for _, b, _ in operands)
    with torch.autocast(x.device.type, enabled=False):  # inputs are already in the compute dtype
        return list(_GatherGemms.apply(x.contiguous(), group, rank, world, chunks, partial, biased, *params))


@dataclass
class _Call:
    """One call of a region: the gathered input handed to the block, and the outputs of its linears not
    yet taken with the takes each has left (``takes``: how many it had)."""

    full: torch.Tensor
    outputs: dict[int, torch.Tensor]
    left: dict[int, int]
    takes: int


class GatherRegion:
    """One region's chunked gather and the linears that read it (``candidates``, set by the layout).

    ``gather`` is the region's pre-hook's work, ``take`` a candidate's, ``release`` the post-hook's.
    ``rerun``: the region's forward is wrapped to run again in backward without its hooks (selective
    recompute): each output is kept until that run has taken it too (or ``reset``, after the step's
    backward, for one it never reached)."""

    def __init__(self, *, group: Any, rank: int, world: int, chunks: int, rerun: bool = False) -> None:
        self.group, self.rank, self.world, self.chunks, self.rerun = group, rank, world, chunks, rerun
        self.candidates: list[nn.Linear] = []
        self._calls: dict[int, _Call] = {}  # by id of the gathered input
        self._last: int | None = None

    @torch.compiler.disable
    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's ``(B, Tl, H)`` -> the gathered ``(B, T, H)``, every candidate reading ``H`` computed on it."""
        device = local.device.type
        if torch.is_autocast_enabled(device) and local.is_floating_point():
            local = local.to(torch.get_autocast_dtype(device))  # what the GEMMs read: half the bytes to gather
        linears = [c for c in self.candidates if local.dim() == 3 and c.in_features == local.shape[-1]]
        if not linears:
            return gather_tokens(local, self.group, self.rank, self.world)
        full, *outs = _gather_gemms(local, linears, self.group, self.rank, self.world, self.chunks)
        takes = 2 if self.rerun and torch.is_grad_enabled() else 1  # the recompute takes them again
        keys = [id(c) for c in linears]
        self._calls[id(full)] = _Call(full, dict(zip(keys, outs, strict=True)), dict.fromkeys(keys, takes), takes)
        self._last = id(full)
        return full

    def take(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
        """``linear``'s output computed in ``gather``, if ``x`` is the gathered input handed to the block."""
        call = self._calls.get(id(x))
        if call is None or call.full is not x or id(linear) not in call.outputs:
            return None
        out = call.outputs[id(linear)]
        call.left[id(linear)] -= 1
        if not call.left[id(linear)]:
            del call.outputs[id(linear)]
        if not call.outputs:
            del self._calls[id(x)]
        return out

    def release(self) -> None:
        """The block has returned: drop what its call computed, but (``rerun``) the outputs it took,
        which the run in backward takes again."""
        call = None if self._last is None else self._calls.get(self._last)
        self._last = None
        if call is None:
            return
        for key in [k for k, left in call.left.items() if left == call.takes or not self.rerun]:
            call.outputs.pop(key, None)
        if not call.outputs:
            del self._calls[id(call.full)]

    def reset(self) -> None:
        """Drop every call's outputs (the step's backward is over)."""
        self._calls.clear()
        self._last = None


class GatheredInputLinear(nn.Linear):
    """A candidate of a ``GatherRegion``: its output taken from the region's chunked GEMMs when it is called
    with the gathered input, else computed by its own class's forward."""

    tp_gather: GatherRegion

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp_gather.take(self, x)
        return super().forward(x) if out is None else out
