"""What runs around forward and backward: gathers, prefetch, resharding, reductions.

One ``Context`` per root module (the outermost ``fully_shard``-ed module that runs forward),
created lazily on its first forward and shared by every unit below it; nothing is global.

* Forward: a unit's pre-hook waits for its gather and issues the gathers of the next
  ``prefetch`` units (in the order recorded in the previous step); its post-hook reshards it
  and hooks its outputs for backward.
* Backward: the first gradient reaching a unit's outputs gathers it again and prefetches the
  units before it; when all its parameters' grads are accumulated the unit reduce-scatters
  them (asynchronously) and reshards. A callback at the end of backward waits for the
  remaining reductions.
* Saved tensors: a tensor that autograd saves and that lives in a pooled buffer is saved as
  (unit, offset, shape, stride) and rebuilt from the unit's buffer when backward needs it, so
  a buffer can serve another unit between forward and backward. A DTensor (a tp parameter's
  view, e.g. the transposed weight a matmul saves) is saved the same way by its local tensor,
  with its spec, and rebuilt around the unit's buffer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten, tree_map

from mcore_fsdp.comm import Streams
from mcore_fsdp.gradients import PendingReduce
from mcore_fsdp.pool import BufferPool
from mcore_fsdp.storage import State
from mcore_fsdp.unit import Unit

if TYPE_CHECKING:
    from torch import nn

#: Reductions in flight at once on CPU before the oldest is waited for.
MAX_PENDING_REDUCES = 2


@dataclass(frozen=True, slots=True)
class _SavedRef:
    """A saved tensor that lives in a unit's pooled buffer: where to find it again."""

    unit: Unit
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class _SavedDTensorRef:
    """A saved DTensor whose local tensor lives in a unit's pooled buffer: that tensor's ref and the spec."""

    local: _SavedRef
    spec: Any  # torch's DTensorSpec: mesh, placements, global shape and stride


def in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class Context:
    """Shared state of one root and its units: pool, streams, order, pending reductions."""

    def __init__(self, units: list[Unit], device: torch.device, prefetch: int) -> None:
        self.units = [u for u in units if not u.empty]
        self.pool = BufferPool(device)
        self.streams = Streams.for_device(device)
        self.prefetch = prefetch
        self.order: list[Unit] = []
        self.previous_order: list[Unit] = []
        self.lent: dict[int, Unit] = {}
        self.pending: deque[PendingReduce] = deque()
        self.callback_queued = False
        self._saved_hooks: Any = None
        for unit in units:
            unit.ctx = self
        self.needs_saved_hooks = any(u.reshard_after_forward and not u.zero_copy for u in self.units)

    # -- forward ------------------------------------------------------------------------------
    def root_pre_forward(self) -> None:
        for unit in self.units:
            unit.release_grads()
        if self.order:
            self.previous_order, self.order = self.order, []
        if self.needs_saved_hooks and torch.is_grad_enabled() and self._saved_hooks is None:
            self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._saved_hooks.__enter__()

    def root_post_forward(self) -> None:
        if self._saved_hooks is not None:
            self._saved_hooks.__exit__(None, None, None)
            self._saved_hooks = None

    def record(self, unit: Unit) -> None:
        self.order.append(unit)

    def prefetch_forward(self, unit: Unit, explicit: list[Unit] | None) -> None:
        if explicit is not None:
            targets = explicit
        else:
            i = len(self.order) - 1
            prev = self.previous_order
            if i >= len(prev) or prev[i] is not unit:
                return
            targets = prev[i + 1 : i + 1 + self.prefetch]
        for nxt in targets:
            nxt.start_unshard()

    def prefetch_backward(self, unit: Unit, explicit: list[Unit] | None) -> None:
        if explicit is not None:
            targets = explicit
        else:
            try:
                i = self.order.index(unit)
            except ValueError:
                return
            targets = [self.order[j] for j in range(i - 1, max(i - 1 - self.prefetch, -1), -1)]
        for prev in targets:
            if prev.state is State.SHARDED and not prev.bw_done:
                prev.start_unshard()

    # -- saved tensors ---------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> Any:
        if not self.lent:
            return t
        if type(t) is DTensor:
            local = self._ref(t._local_tensor)
            return t if local is None else _SavedDTensorRef(local, t._spec)
        if type(t) is not torch.Tensor:
            return t
        ref = self._ref(t)
        return t if ref is None else ref

    def _ref(self, t: torch.Tensor) -> _SavedRef | None:
        unit = self.lent.get(t.untyped_storage().data_ptr())
        if unit is None or not unit.reshard_after_forward:
            return None
        return _SavedRef(unit, int(t.storage_offset()), tuple(t.shape), tuple(t.stride()), t.dtype)

    @staticmethod
    def _unpack(saved: Any) -> torch.Tensor:
        if isinstance(saved, _SavedDTensorRef):
            spec = saved.spec
            local = Context._unpack(saved.local)
            return DTensor.from_local(
                local, spec.mesh, spec.placements, run_check=False, shape=spec.shape, stride=spec.stride
            )
        if not isinstance(saved, _SavedRef):
            return saved  # type: ignore[no-any-return]
        base = saved.unit.unsharded_base()
        assert base.dtype == saved.dtype, "saved tensor dtype differs from its unit's buffer"
        return base.as_strided(saved.size, saved.stride, saved.offset)

    # -- backward -------------------------------------------------------------------------------
    def pre_backward(self, unit: Unit, explicit: list[Unit] | None) -> None:
        if not self.callback_queued:
            self.callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finish_backward)
        unit.start_unshard()
        unit.wait_unshard()
        self.prefetch_backward(unit, explicit)

    def post_backward(self, unit: Unit) -> None:
        unit.post_backward()
        while len(self.pending) > MAX_PENDING_REDUCES:
            self.finish_one()

    def finish_one(self) -> None:
        self.pending.popleft().finish()

    def drain(self) -> None:
        while self.pending:
            self.finish_one()
        if self.streams.reduce is not None:
            torch.cuda.current_stream().wait_stream(self.streams.reduce)

    def finish_backward(self) -> None:
        """End of backward: reduce what did not trigger on its own, wait, reshard, reset."""
        for unit in self.units:
            if not unit.bw_done and (unit.state is State.UNSHARDED or any(p.grad is not None for p in unit.unsharded)):
                unit.post_backward()
        self.drain()
        for unit in self.units:
            unit.reset_backward()
        self.callback_queued = False


