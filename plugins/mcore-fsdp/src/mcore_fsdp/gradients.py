"""A unit's gradients over their lifetime: when they are reduced, accumulated and released.

Autograd accumulates the un-sharded parameters' grads; once a unit's last one is ready it
reduce-scatters them (``collectives``) into ``grad_flat`` (``S`` elements), whose views are
the sharded parameters' ``.grad`` DTensors. A reduction either writes straight into
``grad_flat`` (nothing accumulated yet, same dtype) or into a pooled buffer that is then
added in (gradient accumulation). Once the optimizer drops the sharded grads
(``zero_grad(set_to_none=True)``), ``release`` frees ``grad_flat`` and the next reduction
takes a new one from the caching allocator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from mcore_fsdp import collectives
from mcore_fsdp.pool import Lease
from mcore_fsdp.storage import Storage, UnitContext, alias, local_of


@dataclass(eq=False)
class PendingReduce:
    """A reduce-scatter in flight (``in_place``: its result is ``grad_flat`` itself);
    ``finish()`` waits for it and hands the result to the sharded parameters."""

    owner: Gradients
    work: Any
    rs_in: Lease | None
    rs_out: Lease | None
    has_grad: list[bool]
    in_place: bool
    divisor: float
    scaled: bool = False  # the division by the divisor happened inside the collective

    def finish(self) -> None:
        self.owner.finish_reduce(self)


class Gradients:
    """The reduced gradients of one unit's sharded parameters (``grad_flat`` and its views)."""

    def __init__(self, store: Storage, ctx: Callable[[], UnitContext]) -> None:
        self.store = store
        self._ctx = ctx
        self.grad_flat: torch.Tensor | None = None
        #: views of a released grad_flat and where they pointed (offset, size, stride)
        self._released: list[tuple[torch.Tensor, int, torch.Size, tuple[int, ...]]] = []
        self.dtensors: list[DTensor] = []

    # -- reduce ---------------------------------------------------------------------------------
    def reduce(self, divisor: float, reduce_dtype: torch.dtype) -> None:
        """Reduce-scatter the un-sharded grads (asynchronously) and drop them.

        When nothing is accumulated (every parameter has a gradient, none holds one yet, the
        reduction dtype is the shard's), the reduce-scatter writes straight into ``grad_flat``
        (no copy of the result); on NCCL the division by the data-parallel size is fused into
        it (``PREMUL_SUM``)."""
        store = self.store
        # a tp parameter's gradient is a DTensor: its tp-local tensor is what is reduced here
        maybe = [None if p.grad is None else lay.local_grad(p.grad) for p, lay in zip(store.unsharded, store.layouts)]
        has_grad = [g is not None for g in maybe]
        if not any(has_grad):
            return
        ctx = self._ctx()
        if store.zero_copy and store.groups.replicate_group is None and divisor == 1.0:
            self._attach_direct(maybe)
            return
        n, s = store.geometry.world, store.geometry.shard_numel
        grads = [
            g if g is not None else torch.zeros(slot.shape, dtype=store.compute_dtype, device=store.groups.device)
            for g, slot in zip(maybe, store.geometry.slots)
        ]
        in_place = reduce_dtype == store.orig_dtype and all(has_grad) and all(p.grad is None for p in store.sharded)
        stream = ctx.streams.reduce
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with ctx.streams.on(stream):
            flat = None
            if in_place:
                self.views()
                flat = self.grad_flat
                assert flat is not None
            pending = PendingReduce(self, None, None, None, has_grad, in_place, divisor)
            if flat is not None and n == 1:  # nothing to reduce over shards: the grads go straight into grad_flat
                collectives.lay_out_grads(store, grads, flat)
            else:
                pending.rs_in = ctx.pool.acquire("rs_in", reduce_dtype, n * s, stream)
                collectives.lay_out_grads(store, grads, pending.rs_in)
                if n > 1:
                    if flat is not None:
                        out = flat
                    else:
                        pending.rs_out = ctx.pool.acquire("rs_out", reduce_dtype, s, stream)
                        out = pending.rs_out.view(s)
                    pending.scaled = divisor != 1.0 and collectives.fuses_scaling(store)
                    scale = 1.0 / divisor if pending.scaled else None
                    pending.work = collectives.reduce_scatter(store, out, pending.rs_in, scale)
            self._drop_unsharded_grads(grads, stream)
            if ctx.streams.cuda:
                self.finish_reduce(pending)  # queued on the reduce stream; the CPU does not block
            else:
                ctx.pending.append(pending)

    def _drop_unsharded_grads(self, grads: list[torch.Tensor], stream: torch.cuda.Stream | None) -> None:
        if stream is not None:
            for g in grads:
                g.record_stream(stream)  # freed here, still read by the reduce stream
        for p in self.store.unsharded:
            p.grad = None

    def finish_reduce(self, pending: PendingReduce) -> None:
        store, ctx = self.store, self._ctx()
        s = store.geometry.shard_numel
        stream = ctx.streams.reduce
        if pending.work is not None:
            pending.work.wait()
        if pending.in_place:
            assert self.grad_flat is not None
            out = self.grad_flat
        else:
            out = (pending.rs_out or pending.rs_in).view(s)  # type: ignore[union-attr]  # one is set
        if store.groups.replicate_group is not None:
            collectives.all_reduce_replicas(store, out)
        if pending.divisor != 1.0 and not pending.scaled:
            out.div_(pending.divisor)
        if pending.in_place:
            for p, dt in zip(store.sharded, self.dtensors):
                p.grad = dt
        else:
            self._accumulate(out, pending.has_grad)
        for lease in (pending.rs_in, pending.rs_out):
            if lease is not None:
                ctx.pool.release(lease, stream)

    # -- the sharded gradients ---------------------------------------------------------------------
    def views(self) -> list[DTensor]:
        """The sharded gradients: ``Shard(0)`` DTensors over views of ``grad_flat`` (made on
        first use; after ``release`` every view of it is pointed at the new buffer)."""
        store = self.store
        if self.grad_flat is None:
            self.grad_flat = torch.empty(store.geometry.shard_numel, dtype=store.orig_dtype, device=store.groups.device)
            storage = self.grad_flat.untyped_storage()
            for view, offset, size, stride in self._released:
                view.set_(storage, offset, size, stride)
            self._released = []
        if not self.dtensors:
            for slot, layout in zip(store.geometry.slots, store.layouts):
                self.dtensors.append(layout.sharded(alias(store.local_view(self.grad_flat, slot))))
        return self.dtensors

    def release(self) -> None:
        """Free ``grad_flat`` when no sharded parameter holds a gradient any more (the optimizer's
        ``zero_grad(set_to_none=True)``), as FSDP2's gradients are freed: between steps, and so
        during the next forward, no memory is held for gradients. The caching allocator hands
        the same memory back at the next reduction."""
        store = self.store
        if self.grad_flat is None or any(p.grad is not None for p in store.sharded):
            return
        self.grad_flat = None
        views = [local_of(dt) for dt in self.dtensors] + collectives.scatter_views(store)
        # a view's ``_base`` (DTensor.from_local may wrap our alias in one) holds the buffer too
        views = list({id(t): t for v in views for t in (v, v._base) if t is not None}.values())
        empty = torch.empty(0, dtype=store.orig_dtype, device=store.groups.device).untyped_storage()
        for view in views:
            self._released.append((view, int(view.storage_offset()), view.shape, view.stride()))
            view.set_(empty, 0, (0,), (1,))

    def _accumulate(self, out: torch.Tensor, has_grad: list[bool]) -> None:
        """Add the reduced shard ``out`` (S,) into the sharded parameters' ``.grad``."""
        store = self.store
        views = self.views()
        rank = store.groups.shard_rank
        for slot, p, dt, has in zip(store.geometry.slots, store.sharded, views, has_grad):
            if not has:
                continue
            src = out[slot.offset : slot.offset + slot.local_numel(rank)]
            if p.grad is None:
                local_of(dt).view(-1).copy_(src)
                p.grad = dt
            else:
                local_of(p.grad).view(-1).add_(src)

    def _attach_direct(self, grads: list[torch.Tensor | None]) -> None:
        """One rank, same dtype, divisor 1: the un-sharded grad is the sharded grad."""
        store = self.store
        for g, p, full, layout in zip(grads, store.sharded, store.unsharded, store.layouts):
            if g is None:
                continue
            if p.grad is None:
                p.grad = layout.sharded(g)
            else:
                local_of(p.grad).add_(g)
            full.grad = None
