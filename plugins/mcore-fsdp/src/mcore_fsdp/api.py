"""``fully_shard``: the FSDP2 call, with mcore's own machinery underneath.

Same call shape and semantics as ``torch.distributed.fsdp.fully_shard``: call it on each
block, then on the root; the module's class becomes ``FSDP<Class>`` (also an
``FSDPModule``); its parameters become ``Shard(0)`` DTensors over ``mesh`` (``(Replicate(),
Shard(0))`` on a 2-D HSDP mesh); forward gathers them, backward reduce-scatters the grads.
Parameters that are already DTensors over other dims of the same root mesh (tensor parallel)
are accepted as FSDP2 accepts them: their local tensors are sharded, and they become DTensors
over ``mesh``'s dims and theirs (see ``tp_params``).

Beyond FSDP2: ``keep_whole`` (parameters kept whole on one rank of the shard group instead
of split by rows: Muon orthogonalises whole matrices, block-scaled formats quantize whole
blocks; they are bin-packed over the ranks and appear as row-ragged ``Shard(0)`` DTensors,
see ``mcore.ragged``), ``gradient_divide_factor`` (e.g. for expert parameters),
``gather_recipe`` (a precision recipe whose ``gather_payload``/``unpack`` gather parameters
in a low-precision format) and ``prefetch`` (how many units ahead to gather).

On the meta device: a module whose parameters are on meta is sharded without reading them;
each rank allocates only its own rows on the mesh's device (zeros until they are filled)
and meta buffers stay on meta, for ``mcore.construct.init_params`` to fill (torchtitan's order).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from mcore_fsdp.groups import default_mesh, mesh_groups
from mcore_fsdp.policy import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy
from mcore_fsdp.runtime import Context, ModuleState, lazy_init, post_forward, pre_forward, require_state, state_of
from mcore_fsdp.storage import ParamEntry, State
from mcore_fsdp.unit import Unit

__all__ = ["FSDPModule", "UnshardHandle", "fully_shard"]


class UnshardHandle:
    """Returned by ``unshard(async_op=True)``; ``wait()`` makes the parameters usable."""

    def __init__(self, units: list[Unit]) -> None:
        self._units = units

    def wait(self) -> None:
        for unit in self._units:
            unit.wait_unshard()
        self._units = []


class FSDPModule:
    """Mixed into the class of every ``fully_shard``-ed module (FSDP2's ``FSDPModule`` API)."""

    def _fsdp_states(self, recurse: bool) -> list[ModuleState]:
        modules = self.modules() if recurse else [self]  # type: ignore[attr-defined]  # mixed into an nn.Module
        return [s for m in modules if (s := state_of(m)) is not None]

    def _ensure_init(self) -> Context:
        state = require_state(self)
        return state.ctx if state.ctx is not None else lazy_init(self)  # type: ignore[arg-type]

    def unshard(self, async_op: bool = False) -> UnshardHandle | None:
        """Gather this module's parameters (registered un-sharded until ``reshard``)."""
        self._ensure_init()
        unit = require_state(self).unit
        unit.start_unshard()
        handle = UnshardHandle([unit])
        if async_op:
            return handle
        handle.wait()
        return None

    def reshard(self) -> None:
        self._ensure_init()
        require_state(self).unit.reshard()

    def set_requires_gradient_sync(self, requires_gradient_sync: bool, *, recurse: bool = True) -> None:
        for s in self._fsdp_states(recurse):
            s.unit.requires_grad_sync = requires_gradient_sync

    def set_reshard_after_forward(self, reshard_after_forward: bool, recurse: bool = True) -> None:
        _check_reshard(reshard_after_forward)
        for s in self._fsdp_states(recurse):
            s.unit.reshard_after_forward = bool(reshard_after_forward)
            if s.ctx is not None:
                s.ctx.needs_saved_hooks = any(u.reshard_after_forward and not u.zero_copy for u in s.ctx.units)

    def set_reshard_after_backward(self, reshard_after_backward: bool, *, recurse: bool = True) -> None:
        for s in self._fsdp_states(recurse):
            s.unit.reshard_after_backward = reshard_after_backward

    def set_gradient_divide_factor(self, factor: float) -> None:
        """Divide reduced gradients by ``factor`` instead of the data-parallel size."""
        if not factor > 0:
            raise ValueError(f"set_gradient_divide_factor: factor = {factor!r}; allowed: a positive number")
        for s in self._fsdp_states(True):
            s.unit.divide_factor = float(factor)

    def set_modules_to_forward_prefetch(self, modules: list[FSDPModule]) -> None:
        require_state(self).forward_prefetch = [_unit_of(m) for m in modules]

    def set_modules_to_backward_prefetch(self, modules: list[FSDPModule]) -> None:
        require_state(self).backward_prefetch = [_unit_of(m) for m in modules]

    def fsdp_pool_allocations(self) -> int:
        """Buffers the root's pool has ever allocated (flat after the first step)."""
        return self._ensure_init().pool.allocations


def _unit_of(module: Any) -> Unit:
    state = state_of(module)
    if state is None:
        raise ValueError(f"{type(module).__name__} is not fully_shard-ed; allowed: modules passed to fully_shard")
    return state.unit


def _check_reshard(value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(
            f"fully_shard: reshard_after_forward = {value!r}; allowed: True, False or None "
            "(resharding to a smaller world, FSDP2's int form, is not supported)"
        )


@functools.cache
def _fsdp_class(cls: Any) -> type:
    return type(f"FSDP{cls.__name__}", (FSDPModule, cls), {"__module__": cls.__module__})


def _collect(module: nn.Module, ignored: set[int]) -> list[ParamEntry]:
    """Parameters of ``module`` not already managed by a nested ``fully_shard`` (tied ones once)."""
    managed: set[int] = set()
    for m in module.modules():
        if m is not module and (s := state_of(m)) is not None:
            managed.update(id(p) for p in s.unit.sharded)
            managed.update(id(p) for p in s.unit.unsharded)
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    first: dict[int, tuple[str, nn.Parameter]] = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        for attr, p in m._parameters.items():
            if p is None or id(p) in managed or id(p) in ignored:
                continue
            owners.setdefault(id(p), [])
            if (m, attr) not in owners[id(p)]:
                owners[id(p)].append((m, attr))
            first.setdefault(id(p), (f"{prefix}.{attr}" if prefix else attr, p))
    return [ParamEntry(name=first[k][0], param=first[k][1], owners=tuple(owners[k])) for k in first]


def fully_shard(
    module: nn.Module,
    *,
    mesh: DeviceMesh | None = None,
    reshard_after_forward: bool | None = True,
    shard_placement_fn: Callable[[nn.Parameter], Any] | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
    offload_policy: OffloadPolicy | None = None,
    ignored_params: Iterable[nn.Parameter] | None = None,
    gradient_divide_factor: float | None = None,
    gather_recipe: Any = None,
    prefetch: int = 1,
    keep_whole: bool | Callable[[nn.Parameter], bool] = False,
    describe_param: Callable[[nn.Parameter], tuple[str, Any]] | None = None,
) -> nn.Module:
    """Shard ``module``'s parameters (those not in a nested ``fully_shard``) over ``mesh``.

    ``keep_whole``: ``True`` (every parameter) or a predicate choosing the parameters that
    stay whole on one rank (e.g. ``lambda p: p.ndim >= 2`` for Muon). ``describe_param``: the
    ``(name, ParamSpec or None)`` a ``gather_recipe`` is told for a parameter (its name in the
    whole model and its declared role); without it, the name inside ``module`` and no spec.
    """
    if isinstance(module, (list, tuple)):
        raise ValueError("fully_shard: module is a list; allowed: one nn.Module per call")
    if state_of(module) is not None:
        raise ValueError(f"fully_shard: {type(module).__name__} is already fully_shard-ed; allowed: once per module")
    _check_reshard(reshard_after_forward)
    if offload_policy is not None and isinstance(offload_policy, CPUOffloadPolicy):
        raise ValueError(
            "fully_shard: offload_policy = CPUOffloadPolicy(...); allowed: None or OffloadPolicy() (CPU offload is "
            "not implemented in mcore-fsdp)"
        )
    if prefetch < 0:
        raise ValueError(f"fully_shard: prefetch = {prefetch!r}; allowed: an int >= 0")
    mp = _as_policy(mp_policy)
    mesh = mesh if mesh is not None else default_mesh()
    groups = mesh_groups(mesh)
    entries = _collect(module, {id(p) for p in ignored_params or ()})
    if shard_placement_fn is not None:
        for e in entries:
            placement = shard_placement_fn(e.param)
            if placement is not None and placement != Shard(0):
                raise ValueError(
                    f"fully_shard: shard_placement_fn returned {placement!r} for {e.name}; allowed: None or Shard(0)"
                )
    if not (isinstance(keep_whole, bool) or callable(keep_whole)):
        raise ValueError(
            f"fully_shard: keep_whole = {keep_whole!r}; allowed: True, False or a function of a parameter returning bool"
        )
    whole = [bool(keep_whole(e.param)) if callable(keep_whole) else keep_whole for e in entries]
    for e, w in zip(entries, whole):
        if w and isinstance(e.param, DTensor):
            raise ValueError(
                f"fully_shard: keep_whole chose {e.name}, which is already a DTensor ({list(e.param.placements)}); "
                "allowed: keep_whole for plain parameters only (tensor-parallel parameters are split by rows)"
            )
    for buffer_owner in module.modules():
        for name, buf in buffer_owner._buffers.items():
            if buf is not None and buf.device != groups.device and not buf.is_meta:  # meta: left for init
                buffer_owner._buffers[name] = buf.to(groups.device)
    unit = Unit(
        label=type(module).__name__,
        entries=entries,
        groups=groups,
        mp=mp,
        reshard_after_forward=True if reshard_after_forward is None else reshard_after_forward,
        gather_recipe=gather_recipe,
        divide_factor=gradient_divide_factor,
        keep_whole=whole,
        describe=None if describe_param is None else (lambda entry: describe_param(entry.param)),
    )
    module.__dict__["_mcore_fsdp"] = ModuleState(unit=unit, prefetch=prefetch)
    module.register_forward_pre_hook(pre_forward, prepend=True, with_kwargs=True)
    module.register_forward_hook(post_forward)
    # state dicts always see (and load into) the sharded DTensors, even after a forward
    # without backward left this module gathered
    module.register_state_dict_pre_hook(_reshard_before_state_dict)
    module.register_load_state_dict_pre_hook(_reshard_before_load)
    module.__class__ = _fsdp_class(type(module))  # type: ignore[arg-type]  # classes are hashable
    return module


def _reshard_before_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    require_state(module).unit.reshard()


def _reshard_before_load(module: nn.Module, *args: Any) -> None:
    require_state(module).unit.reshard()


def _as_policy(mp_policy: Any) -> MixedPrecisionPolicy:
    """Accept ours, torch's ``MixedPrecisionPolicy`` or anything with the same fields."""
    if mp_policy is None:
        return MixedPrecisionPolicy()
    if isinstance(mp_policy, MixedPrecisionPolicy):
        return mp_policy
    try:
        return MixedPrecisionPolicy(
            param_dtype=mp_policy.param_dtype,
            reduce_dtype=mp_policy.reduce_dtype,
            output_dtype=mp_policy.output_dtype,
            cast_forward_inputs=mp_policy.cast_forward_inputs,
        )
    except AttributeError as exc:
        raise ValueError(
            f"fully_shard: mp_policy = {mp_policy!r}; allowed: a MixedPrecisionPolicy (param_dtype, reduce_dtype, "
            "output_dtype, cast_forward_inputs)"
        ) from exc


def unsharded_state(module: nn.Module) -> State | None:
    """``State.SHARDED``/``UNSHARDED`` of a ``fully_shard``-ed module (tests and tools)."""
    s = state_of(module)
    return s.unit.state if s is not None else None


def pool_of(module: nn.Module) -> Any:
    """The buffer pool of ``module``'s root context (after its first forward)."""
    s = state_of(module)
    return s.ctx.pool if s is not None and s.ctx is not None else None


@torch.no_grad()
def local_shard_numel(module: nn.Module) -> int:
    """Elements of parameter storage this rank holds for ``module`` and everything below it."""
    return sum(s.unit.local_numel() for m in module.modules() if (s := state_of(m)) is not None)