@dataclass(eq=False)
class ModuleState:
    """What ``fully_shard`` attaches to a module (``module._mcore_fsdp``)."""

    unit: Unit
    prefetch: int
    ctx: Context | None = None
    is_root: bool = False
    forward_prefetch: list[Unit] | None = None
    backward_prefetch: list[Unit] | None = None


def state_of(module: Any) -> ModuleState | None:
    return module.__dict__.get("_mcore_fsdp")


def require_state(module: Any) -> ModuleState:
    state = state_of(module)
    assert state is not None, f"{type(module).__name__} is not fully_shard-ed"
    return state


def lazy_init(root: nn.Module) -> Context:
    """Make ``root`` the root of every not-yet-initialised unit below it."""
    root_state = require_state(root)
    states = [s for m in root.modules() if (s := state_of(m)) is not None and s.ctx is None]
    root_state.is_root = True
    ctx = Context([s.unit for s in states], root_state.unit.groups.device, root_state.prefetch)
    for s in states:
        s.ctx = ctx
    return ctx


def _cast(tree: Any, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return tree
    if type(tree) is torch.Tensor:  # the common output: one tensor
        return tree.to(dtype) if tree.is_floating_point() else tree
    return tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)


def _cast_inputs(args: tuple[Any, ...], kwargs: dict[str, Any], dtype: torch.dtype) -> tuple[Any, Any]:
    """Floating-point tensors among the inputs in ``dtype`` (plain tensor arguments without a walk)."""
    if not kwargs and all(type(a) is torch.Tensor for a in args):
        return tuple(a.to(dtype) if a.is_floating_point() else a for a in args), kwargs
    return _cast((args, kwargs), dtype)


@torch._dynamo.disable
def pre_forward(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    state = require_state(module)
    ctx = state.ctx or lazy_init(module)
    unit = state.unit
    backward = in_backward()
    if state.is_root and not backward:
        ctx.root_pre_forward()
    unit.start_unshard()
    unit.wait_unshard()
    if not backward and not unit.empty:
        ctx.record(unit)
        ctx.prefetch_forward(unit, state.forward_prefetch)
    mp = unit.mp
    if mp.cast_forward_inputs and mp.param_dtype is not None:
        args, kwargs = _cast_inputs(args, kwargs, mp.param_dtype)
    return args, kwargs


@torch._dynamo.disable
def post_forward(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    state = require_state(module)
    ctx, unit = state.ctx, state.unit
    assert ctx is not None
    if in_backward():  # recomputation inside backward (activation checkpointing)
        return output
    if not state.is_root and unit.reshard_after_forward:
        unit.reshard()
    if torch.is_grad_enabled():
        outputs = [output] if type(output) is torch.Tensor else tree_flatten(output)[0]
        tensors = [t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]
        explicit = state.backward_prefetch
        if len(tensors) == 1:  # the usual block: one hidden-states tensor (a plain hook is cheaper)
            tensors[0].register_hook(lambda _grad: ctx.pre_backward(unit, explicit))
        elif tensors:
            torch.autograd.graph.register_multi_grad_hook(
                tensors, lambda _grads: ctx.pre_backward(unit, explicit), mode="any"
            )
    if state.is_root:
        ctx.root_post_forward()
    return _cast(output, unit.mp.output_dtype)
