"""The collectives of one unit: all-gather of its shard, reduce-scatter of its gradients.

Gather: the shard's plain prefix is all-gathered into a pooled ``(N, S_plain)`` buffer (cast
to the compute dtype first when it differs) and copied out, parameter by parameter, into the
pooled un-sharded buffer; parameters a precision recipe gathers in its own format are
all-gathered (row-split) or broadcast from their owner (kept whole) as payloads and unpacked:
into the buffer when ``unpack`` gives a tensor, or attached to the parameter when it gives a
``QuantizedWeight`` (``mcore.precision.quantized``: the recipe's GEMM reads the bytes itself;
such a parameter has no room in the un-sharded buffer, ``geometry``'s ``buffered``).

A recipe may offer ``gather_payloads(shards, asks)`` (optional, found by ``getattr``): the payloads of
all the unit's row-split shards at once, each what ``gather_payload(shard, **ask)`` answers, so that
the collectives the payloads need (the global amax of per-tensor scales) run once per unit gather
instead of once per parameter.
Reduce-scatter: gradients are laid out as the ``(N, S)`` input (row r: rank r's shard) and
reduced into ``(S,)``. When a gradient is reduced and where it goes is ``gradients``'s call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from mcore.precision import quantized
from mcore.precision.quantized import QuantizedWeight
from mcore.protocols.precision import GatherPayload
from mcore_fsdp import comm
from mcore_fsdp.pool import Lease
from mcore_fsdp.storage import Storage, UnitContext, alias


@dataclass(eq=False)
class Gather:
    """An all-gather in flight: its work handles and borrowed buffers."""

    param: Lease
    gathered: Lease | None = None
    send: Lease | None = None
    work: Any = None
    quantized: list[tuple[int, list[torch.Tensor], Any, list[Any]]] = field(default_factory=list)
    ready: torch.cuda.Event | None = None  # CUDA: copy-out finished on the gather stream


def start_gather(store: Storage, ctx: UnitContext) -> Gather:
    """Issue the all-gather of ``store``'s shard (asynchronous; on CUDA on the gather stream,
    copied out there too); ``complete_gather`` (CPU) or the ``ready`` event (CUDA) ends it."""
    pool, streams = ctx.pool, ctx.streams
    stream = streams.gather
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream())
    n, s, plain = store.geometry.world, store.geometry.shard_numel, store.plain_numel
    with streams.on(stream):
        gather = Gather(param=pool.acquire("param", store.compute_dtype, store.geometry.full_numel, stream))
        if n == 1:  # the un-sharded layout is the shard's
            gather.param.view(s).copy_(store.shard)
        else:
            send = store.shard[:plain]
            if store.compute_dtype != store.orig_dtype:
                gather.send = pool.acquire("send", store.compute_dtype, plain, stream)
                send = gather.send.view(plain).copy_(send)
            if plain:
                gather.gathered = pool.acquire("gather", store.compute_dtype, n * plain, stream)
                gather.work = comm.all_gather(gather.gathered.view(n * plain), send, store.groups.shard_group)
            _issue_quantized(store, gather)
        if streams.cuda:
            complete_gather(store, ctx, gather)
            gather.ready = torch.cuda.Event()
            gather.ready.record(stream)
    return gather


def _issue_quantized(store: Storage, gather: Gather) -> None:
    """Row-split parameters: all-gather every rank's payload. Whole ones: the owner's payload,
    broadcast (the others receive into buffers shaped by the probe)."""
    n, rank, group = store.geometry.world, store.groups.shard_rank, store.groups.shard_group
    recipe = store.gather_recipe
    split = _split_payloads(store)
    for i, (slot, q) in enumerate(zip(store.geometry.slots, store.quantized)):
        if not q:
            continue
        outs, works = [], []
        if slot.owner is None:
            payload = split[i]
            for t in payload.tensors:
                t = t.contiguous()
                out = torch.empty((n * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
                works.append(comm.all_gather(out.view(-1), t.view(-1), group))
                outs.append(out)
            metadata = payload.metadata
        else:
            spec = store.payload_specs[i]
            if rank == slot.owner:
                weight = store.shard[slot.offset : slot.offset + slot.numel].view(slot.shape)
                outs = [t.contiguous() for t in recipe.gather_payload(weight, **store.payload_asks[i]).tensors]
            else:
                outs = [torch.empty(shape, dtype=dtype, device=store.groups.device) for shape, dtype in spec.tensors]
            works = [comm.broadcast(t, slot.owner, group) for t in outs]
            metadata = spec.metadata
        gather.quantized.append((i, outs, metadata, works))


def _split_payloads(store: Storage) -> dict[int, GatherPayload]:
    """The payloads of the row-split quantized parameters (slot index -> payload): one
    ``gather_payloads`` call when the recipe offers it (module docstring), else one
    ``gather_payload`` call per parameter. Every rank asks for the same parameters in the same
    order, so the collectives a recipe runs inside line up."""
    recipe = store.gather_recipe
    slots = store.geometry.slots
    indices = [i for i, (slot, q) in enumerate(zip(slots, store.quantized)) if q and slot.owner is None]
    # each the padded local chunk: (rows, *shape[1:]) including zero padding rows
    shards = [
        store.shard[slots[i].offset : slots[i].offset + slots[i].chunk_numel].view(slots[i].rows, *slots[i].shape[1:])
        for i in indices
    ]
    asks = [store.payload_asks[i] for i in indices]
    batch = getattr(recipe, "gather_payloads", None)
    if batch is not None and indices:
        payloads = list(batch(shards, asks))
    else:
        payloads = [recipe.gather_payload(shard, **ask) for shard, ask in zip(shards, asks)]
    if len(payloads) != len(indices) or any(p is None for p in payloads):
        raise ValueError(
            f"fully_shard({store.label}): precision recipe answered {len(payloads)} payloads (None among them: "
            f"{any(p is None for p in payloads)}) for {len(indices)} parameters it gathers in its own format; "
            "allowed: one payload per parameter, as at sharding time"
        )
    return dict(zip(indices, payloads))


def complete_gather(store: Storage, ctx: UnitContext, gather: Gather) -> None:
    """Wait for the collectives and copy each parameter out of the gathered buffer."""
    n, plain = store.geometry.world, store.plain_numel
    pool, stream = ctx.pool, ctx.streams.gather
    param = gather.param.view(store.geometry.full_numel)
    if gather.work is not None:
        gathered = gather.gathered
        assert gathered is not None
        gather.work.wait()
        dsts = store.cached(gather.param, "unpack_dst", lambda: _unpack_dsts(store, param))
        srcs = store.cached(gathered, "unpack_src", lambda: _unpack_srcs(store, gathered, n, plain))
        torch._foreach_copy_(dsts, srcs)
        pool.release(gathered, stream)
        gather.gathered = None
    if gather.send is not None:
        pool.release(gather.send, stream)
        gather.send = None
    for i, outs, metadata, works in gather.quantized:
        for w in works:
            w.wait()
        slot = store.geometry.slots[i]
        full = store.gather_recipe.unpack(tuple(outs), metadata)
        if isinstance(full, QuantizedWeight):  # to the recipe's GEMM as is; the buffer slot stays unwritten
            quantized.attach(store.unsharded[i], dataclasses.replace(full, shape=torch.Size(slot.shape)))
            continue
        if type(full) is not torch.Tensor or full.shape[0] < slot.shape[0] or not slot.buffered:
            allowed = (
                f"a plain tensor of at least {slot.shape[0]} rows or a QuantizedWeight"
                if slot.buffered
                else "a QuantizedWeight, as for the shape probe at sharding time (the parameter has no buffer room)"
            )
            raise ValueError(
                f"fully_shard({store.label}): precision recipe unpack returned {type(full).__name__} of shape "
                f"{tuple(getattr(full, 'shape', ()))}; allowed: {allowed}"
            )
        start = slot.full_offset
        param[start : start + slot.numel].view(slot.shape).copy_(full[: slot.shape[0]])
    gather.quantized = []
    gather.work = None


def _unpack_dsts(store: Storage, param: torch.Tensor) -> list[torch.Tensor]:
    """Where each plainly gathered parameter goes in the un-sharded buffer."""
    n, out = store.geometry.world, []
    for slot, q in zip(store.geometry.slots, store.quantized):
        if not q:
            dst = param[slot.full_offset : slot.full_offset + slot.full_numel(n)]
            out.append(dst if slot.whole else dst.view(n, slot.chunk_numel))  # (N, chunk): rank-major rows
    return out


def _unpack_srcs(store: Storage, gathered: Lease, n: int, plain: int) -> list[torch.Tensor]:
    """Each plainly gathered parameter's place in the ``(N, S_plain)`` gathered buffer."""
    rows = gathered.view(n * plain).view(n, plain)  # row r: rank r's shard
    return [
        rows[slot.owner, slot.offset : slot.offset + slot.numel]
        if slot.owner is not None
        else rows[:, slot.offset : slot.offset + slot.chunk_numel]
        for slot, q in zip(store.geometry.slots, store.quantized)
        if not q
    ]


