"""Where a unit's parameters live: the flat shard, its slots, and the sharded/un-sharded views.

Per rank, ``shard`` is one flat buffer of ``S`` elements holding this rank's rows of every
parameter of a unit (see ``geometry``: rows split over the ranks, or the whole parameter on
one of them). Each registered sharded parameter is a ``Shard(0)`` DTensor whose local tensor
is a view into it (all rows or none for a whole parameter: a row-ragged DTensor, see
``mcore.ragged``), so the optimizer updates ``shard`` in place. The un-sharded (compute)
parameters are persistent ``nn.Parameter`` objects whose ``.data`` is pointed at a gathered
buffer while the unit is gathered. This module builds both and knows nothing of collectives
or gradients (``collectives``, ``gradients``).

A parameter that is already a DTensor of another layout (``tp``) is held by its tp-local tensor:
its rows are what the shard stores, and ``tp_params.ParamLayout`` says how its sharded and
un-sharded parameters are described (a DTensor over the combined mesh, and over tp's).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mcore.precision.quantized import QuantizedWeight
from mcore_fsdp.geometry import Geometry, Slot, plan
from mcore_fsdp.groups import MeshGroups
from mcore_fsdp.tp_params import ParamLayout, describe_params, local_tensor

if TYPE_CHECKING:
    from mcore_fsdp.comm import Streams
    from mcore_fsdp.pool import BufferPool, Lease


class State(Enum):
    SHARDED = "sharded"
    UNSHARDED = "unsharded"


@dataclass(frozen=True, slots=True)
class ParamEntry:
    """A parameter to shard and every (module, attribute) that holds it (tied weights)."""

    name: str
    param: nn.Parameter
    owners: tuple[tuple[nn.Module, str], ...]


@dataclass(frozen=True, slots=True)
class PayloadSpec:
    """The payload a precision recipe gathers for a parameter: tensor shapes/dtypes, metadata, and
    whether ``unpack`` answers a ``QuantizedWeight`` (``attached``: it needs no room in the
    un-sharded buffer) rather than a tensor copied into that buffer."""

    tensors: list[tuple[torch.Size, torch.dtype]]
    metadata: Any
    attached: bool = False


class UnitContext(Protocol):
    """What a unit needs from the root's shared context (``runtime.Context`` provides it)."""

    pool: BufferPool
    streams: Streams
    lent: dict[int, Any]
    pending: deque[Any]

    def post_backward(self, unit: Any) -> None: ...


def alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor over ``t``'s memory that is not a view of it (no ``_base``): pointing it at
    other memory later (``set_``) lets the old buffer be freed."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), t.shape, t.stride()
    )


