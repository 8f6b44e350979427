"""One ``fully_shard`` call's parameters: their sharded storage, gather and gradient reduction.

Storage (per rank): ``shard`` is one flat buffer of ``S`` elements holding this rank's rows
of every parameter (see ``geometry``: rows split over the ranks, or the whole parameter on
one of them); each registered parameter is a ``Shard(0)`` DTensor whose local tensor is a
view into it (all rows or none for a whole parameter: a row-ragged DTensor, see
``mcore.ragged``), so the optimizer updates ``shard`` in place. A parameter on the meta
device gets its rows allocated here and left for ``mcore.construct.init_params`` to fill.

Un-sharded (compute) parameters are persistent ``nn.Parameter`` objects whose ``.data`` is
pointed at a pooled buffer while the unit is gathered; autograd accumulates their grads, and
the unit reduce-scatters them into ``grad_flat`` (``S`` elements) whose views are the
sharded parameters' ``.grad`` DTensors; once the optimizer drops them, ``release_grads``
frees it and the next reduction takes a new one from the caching allocator.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mcore_fsdp import comm
from mcore_fsdp.geometry import Geometry, Slot, plan
from mcore_fsdp.groups import MeshGroups
from mcore_fsdp.policy import MixedPrecisionPolicy
from mcore_fsdp.pool import Lease

if TYPE_CHECKING:
    from mcore_fsdp.runtime import Context


class State(Enum):
    SHARDED = "sharded"
    UNSHARDED = "unsharded"


@dataclass(eq=False)
class _Gather:
    """An all-gather in flight: its work handles and borrowed buffers."""

    param: Lease
    gathered: Lease | None = None
    send: Lease | None = None
    work: Any = None
    quantized: list[tuple[int, list[torch.Tensor], Any, list[Any]]] = field(default_factory=list)
    ready: torch.cuda.Event | None = None  # CUDA: copy-out finished on the gather stream


@dataclass(eq=False)
class _Reduce:
    """A reduce-scatter in flight (``in_place``: its result is ``grad_flat`` itself)."""

    unit: Unit
    work: Any
    rs_in: Lease | None
    rs_out: Lease | None
    has_grad: list[bool]
    in_place: bool
    scaled: bool = False  # the division by the divisor happened inside the collective


@dataclass(frozen=True, slots=True)
class _PayloadSpec:
    """The payload a precision recipe gathers for a parameter: tensor shapes/dtypes, metadata."""

    tensors: list[tuple[torch.Size, torch.dtype]]
    metadata: Any


@dataclass(eq=False)
class _ScatterPlan:
    """How gradients are laid into a ``(N, S)`` buffer: ``pieces[k]`` = (parameter index, first
    row, end row, shape of those rows as copied) goes to ``dsts[k]``; ``pads`` are zeroed."""

    pieces: list[tuple[int, int, int, tuple[int, ...]]]
    dsts: list[torch.Tensor]
    pads: list[torch.Tensor]

    def add(self, index: int, start: int, end: int, dst: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
        if end > start:
            self.pieces.append((index, start, end, shape or (dst.numel(),)))
            self.dsts.append(dst)


@dataclass(frozen=True, slots=True)
class ParamEntry:
    """A parameter to shard and every (module, attribute) that holds it (tied weights)."""

    name: str
    param: nn.Parameter
    owners: tuple[tuple[nn.Module, str], ...]


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor over ``t``'s memory that is not a view of it (no ``_base``): pointing it at
    other memory later (``set_``) lets the old buffer be freed."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), t.shape, t.stride()
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (a view of our flat buffers), without autograd."""
    return cast(DTensor, t)._local_tensor


def _grad_ready(unit_ref: weakref.ref[Unit], param: torch.Tensor) -> None:
    unit = unit_ref()
    if unit is not None:
        unit._on_grad_ready(param)