# -- reduce-scatter -------------------------------------------------------------------------------
@dataclass(eq=False)
class ScatterPlan:
    """How gradients are laid into a ``(N, S)`` buffer: ``pieces[k]`` = (parameter index, first
    row, end row, shape of those rows as copied) goes to ``dsts[k]``; ``pads`` are zeroed."""

    pieces: list[tuple[int, int, int, tuple[int, ...]]]
    dsts: list[torch.Tensor]
    pads: list[torch.Tensor]

    def add(self, index: int, start: int, end: int, dst: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
        if end > start:
            self.pieces.append((index, start, end, shape or (dst.numel(),)))
            self.dsts.append(dst)


def lay_out_grads(store: Storage, grads: list[torch.Tensor], out: Lease | torch.Tensor) -> None:
    """Lay the full gradients out as the ``(N, S)`` reduce-scatter input (row r: rank r's
    shard), casting to its dtype; padding is zero. ``out``: a pooled buffer, or the unit's
    gradient buffer viewed as ``(1, S)``. One ``_foreach_copy_`` over views made once per
    buffer (``torch._chunk_cat`` would be one kernel, but on CUDA it stages its metadata
    through pinned host memory at a cost of ~0.4 ms of CPU a call)."""
    n, s = store.geometry.world, store.geometry.shard_numel
    lease = out if isinstance(out, Lease) else None
    plan = store.cached(lease, "scatter", lambda: _scatter_plan(store, out.view(n * s).view(n, s), lease is None))
    srcs = [
        grads[i].reshape(shape) if start == 0 and end == len(grads[i]) else grads[i][start:end].reshape(shape)
        for i, start, end, shape in plan.pieces
    ]
    torch._foreach_copy_(plan.dsts, srcs)
    if plan.pads:
        torch._foreach_zero_(plan.pads)


def scatter_views(store: Storage) -> list[torch.Tensor]:
    """The views ``lay_out_grads`` made of the unit's own gradient buffer (none before it ran)."""
    plan = store.own_views.get((store, "scatter"))
    return plan.dsts + plan.pads if plan is not None else []


def _scatter_plan(store: Storage, rows: torch.Tensor, of_grad_flat: bool) -> ScatterPlan:
    """Per parameter, the rows of its gradient that go to each place of ``rows`` (N, S);
    over the unit's gradient buffer, the views are aliases (``release_grads`` re-points them)."""
    n = store.geometry.world
    plan = ScatterPlan([], [], [])
    for i, slot in enumerate(store.geometry.slots):
        off, chunk, rn = slot.offset, slot.chunk_numel, slot.row_numel
        if slot.owner is not None:
            plan.add(i, 0, slot.shape[0], rows[slot.owner, off : off + slot.numel])
            continue
        full = slot.shape[0] // slot.rows  # ranks holding all ``rows`` rows
        plan.add(i, 0, full * slot.rows, rows[:full, off : off + chunk], (full, chunk))
        if full < n:
            rest = slot.shape[0] - full * slot.rows  # rows of the one partial rank
            if rest:
                plan.add(i, full * slot.rows, slot.shape[0], rows[full, off : off + rest * rn])
            plan.pads += [rows[full, off + rest * rn : off + chunk], rows[full + 1 :, off : off + chunk]]
    plan.pads += [rows[rank, start:end] for rank, start, end in store.geometry.whole_padding]
    plan.pads = [p for p in plan.pads if p.numel()]
    if of_grad_flat:
        plan.dsts, plan.pads = [alias(t) for t in plan.dsts], [alias(t) for t in plan.pads]
    return plan


def reduce_scatter(store: Storage, out: torch.Tensor, full: Lease, scale: float | None) -> Any:
    """Start the reduce-scatter of ``full`` (``(N, S)``, laid out by ``lay_out_grads``) into ``out``
    (``(S,)``), scaled by ``scale`` inside the collective when given (``fuses_scaling``)."""
    n, s = store.geometry.world, store.geometry.shard_numel
    return comm.reduce_scatter(out, full.view(n * s), store.groups.shard_group, scale)


def fuses_scaling(store: Storage) -> bool:
    """Whether the shard group's reduce-scatter can divide inside the collective (NCCL)."""
    return comm.fuses_scaling(store.groups.shard_group)


def all_reduce_replicas(store: Storage, out: torch.Tensor) -> None:
    """HSDP: sum the reduced shard over the replicas (blocking)."""
    assert store.groups.replicate_group is not None
    comm.all_reduce_sum(out, store.groups.replicate_group).wait()