def local_of(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (a view of our flat buffers), without autograd."""
    return cast(DTensor, t)._local_tensor


def local_view(flat: torch.Tensor, slot: Slot, rank: int) -> torch.Tensor:
    """``rank``'s rows of ``slot``'s parameter in a flat ``(S,)`` buffer, shaped ``(rows, *shape[1:])``."""
    rows = slot.local_rows(rank)
    return flat[slot.offset : slot.offset + rows * slot.row_numel].view(rows, *slot.shape[1:])


#: What a precision recipe is told about the parameter it is asked to gather: (name in the model, declared spec).
ParamInfo = tuple[str, Any]


def payload_kwargs(recipe: Any, info: ParamInfo) -> dict[str, Any]:
    """The keywords ``recipe.gather_payload`` is asked with for one parameter: its name and declared
    ``ParamSpec`` (its role: a recipe keeps embedding, head and router in high precision), or none
    for a recipe whose method takes neither. Worked out once per parameter, not per gather."""
    import inspect

    try:
        params = inspect.signature(recipe.gather_payload).parameters
    except (TypeError, ValueError):
        return {}
    takes = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) or (
        "name" in params and "spec" in params
    )
    return {"name": info[0], "spec": info[1]} if takes else {}


def probe_payload(
    recipe: Any, param: torch.Tensor, n: int, whole: bool, device: torch.device, kwargs: dict[str, Any]
) -> PayloadSpec | None:
    """Whether ``recipe`` gathers ``param`` in its own format, probed on zeros of the shape it
    will see (the padded local rows, or the whole parameter when kept whole). A whole parameter
    is first asked about on the meta device: a recipe that gathers it as is (the answer depends
    on shape and dtype only) then costs no full-size tensor on every rank."""
    if recipe is None:
        return None
    probe_rows = param.shape[0] if whole else -(-param.shape[0] // n)
    if whole and recipe.gather_payload(torch.empty(param.shape, dtype=param.dtype, device="meta"), **kwargs) is None:
        return None
    probe = torch.zeros(probe_rows, *param.shape[1:], dtype=param.dtype, device=device)
    payload = recipe.gather_payload(probe, **kwargs)
    if payload is None:
        return None
    # what ``unpack`` makes of the gathered probe (N copies along dim 0 for a row-split parameter): a
    # QuantizedWeight goes to the recipe's GEMM and takes no room in the un-sharded buffer
    copies = 1 if whole else n
    gathered = tuple(t.expand(copies, *t.shape).reshape(copies * t.shape[0], *t.shape[1:]) for t in payload.tensors)
    attached = isinstance(recipe.unpack(gathered, payload.metadata), QuantizedWeight)
    return PayloadSpec([(t.shape, t.dtype) for t in payload.tensors], payload.metadata, attached)


class Storage:
    """A unit's flat shard, its layout (``geometry``), and its sharded and un-sharded parameters.

    Parameters the recipe gathers in its own format go last, so the plain all-gather covers
    one prefix ``[:plain_numel]``; within each group row-split parameters come first, then
    whole ones, largest first (the order their owners are chosen in).
    """

    def __init__(
        self,
        *,
        label: str,
        entries: list[ParamEntry],
        groups: MeshGroups,
        compute_dtype: Callable[[torch.dtype], torch.dtype],
        gather_recipe: Any,
        keep_whole: list[bool] | None,
        on_grad: Callable[[], Callable[[torch.Tensor], None]],
        describe: Callable[[ParamEntry], ParamInfo] | None = None,
    ) -> None:
        self.label = label
        self.groups = groups
        self.gather_recipe = gather_recipe
        dtypes = {e.param.dtype for e in entries}
        if len(dtypes) > 1:
            raise ValueError(
                f"fully_shard({label}): parameters have dtypes {sorted(map(str, dtypes))}; allowed: one dtype per "
                "fully_shard call (shard modules of different dtypes separately)"
            )
        device = groups.device
        self.orig_dtype = dtypes.pop() if dtypes else torch.float32
        self.compute_dtype = compute_dtype(self.orig_dtype)
        n = groups.shard_size

        whole = [bool(keep_whole and keep_whole[i]) for i in range(len(entries))]
        asks = [
            payload_kwargs(gather_recipe, describe(e) if describe is not None else (e.name, None))
            if gather_recipe is not None
            else {}
            for e in entries
        ]
        probes = [
            probe_payload(gather_recipe, local_tensor(e.param), n, whole[i], device, asks[i])
            for i, e in enumerate(entries)
        ]
        quantized = [probe is not None for probe in probes]
        order = sorted(
            range(len(entries)),
            key=lambda i: (quantized[i], whole[i], -entries[i].param.numel() if whole[i] else 0, i),
        )
        ordered = [entries[i] for i in order]
        #: every (module, attribute) holding each parameter: where sharded/un-sharded ones are registered
        self.owners = [e.owners for e in ordered]
        self.quantized = [quantized[i] for i in order]
        #: per slot: the keywords (name, spec) the recipe is asked with when gathering the parameter
        self.payload_asks: list[dict[str, Any]] = [asks[i] for i in order]
        #: per quantized slot: the payload's (shape, dtype)s and metadata for the whole parameter
        #: (what a rank that does not own a whole parameter allocates to receive it)
        self.payload_specs: dict[int, PayloadSpec] = {
            j: probe for j, i in enumerate(order) if (probe := probes[i]) is not None
        }
        #: per slot: how the parameter is described sharded and un-sharded (``tp_params``)
        self.layouts: list[ParamLayout] = describe_params([e.name for e in ordered], [e.param for e in ordered], groups)
        #: per slot: gathered into the un-sharded buffer (false: the recipe's ``unpack`` answers a
        #: ``QuantizedWeight``, attached to the parameter; one rank gathers nothing quantised)
        attached = [probe is not None and probe.attached for probe in probes]
        self.buffered = [not (n > 1 and attached[i]) for i in order]
        self.geometry: Geometry = plan(
            [lay.local_shape for lay in self.layouts],
            n,
            whole=[whole[i] for i in order],
            groups=[int(q) for q in self.quantized],
            buffered=self.buffered,
        )
        self.plain_numel = self.geometry.plain_numel
        #: what an un-sharded parameter gathered as a ``QuantizedWeight`` points at: one NaN, broadcast to
        #: its shape (its gradient still needs a tensor of that shape; a read of its values shows as NaN)
        fill = float("nan") if self.compute_dtype.is_floating_point else 0
        self.absent = torch.full((1,), fill, dtype=self.compute_dtype, device=device)
        # (S,) this rank's rows of every parameter, padded per parameter; zeros, so padding is
        # zero (a quantized gather reads the padded rows)
        self.shard = torch.zeros(self.geometry.shard_numel, dtype=self.orig_dtype, device=device)
        self.sharded, self.unsharded = self._build_params(ordered, on_grad)
        #: views of ``shard`` and of the gradient buffer made once (see ``cached``)
        self.own_views: dict[Any, Any] = {}

    def _build_params(
        self, ordered: list[ParamEntry], on_grad: Callable[[], Callable[[torch.Tensor], None]]
    ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Copy each parameter's rows into ``shard`` and make its sharded (DTensor over a view of
        ``shard``) and un-sharded (empty until gathered) ``nn.Parameter``. A parameter on the meta
        device is not read: its rows are left for its initialisation (``mcore.construct``), so no
        rank ever holds it whole. ``on_grad()`` makes each un-sharded parameter's
        post-accumulate-grad hook."""
        groups = self.groups
        rank, device = groups.shard_rank, groups.device
        sharded: list[nn.Parameter] = []
        unsharded: list[nn.Parameter] = []
        with torch.no_grad():
            for entry, slot, layout in zip(ordered, self.geometry.slots, self.layouts):
                rows, start = slot.local_rows(rank), slot.row_start(rank)
                layout.check_rows(rows, start)
                local = local_view(self.shard, slot, rank)
                source = local_tensor(entry.param)  # a tp DTensor's local tensor: what fsdp splits
                if rows and not source.is_meta:
                    local.copy_(source.detach()[start : start + rows])
                sharded.append(nn.Parameter(layout.sharded(local), requires_grad=entry.param.requires_grad))
                full = layout.compute_param(self.compute_dtype, device, entry.param.requires_grad)
                if full.requires_grad:
                    full.register_post_accumulate_grad_hook(on_grad())
                unsharded.append(full)
        return sharded, unsharded

    @property
    def empty(self) -> bool:
        return not self.owners

    @functools.cached_property
    def zero_copy(self) -> bool:
        """One shard, same dtype, no quantized gather: compute views alias the shard itself."""
        return self.groups.shard_size == 1 and self.compute_dtype == self.orig_dtype and not any(self.quantized)

    def local_view(self, flat: torch.Tensor, slot: Slot) -> torch.Tensor:
        return local_view(flat, slot, self.groups.shard_rank)

    def register(self, params: list[nn.Parameter]) -> None:
        """Make ``params`` (the sharded or the un-sharded ones) what every owner module holds."""
        for owners, p in zip(self.owners, params):
            for module, attr in owners:
                module._parameters[attr] = p

    def cached(self, lease: Lease | None, purpose: str, make: Callable[[], Any]) -> Any:
        """Views of a pooled buffer (or, without one, of this unit's own buffers) made once."""
        views = lease.views if lease is not None else self.own_views
        key = (self, purpose)
        if key not in views:
            views[key] = make()
        return views[key]

    def bind(self, full: torch.Tensor, lease: Lease | None) -> None:
        """Point the un-sharded parameters at ``full`` (the un-sharded buffer), those that take no room in
        it at ``absent``, and register them."""
        slots = self.geometry.slots

        def views_of() -> list[torch.Tensor]:
            return [
                full[sl.full_offset : sl.full_offset + sl.numel].view(sl.shape)
                if sl.buffered
                else self.absent.expand(sl.shape)
                for sl in slots
            ]

        views = self.cached(lease, "bind", views_of)
        for view, p, layout in zip(views, self.unsharded, self.layouts):
            layout.bind(p, view)
        self.register(self.unsharded)
