"""One ``fully_shard`` call's parameters and their state: sharded, being gathered, gathered.

A ``Unit`` ties together the three parts of a sharded module, each in its own module:

* ``storage``: the flat shard, its layout, the sharded (DTensor) and un-sharded parameters;
* ``collectives``: the all-gather of the shard and the reduce-scatter of the gradients;
* ``gradients``: when gradients are reduced, accumulated into the sharded ``.grad`` and freed.

The unit itself is the state machine the runtime drives: ``start_unshard``/``wait_unshard``
gather it (the un-sharded parameters registered on their modules), ``reshard`` gives the
buffer back (the sharded ones registered again), and the post-accumulate-grad hooks count
ready gradients so that the last one hands the unit to the root's context for reduction.
The unit depends on the context only through ``storage.UnitContext``; ``runtime`` imports
the unit, never the other way round.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from mcore.precision import quantized
from mcore_fsdp import collectives
from mcore_fsdp.collectives import Gather
from mcore_fsdp.geometry import Geometry
from mcore_fsdp.gradients import Gradients, PendingReduce
from mcore_fsdp.groups import MeshGroups
from mcore_fsdp.policy import MixedPrecisionPolicy
from mcore_fsdp.pool import Lease
from mcore_fsdp.storage import ParamEntry, ParamInfo, State, Storage, UnitContext

__all__ = ["ParamEntry", "State", "Unit"]


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
        describe: Callable[[ParamEntry], ParamInfo] | None = None,
    ) -> None:
        self.label = label
        self.groups = groups
        self.mp = mp
        self.reshard_after_forward = reshard_after_forward
        self.reshard_after_backward = True
        self.requires_grad_sync = True
        self.divide_factor = divide_factor
        self.gather_recipe = gather_recipe
        self._context: UnitContext | None = None
        self.state = State.SHARDED
        self._gather: Gather | None = None
        self._param_lease: Lease | None = None
        self._ready = 0
        self.bw_done = False
        # a weak reference: the tensor's hook table is invisible to the garbage collector, so
        # a bound method there would keep the whole model alive
        me = weakref.ref(self)
        self.store = Storage(
            label=label,
            entries=entries,
            groups=groups,
            compute_dtype=lambda orig: mp.param_dtype or orig,
            gather_recipe=gather_recipe,
            keep_whole=keep_whole,
            on_grad=lambda: functools.partial(_grad_ready, me),
            describe=describe,
        )
        self.orig_dtype = self.store.orig_dtype
        self.compute_dtype = self.store.compute_dtype
        self.reduce_dtype = mp.reduce_dtype or self.compute_dtype
        self.geometry: Geometry = self.store.geometry
        self.sharded = self.store.sharded
        self.unsharded = self.store.unsharded
        self.expected_grads = sum(p.requires_grad for p in self.unsharded)
        self.store.register(self.sharded)
        self.grads = Gradients(self.store, lambda: self.ctx)

    @property
    def ctx(self) -> UnitContext:
        """The root's shared context (set by lazy init before the first gather)."""
        assert self._context is not None, f"unit {self.label} used before its root's first forward"
        return self._context

    @ctx.setter
    def ctx(self, context: UnitContext) -> None:
        self._context = context

    @property
    def initialised(self) -> bool:
        return self._context is not None

    @property
    def zero_copy(self) -> bool:
        """One shard, same dtype, no quantized gather: compute views alias the shard itself."""
        return self.store.zero_copy

    @property
    def empty(self) -> bool:
        return self.store.empty

    # -- gather ---------------------------------------------------------------------------------
    def start_unshard(self) -> None:
        """Issue the all-gather (asynchronous); ``wait_unshard`` makes the result usable."""
        if self.state is State.UNSHARDED or self._gather is not None or self.empty:
            return
        if self.zero_copy:
            self._bind(self.store.shard, None)
            return
        self._gather = collectives.start_gather(self.store, self.ctx)

    def wait_unshard(self) -> None:
        gather = self._gather
        if gather is None:
            return
        self._gather = None
        if gather.ready is not None:
            torch.cuda.current_stream().wait_event(gather.ready)
        else:
            collectives.complete_gather(self.store, self.ctx, gather)
        self._bind(gather.param.view(self.geometry.full_numel), gather.param)

    def _bind(self, full: torch.Tensor, lease: Lease | None) -> None:
        self.store.bind(full, lease)
        self._param_lease = lease
        if lease is not None:
            self.ctx.lent[lease.tensor.untyped_storage().data_ptr()] = self
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
        self.store.register(self.sharded)
        for param, q in zip(self.unsharded, self.store.quantized):
            if q:  # a QuantizedWeight attached at the gather goes with the gathered buffer
                quantized.detach(param)
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
        """Reduce-scatter the un-sharded grads (asynchronously) and drop them (see ``gradients``)."""
        self.grads.reduce(self.divisor, self.reduce_dtype)

    def finish_reduce(self, pending: PendingReduce) -> None:
        pending.finish()

    def release_grads(self) -> None:
        """Free the gradient buffer once the optimizer dropped every sharded grad (see ``gradients``)."""
        self.grads.release()

    @property
    def grad_flat(self) -> torch.Tensor | None:
        """The reduced gradients of this rank's shard (``S`` elements), or ``None`` when released."""
        return self.grads.grad_flat

    @property
    def _grad_dtensors(self) -> list[DTensor]:
        return self.grads.dtensors

    # -- introspection --------------------------------------------------------------------------
    def local_numel(self) -> int:
        return self.store.shard.numel()