class Unit:
    """The sharded parameters of one ``fully_shard``-ed module and their gather/reduce."""

    def __init__(
        self,
        *,
        label: str,
        entries: list[ParamEntry],
        groups: MeshGroups,
        mp: MixedPrecisionPolicy,
        reshard_after_forward: bool,
        gather_recipe: Any = None,
        divide_factor: float | None = None,
        keep_whole: list[bool] | None = None,
    ) -> None:
        self.label = label
        self.groups = groups
        self.mp = mp
        self.reshard_after_forward = reshard_after_forward
        self.reshard_after_backward = True
        self.requires_grad_sync = True
        self.divide_factor = divide_factor
        self.gather_recipe = gather_recipe
        self._context: Context | None = None
        self.state = State.SHARDED
        self._gather: _Gather | None = None
        self._param_lease: Lease | None = None
        self._ready = 0
        self.bw_done = False

        dtypes = {e.param.dtype for e in entries}
        if len(dtypes) > 1:
            raise ValueError(
                f"fully_shard({label}): parameters have dtypes {sorted(map(str, dtypes))}; allowed: one dtype per "
                "fully_shard call (shard modules of different dtypes separately)"
            )
        device = groups.device
        self.orig_dtype = dtypes.pop() if dtypes else torch.float32
        self.compute_dtype = mp.param_dtype or self.orig_dtype
        self.reduce_dtype = mp.reduce_dtype or self.compute_dtype
        n, rank = groups.shard_size, groups.shard_rank

        # Parameters the recipe gathers in its own format go last, so the plain all-gather
        # covers one prefix ``[:plain_numel]``; within each group row-split parameters come
        # first, then whole ones, largest first (the order their owners are chosen in).
        whole = [bool(keep_whole and keep_whole[i]) for i in range(len(entries))]
        probes = [self._probe_payload(e.param, n, whole[i]) for i, e in enumerate(entries)]
        quantized = [probe is not None for probe in probes]
        order = sorted(
            range(len(entries)),
            key=lambda i: (quantized[i], whole[i], -entries[i].param.numel() if whole[i] else 0, i),
        )
        ordered = [entries[i] for i in order]
        #: every (module, attribute) holding each parameter: where sharded/un-sharded ones are registered
        self.owners = [e.owners for e in ordered]
        self.quantized = [quantized[i] for i in order]
        #: per quantized slot: the payload's (shape, dtype)s and metadata for the whole parameter
        #: (what a rank that does not own a whole parameter allocates to receive it)
        self._payload_specs: dict[int, _PayloadSpec] = {
            j: probe for j, i in enumerate(order) if (probe := probes[i]) is not None
        }
        self.geometry: Geometry = plan(
            [tuple(e.param.shape) for e in ordered],
            n,
            whole=[whole[i] for i in order],
            groups=[int(q) for q in self.quantized],
        )
        slots = self.geometry.slots
        self.plain_numel = self.geometry.plain_numel

        # (S,) this rank's rows of every parameter, padded per parameter; zeros, so padding is
        # zero (a quantized gather reads the padded rows); rows of a parameter on the meta device
        # are left for its initialisation (``mcore.construct``): no rank ever holds it whole
        self.shard = torch.zeros(self.geometry.shard_numel, dtype=self.orig_dtype, device=device)
        self.sharded: list[nn.Parameter] = []
        self.unsharded: list[nn.Parameter] = []
        with torch.no_grad():
            for entry, slot in zip(ordered, slots):
                rows, start = slot.local_rows(rank), slot.row_start(rank)
                local = self._local_view(self.shard, slot)
                if rows and not entry.param.is_meta:
                    local.copy_(entry.param.detach()[start : start + rows])
                dt = DTensor.from_local(
                    local,
                    groups.mesh,
                    groups.placements,
                    run_check=False,
                    shape=torch.Size(slot.shape),
                    stride=_contiguous_stride(slot.shape),
                )
                sharded = nn.Parameter(dt, requires_grad=entry.param.requires_grad)
                self.sharded.append(sharded)
                full = nn.Parameter(
                    torch.empty(0, dtype=self.compute_dtype, device=device), requires_grad=entry.param.requires_grad
                )
                if full.requires_grad:
                    # a weak reference: the tensor's hook table is invisible to the garbage
                    # collector, so a bound method here would keep the whole model alive
                    full.register_post_accumulate_grad_hook(functools.partial(_grad_ready, weakref.ref(self)))
                self.unsharded.append(full)
        self.expected_grads = sum(p.requires_grad for p in self.unsharded)
        self._register(self.sharded)
        self.grad_flat: torch.Tensor | None = None
        self._own_views: dict[Any, Any] = {}  # views of shard/grad_flat made once (see _cached)
        #: views of a released grad_flat and where they pointed (offset, size, stride)
        self._released: list[tuple[torch.Tensor, int, torch.Size, tuple[int, ...]]] = []
        self._grad_dtensors: list[DTensor] = []

    @property
    def ctx(self) -> Context:
        """The root's shared context (set by lazy init before the first gather)."""
        assert self._context is not None, f"unit {self.label} used before its root's first forward"
        return self._context

    @ctx.setter
    def ctx(self, context: Context) -> None:
        self._context = context

    @property
    def initialised(self) -> bool:
        return self._context is not None

    # -- geometry helpers ---------------------------------------------------------------------
    @functools.cached_property
    def zero_copy(self) -> bool:
        """One shard, same dtype, no quantized gather: compute views alias the shard itself."""
        return self.groups.shard_size == 1 and self.compute_dtype == self.orig_dtype and not any(self.quantized)

    @property
    def empty(self) -> bool:
        return not self.owners

    def _local_view(self, flat: torch.Tensor, slot: Slot) -> torch.Tensor:
        rows = slot.local_rows(self.groups.shard_rank)
        return flat[slot.offset : slot.offset + rows * slot.row_numel].view(rows, *slot.shape[1:])

    def _probe_payload(self, param: torch.Tensor, n: int, whole: bool) -> _PayloadSpec | None:
        """Whether the recipe gathers ``param`` in its own format, probed on zeros of the shape
        it will see (the padded local rows, or the whole parameter when kept whole). A whole
        parameter is first asked about on the meta device: a recipe that gathers it as is (the
        answer depends on shape and dtype only) then costs no full-size tensor on every rank."""
        if self.gather_recipe is None:
            return None
        probe_rows = param.shape[0] if whole else -(-param.shape[0] // n)
        if (
            whole
            and self.gather_recipe.gather_payload(torch.empty(param.shape, dtype=param.dtype, device="meta")) is None
        ):
            return None
        probe = torch.zeros(probe_rows, *param.shape[1:], dtype=param.dtype, device=self.groups.device)
        payload = self.gather_recipe.gather_payload(probe)
        if payload is None:
            return None
        return _PayloadSpec([(t.shape, t.dtype) for t in payload.tensors], payload.metadata)

    def _register(self, params: list[nn.Parameter]) -> None:
        for owners, p in zip(self.owners, params):
            for module, attr in owners:
                module._parameters[attr] = p

    # -- gather ---------------------------------------------------------------------------------
    def start_unshard(self) -> None:
        """Issue the all-gather (asynchronous); ``wait_unshard`` makes the result usable."""
        if self.state is State.UNSHARDED or self._gather is not None or self.empty:
            return
        if self.zero_copy:
            self._bind(self.shard, None)
            return
        pool, streams = self.ctx.pool, self.ctx.streams
        stream = streams.gather
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        n, s, plain = self.geometry.world, self.geometry.shard_numel, self.plain_numel
        with streams.on(stream):
            gather = _Gather(param=pool.acquire("param", self.compute_dtype, self.geometry.full_numel, stream))
            if n == 1:  # the un-sharded layout is the shard's
                gather.param.view(s).copy_(self.shard)
            else:
                send = self.shard[:plain]
                if self.compute_dtype != self.orig_dtype:
                    gather.send = pool.acquire("send", self.compute_dtype, plain, stream)
                    send = gather.send.view(plain).copy_(send)
                if plain:
                    gather.gathered = pool.acquire("gather", self.compute_dtype, n * plain, stream)
                    gather.work = comm.all_gather(gather.gathered.view(n * plain), send, self.groups.shard_group)
                self._issue_quantized(gather)
            self._gather = gather
            if streams.cuda:
                self._complete_gather(gather)
                gather.ready = torch.cuda.Event()
                gather.ready.record(stream)

    def _issue_quantized(self, gather: _Gather) -> None:
        """Row-split parameters: all-gather every rank's payload. Whole ones: the owner's payload,
        broadcast (the others receive into buffers shaped by the probe)."""
        n, rank, group = self.geometry.world, self.groups.shard_rank, self.groups.shard_group
        for i, (slot, q) in enumerate(zip(self.geometry.slots, self.quantized)):
            if not q:
                continue
            outs, works = [], []
            if slot.owner is None:
                # the padded local chunk: (rows, *shape[1:]) including zero padding rows
                padded = self.shard[slot.offset : slot.offset + slot.chunk_numel].view(slot.rows, *slot.shape[1:])
                payload = self.gather_recipe.gather_payload(padded)
                for t in payload.tensors:
                    t = t.contiguous()
                    out = torch.empty((n * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
                    works.append(comm.all_gather(out.view(-1), t.view(-1), group))
                    outs.append(out)
                metadata = payload.metadata
            else:
                spec = self._payload_specs[i]
                if rank == slot.owner:
                    weight = self.shard[slot.offset : slot.offset + slot.numel].view(slot.shape)
                    outs = [t.contiguous() for t in self.gather_recipe.gather_payload(weight).tensors]
                else:
                    outs = [torch.empty(shape, dtype=dtype, device=self.groups.device) for shape, dtype in spec.tensors]
                works = [comm.broadcast(t, slot.owner, group) for t in outs]
                metadata = spec.metadata
            gather.quantized.append((i, outs, metadata, works))

    def _complete_gather(self, gather: _Gather) -> None:
        """Wait for the collectives and copy each parameter out of the gathered buffer."""
        n, plain = self.geometry.world, self.plain_numel
        pool, stream = self.ctx.pool, self.ctx.streams.gather
        param = gather.param.view(self.geometry.full_numel)
        if gather.work is not None:
            assert gather.gathered is not None
            gather.work.wait()
            dsts = self._cached(gather.param, "unpack_dst", lambda: self._unpack_dsts(param))
            srcs = self._cached(gather.gathered, "unpack_src", lambda: self._unpack_srcs(gather.gathered, n, plain))
            torch._foreach_copy_(dsts, srcs)
            pool.release(gather.gathered, stream)
            gather.gathered = None
        if gather.send is not None:
            pool.release(gather.send, stream)
            gather.send = None
        for i, outs, metadata, works in gather.quantized:
            for w in works:
                w.wait()
            slot = self.geometry.slots[i]
            full = self.gather_recipe.unpack(tuple(outs), metadata)
            if type(full) is not torch.Tensor or full.shape[0] < slot.shape[0]:
                raise ValueError(
                    f"fully_shard({self.label}): precision recipe unpack returned {type(full).__name__} of shape "
                    f"{tuple(full.shape)}; allowed: a plain tensor of at least {slot.shape[0]} rows"
                )
            start = slot.full_offset
            param[start : start + slot.numel].view(slot.shape).copy_(full[: slot.shape[0]])
        gather.quantized = []
        gather.work = None

    def _cached(self, lease: Lease | None, purpose: str, make: Any) -> Any:
        """Views of a pooled buffer (or, without one, of this unit's own buffers) made once."""
        views = lease.views if lease is not None else self._own_views
        key = (self, purpose)
        if key not in views:
            views[key] = make()
        return views[key]

    def _unpack_dsts(self, param: torch.Tensor) -> list[torch.Tensor]:
        """Where each plainly gathered parameter goes in the un-sharded buffer."""
        n, out = self.geometry.world, []
        for slot, q in zip(self.geometry.slots, self.quantized):
            if not q:
                dst = param[slot.full_offset : slot.full_offset + slot.full_numel(n)]
                out.append(dst if slot.whole else dst.view(n, slot.chunk_numel))  # (N, chunk): rank-major rows
        return out

    def _unpack_srcs(self, gathered: Lease, n: int, plain: int) -> list[torch.Tensor]:
        """Each plainly gathered parameter's place in the ``(N, S_plain)`` gathered buffer."""
        rows = gathered.view(n * plain).view(n, plain)  # row r: rank r's shard
        return [
            rows[slot.owner, slot.offset : slot.offset + slot.numel]
            if slot.owner is not None
            else rows[:, slot.offset : slot.offset + slot.chunk_numel]
            for slot, q in zip(self.geometry.slots, self.quantized)
            if not q
        ]

    def wait_unshard(self) -> None:
        gather = self._gather
        if gather is None:
            return
        self._gather = None
        if gather.ready is not None:
            torch.cuda.current_stream().wait_event(gather.ready)
        else:
            self._complete_gather(gather)
        self._bind(gather.param.view(self.geometry.full_numel), gather.param)

    def _bind(self, full: torch.Tensor, lease: Lease | None) -> None:
        views = self._cached(
            lease,
            "bind",
            lambda: [full[sl.full_offset : sl.full_offset + sl.numel].view(sl.shape) for sl in self.geometry.slots],
        )
        for view, p in zip(views, self.unsharded):
            p.data = view
        self._param_lease = lease
        if lease is not None:
            self.ctx.lent[lease.tensor.untyped_storage().data_ptr()] = self
        self._register(self.unsharded)
        self.state = State.UNSHARDED

    def unsharded_base(self) -> torch.Tensor:
        """The pooled base buffer currently holding this unit's parameters (for saved tensors)."""
        assert self._param_lease is not None and self.state is State.UNSHARDED, (
            f"unit {self.label} is not gathered while backward needs its parameters"
        )
        return self._param_lease.tensor

    def reshard(self) -> None:
        if self._gather is not None:  # a prefetch nobody used: finish it so buffers return
            self.wait_unshard()
        if self.state is State.SHARDED:
            return
        self._register(self.sharded)
        lease = self._param_lease
        if lease is not None:
            self.ctx.lent.pop(lease.tensor.untyped_storage().data_ptr(), None)
            self.ctx.pool.release(lease, self.ctx.streams.current())
            self._param_lease = None
        self.state = State.SHARDED

    # -- backward -------------------------------------------------------------------------------
    def _on_grad_ready(self, _param: torch.Tensor) -> None:
        self._ready += 1
        if self._ready == self.expected_grads and self.initialised:
            self.ctx.post_backward(self)

    def post_backward(self) -> None:
        if self.bw_done:
            return
        self.bw_done = True
        if self.requires_grad_sync:
            self.reduce_grads()
        if self.reshard_after_backward:
            self.reshard()

    def reset_backward(self) -> None:
        self._ready = 0
        self.bw_done = False

    @property
    def divisor(self) -> float:
        return float(self.divide_factor) if self.divide_factor is not None else float(self.groups.dp_size)

    def reduce_grads(self) -> None:
        """Reduce-scatter the un-sharded grads (asynchronously) and drop them.

        When nothing is accumulated (every parameter has a gradient, none holds one yet, the
        reduction dtype is the shard's), the reduce-scatter writes straight into ``grad_flat``
        (no copy of the result); on NCCL the division by the data-parallel size is fused into
        it (``PREMUL_SUM``)."""
        maybe = [p.grad for p in self.unsharded]
        has_grad = [g is not None for g in maybe]
        if not any(has_grad):
            return
        ctx = self.ctx
        if self.zero_copy and self.groups.replicate_group is None and self.divisor == 1.0:
            self._attach_direct(maybe)
            return
        n, s = self.geometry.world, self.geometry.shard_numel
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(maybe, self.unsharded)]
        in_place = self.reduce_dtype == self.orig_dtype and all(has_grad) and all(p.grad is None for p in self.sharded)
        stream = ctx.streams.reduce
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with ctx.streams.on(stream):
            flat = None
            if in_place:
                self._grad_views()
                flat = self.grad_flat
                assert flat is not None
            pending = _Reduce(self, None, None, None, has_grad, in_place)
            if flat is not None and n == 1:  # nothing to reduce over shards: the grads go straight into grad_flat
                self._copy_in(grads, flat)
            else:
                pending.rs_in = ctx.pool.acquire("rs_in", self.reduce_dtype, n * s, stream)
                self._copy_in(grads, pending.rs_in)
                if n > 1:
                    if flat is not None:
                        out = flat
                    else:
                        pending.rs_out = ctx.pool.acquire("rs_out", self.reduce_dtype, s, stream)
                        out = pending.rs_out.view(s)
                    pending.scaled = self.divisor != 1.0 and comm.fuses_scaling(self.groups.shard_group)
                    scale = 1.0 / self.divisor if pending.scaled else None
                    pending.work = comm.reduce_scatter(out, pending.rs_in.view(n * s), self.groups.shard_group, scale)
            self._drop_unsharded_grads(grads, stream)
            if ctx.streams.cuda:
                self.finish_reduce(pending)  # queued on the reduce stream; the CPU does not block
            else:
                ctx.pending.append(pending)

    def _copy_in(self, grads: list[torch.Tensor], out: Lease | torch.Tensor) -> None:
        """Lay the full gradients out as the ``(N, S)`` reduce-scatter input (row r: rank r's
        shard), casting to its dtype; padding is zero. ``out``: a pooled buffer, or this unit's
        ``grad_flat`` viewed as ``(1, S)``. One ``_foreach_copy_`` over views made once per
        buffer (``torch._chunk_cat`` would be one kernel, but on CUDA it stages its metadata
        through pinned host memory at a cost of ~0.4 ms of CPU a call)."""
        n, s = self.geometry.world, self.geometry.shard_numel
        lease = out if isinstance(out, Lease) else None
        plan = self._cached(lease, "scatter", lambda: self._scatter_plan(out.view(n * s).view(n, s), lease is None))
        srcs = [
            grads[i].reshape(shape) if start == 0 and end == len(grads[i]) else grads[i][start:end].reshape(shape)
            for i, start, end, shape in plan.pieces
        ]
        torch._foreach_copy_(plan.dsts, srcs)
        if plan.pads:
            torch._foreach_zero_(plan.pads)

    def _scatter_plan(self, rows: torch.Tensor, of_grad_flat: bool) -> _ScatterPlan:
        """Per parameter, the rows of its gradient that go to each place of ``rows`` (N, S);
        over ``grad_flat``, the views are aliases (``release_grads`` re-points them)."""
        n = self.geometry.world
        plan = _ScatterPlan([], [], [])
        for i, slot in enumerate(self.geometry.slots):
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
        plan.pads += [rows[rank, start:end] for rank, start, end in self.geometry.whole_padding]
        plan.pads = [p for p in plan.pads if p.numel()]
        if of_grad_flat:
            plan.dsts, plan.pads = [_alias(t) for t in plan.dsts], [_alias(t) for t in plan.pads]
        return plan

    def _drop_unsharded_grads(self, grads: list[torch.Tensor], stream: torch.cuda.Stream | None) -> None:
        if stream is not None:
            for g in grads:
                g.record_stream(stream)  # freed here, still read by the reduce stream
        for p in self.unsharded:
            p.grad = None

    def finish_reduce(self, pending: _Reduce) -> None:
        s = self.geometry.shard_numel
        stream = self.ctx.streams.reduce
        if pending.work is not None:
            pending.work.wait()
        if pending.in_place:
            assert self.grad_flat is not None
            out = self.grad_flat
        else:
            out = (pending.rs_out or pending.rs_in).view(s)  # type: ignore[union-attr]  # one is set
        if self.groups.replicate_group is not None:
            comm.all_reduce_sum(out, self.groups.replicate_group).wait()
        if self.divisor != 1.0 and not pending.scaled:
            out.div_(self.divisor)
        if pending.in_place:
            for p, dt in zip(self.sharded, self._grad_dtensors):
                p.grad = dt
        else:
            self._accumulate(out, pending.has_grad)
        for lease in (pending.rs_in, pending.rs_out):
            if lease is not None:
                self.ctx.pool.release(lease, stream)

    def _grad_views(self) -> list[DTensor]:
        """The sharded gradients: ``Shard(0)`` DTensors over views of ``grad_flat`` (made on
        first use; after ``release_grads`` every view of it is pointed at the new buffer)."""
        if self.grad_flat is None:
            self.grad_flat = torch.empty(self.geometry.shard_numel, dtype=self.orig_dtype, device=self.groups.device)
            storage = self.grad_flat.untyped_storage()
            for view, offset, size, stride in self._released:
                view.set_(storage, offset, size, stride)
            self._released = []
        if not self._grad_dtensors:
            for slot, sharded in zip(self.geometry.slots, self.sharded):
                local = _alias(self._local_view(self.grad_flat, slot))
                self._grad_dtensors.append(
                    DTensor.from_local(
                        local,
                        self.groups.mesh,
                        self.groups.placements,
                        run_check=False,
                        shape=sharded.shape,
                        stride=sharded.stride(),
                    )
                )
        return self._grad_dtensors

    def release_grads(self) -> None:
        """Free ``grad_flat`` when no sharded parameter holds a gradient any more (the optimizer's
        ``zero_grad(set_to_none=True)``), as FSDP2's gradients are freed: between steps, and so
        during the next forward, no memory is held for gradients. The caching allocator hands
        the same memory back at the next reduction."""
        if self.grad_flat is None or any(p.grad is not None for p in self.sharded):
            return
        self.grad_flat = None
        plan = self._own_views.get((self, "scatter"))  # views of grad_flat made by _copy_in
        views = [_local(dt) for dt in self._grad_dtensors] + (plan.dsts + plan.pads if plan is not None else [])
        # a view's ``_base`` (DTensor.from_local may wrap our alias in one) holds the buffer too
        views = list({id(t): t for v in views for t in (v, v._base) if t is not None}.values())
        empty = torch.empty(0, dtype=self.orig_dtype, device=self.groups.device).untyped_storage()
        for view in views:
            self._released.append((view, view.storage_offset(), view.shape, view.stride()))
            view.set_(empty, 0, (0,), (1,))

    def _accumulate(self, out: torch.Tensor, has_grad: list[bool]) -> None:
        """Add the reduced shard ``out`` (S,) into the sharded parameters' ``.grad``."""
        views = self._grad_views()
        rank = self.groups.shard_rank
        for slot, p, dt, has in zip(self.geometry.slots, self.sharded, views, has_grad):
            if not has:
                continue
            src = out[slot.offset : slot.offset + slot.local_numel(rank)]
            if p.grad is None:
                _local(dt).view(-1).copy_(src)
                p.grad = dt
            else:
                _local(p.grad).view(-1).add_(src)

    def _attach_direct(self, grads: list[torch.Tensor | None]) -> None:
        """One rank, same dtype, divisor 1: the un-sharded grad is the sharded grad."""
        for g, p, full in zip(grads, self.sharded, self.unsharded):
            if g is None:
                continue
            if p.grad is None:
                p.grad = DTensor.from_local(
                    g, self.groups.mesh, self.groups.placements, run_check=False, shape=p.shape, stride=p.stride()
                )
            else:
                _local(p.grad).add_(g)
            full.grad = None

    # -- introspection --------------------------------------------------------------------------
    def local_numel(self) -> int:
        return self.shard.numel()
