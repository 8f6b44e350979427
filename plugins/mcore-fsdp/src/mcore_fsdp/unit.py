"""One ``fully_shard`` call's parameters: their sharded storage, gather and gradient reduction.

Storage (per rank): ``shard`` is one flat buffer of ``S`` elements holding this rank's rows
of every parameter (see ``geometry``); each registered parameter is a ``Shard(0)`` DTensor
whose local tensor is a view into it, so the optimizer updates ``shard`` in place.

Un-sharded (compute) parameters are persistent ``nn.Parameter`` objects whose ``.data`` is
pointed at a pooled buffer while the unit is gathered; autograd accumulates their grads, and
the unit reduce-scatters them into ``grad_flat`` (persistent, ``S`` elements) whose views
are the sharded parameters' ``.grad`` DTensors.
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
    """A reduce-scatter in flight."""

    unit: Unit
    work: Any
    rs_in: Lease
    rs_out: Lease
    has_grad: list[bool]


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
        # covers one prefix ``[:S_plain]`` of the flat shard.
        quantized = [self._wants_quantized(e.param, n, rank) for e in entries]
        order = [i for i, q in enumerate(quantized) if not q] + [i for i, q in enumerate(quantized) if q]
        self.entries = [entries[i] for i in order]
        self.quantized = [quantized[i] for i in order]
        self.geometry: Geometry = plan([tuple(e.param.shape) for e in self.entries], n)
        first_q = self.quantized.index(True) if any(self.quantized) else len(self.entries)
        slots = self.geometry.slots
        self.plain_numel = slots[first_q].offset if first_q < len(slots) else self.geometry.shard_numel

        # (S,) this rank's rows of every parameter, padded per parameter
        self.shard = torch.zeros(self.geometry.shard_numel, dtype=self.orig_dtype, device=device)
        self.sharded: list[nn.Parameter] = []
        self.unsharded: list[nn.Parameter] = []
        with torch.no_grad():
            for entry, slot in zip(self.entries, slots):
                rows = slot.local_rows(rank)
                local = self._local_view(self.shard, slot)
                if rows:
                    local.copy_(entry.param.detach()[rank * slot.rows : rank * slot.rows + rows])
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
    @property
    def zero_copy(self) -> bool:
        """One shard, same dtype, no quantized gather: compute views alias the shard itself."""
        return self.groups.shard_size == 1 and self.compute_dtype == self.orig_dtype and not any(self.quantized)

    @property
    def empty(self) -> bool:
        return not self.entries

    def _local_view(self, flat: torch.Tensor, slot: Slot) -> torch.Tensor:
        rows = slot.local_rows(self.groups.shard_rank)
        return flat[slot.offset : slot.offset + rows * slot.row_numel].view(rows, *slot.shape[1:])

    def _wants_quantized(self, param: torch.Tensor, n: int, rank: int) -> bool:
        if self.gather_recipe is None:
            return False
        probe_rows = -(-param.shape[0] // n) if param.dim() else 1
        probe = torch.zeros(probe_rows, *param.shape[1:], dtype=param.dtype, device=self.groups.device)
        return self.gather_recipe.gather_payload(probe) is not None

    def _register(self, params: list[nn.Parameter]) -> None:
        for entry, p in zip(self.entries, params):
            for module, attr in entry.owners:
                module._parameters[attr] = p

    def buffer_needs(self) -> dict[tuple[str, torch.dtype], int]:
        """Largest buffer of each pooled kind this unit borrows (for ``BufferPool.reserve``)."""
        if self.empty or self.zero_copy:
            return {}
        n, s = self.geometry.world, self.geometry.shard_numel
        needs = {("param", self.compute_dtype): n * s, ("rs_in", self.reduce_dtype): n * s}
        if n > 1:
            needs[("gather", self.compute_dtype)] = n * self.plain_numel
            needs[("rs_out", self.reduce_dtype)] = s
            if self.compute_dtype != self.orig_dtype:
                needs[("send", self.compute_dtype)] = self.plain_numel
        return needs

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
            gather = _Gather(param=pool.acquire("param", self.compute_dtype, n * s, stream))
            if n == 1:
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
        n = self.geometry.world
        for i, (slot, q) in enumerate(zip(self.geometry.slots, self.quantized)):
            if not q:
                continue
            # the padded local chunk: (rows, *shape[1:]) including zero padding rows
            padded = self.shard[slot.offset : slot.offset + slot.chunk_numel].view(slot.rows, *slot.shape[1:])
            payload = self.gather_recipe.gather_payload(padded)
            outs, works = [], []
            for t in payload.tensors:
                t = t.contiguous()
                out = torch.empty((n * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
                works.append(comm.all_gather(out.view(-1), t.view(-1), self.groups.shard_group))
                outs.append(out)
            gather.quantized.append((i, outs, payload.metadata, works))

    def _complete_gather(self, gather: _Gather) -> None:
        """Wait for the collectives and copy each parameter out of the gathered buffer."""
        n, s, plain = self.geometry.world, self.geometry.shard_numel, self.plain_numel
        pool, stream = self.ctx.pool, self.ctx.streams.gather
        param = gather.param.view(n * s)
        if gather.work is not None:
            assert gather.gathered is not None
            gather.work.wait()
            plain_slots = [sl for sl, q in zip(self.geometry.slots, self.quantized) if not q]
            outs = [
                param[n * sl.offset : n * (sl.offset + sl.chunk_numel)].view(n, sl.chunk_numel) for sl in plain_slots
            ]
            # (N, S_plain) -> per parameter (N, chunk): rank-major rows of the padded full tensor
            torch.split_with_sizes_copy(
                gather.gathered.view(n * plain).view(n, plain), [sl.chunk_numel for sl in plain_slots], dim=1, out=outs
            )
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
            start = n * slot.offset
            param[start : start + slot.numel].view(slot.shape).copy_(full[: slot.shape[0]])
        gather.quantized = []
        gather.work = None

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
        n = self.geometry.world
        for slot, p in zip(self.geometry.slots, self.unsharded):
            start = n * slot.offset
            p.data = full[start : start + slot.numel].view(slot.shape)
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
        """Reduce-scatter the un-sharded grads (asynchronously) and drop them."""
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
        stream = ctx.streams.reduce
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with ctx.streams.on(stream):
            if n == 1 and self._reduces_in_place(has_grad):
                # nothing to reduce and nothing to accumulate: write the grads straight into grad_flat
                views = self._grad_views()
                assert self.grad_flat is not None
                torch._chunk_cat(grads, 0, 1, out=self.grad_flat.view(1, s))
                self._drop_unsharded_grads(grads, stream)
                for p, dt in zip(self.sharded, views):
                    p.grad = dt
                return
            rs_in = ctx.pool.acquire("rs_in", self.reduce_dtype, n * s, stream)
            # each grad (d0, ...) -> N chunks of ceil(d0/N) rows, padded: (N, S) rank-major
            torch._chunk_cat(grads, 0, n, out=rs_in.view(n * s).view(n, s))
            self._drop_unsharded_grads(grads, stream)
            if n > 1:
                rs_out = ctx.pool.acquire("rs_out", self.reduce_dtype, s, stream)
                work = comm.reduce_scatter_sum(rs_out.view(s), rs_in.view(n * s), self.groups.shard_group)
            else:
                rs_out, work = rs_in, None
            pending = _Reduce(self, work, rs_in, rs_out, has_grad)
            if ctx.streams.cuda:
                self.finish_reduce(pending)  # queued on the reduce stream; the CPU does not block
            else:
                ctx.pending.append(pending)

    def _reduces_in_place(self, has_grad: list[bool]) -> bool:
        return (
            self.groups.replicate_group is None
            and self.divisor == 1.0
            and self.reduce_dtype == self.orig_dtype
            and all(has_grad)
            and all(p.grad is None for p in self.sharded)
        )

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
        out = pending.rs_out.view(s)
        if self.groups.replicate_group is not None:
            comm.all_reduce_sum(out, self.groups.replicate_group).wait()
        if self.divisor != 1.0:
            out.div_(self.divisor)
        self._accumulate(out, pending.has_grad)
        self.ctx.pool.release(pending.rs_in, stream)
        if pending.rs_out is not pending.rs_in:
            self.ctx.pool.release(pending.rs_out, stream)

    def _grad_views(self) -> list[DTensor]:
        if self.grad_flat is None:
            self.grad_flat = torch.zeros(self.geometry.shard_numel, dtype=self.orig_dtype, device=self.groups.device)
            for slot, sharded in zip(self.geometry.slots, self.sharded):
                local = self._local_view(self.grad_flat, slot)
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

    def _accumulate(self, out: torch.Tensor, has_grad: list[bool]) -> None:
        """Add the reduced shard ``out`` (S,) into the sharded parameters' ``.grad``."""
        views = self._grad_views()
        rank = self.groups.shard_rank
        assert self.grad_flat is not None
        if all(has_grad) and all(p.grad is None for p in self.sharded):
            self.grad_flat.copy_(out)
            for p, dt in zip(self.sharded, views):
                p.grad = dt
            return
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
