"""Meta-device construction: give each rank only its own part of every parameter, and initialise it.

Why: a model built whole on every rank needs the whole model's memory on every rank (and the
time to draw every value) before a layout shards it. torchtitan's order avoids both: the model is
built on the meta device, the precision recipe prepares it, recompute wraps it and the layouts
shard it (all still on meta: only shapes, dtypes and placements), and then ``init_params``
allocates, on each rank, only the part that rank holds and fills it. The values come from
``mcore.init_rng``, keyed by (seed, the parameter's canonical name, element index), so every
rank draws exactly the values the whole tensor would hold there: the full weights are the same
for every layout and world size (bit for bit on one device type).

What ``init_params(model, seed=, device=)`` does, in order:

1. names every parameter canonically (``canonical_name``: wrapper segments such as
   ``_checkpoint_wrapped_module.``, ``_orig_mod.``, ``_fsdp_wrapped_module.`` removed; a tied
   parameter once, under its first name), so wrapping changes no value;
2. refuses, before allocating anything, a parameter that it cannot initialise (see below);
3. finds where this rank's part lies in the full tensor (``local_regions``): the whole of a
   plain tensor or a ``Replicate`` DTensor; DTensor's own split of ``Shard(d)`` placements (even
   or uneven, any dims, any mesh) and of FSDP2's ``_StridedShard`` (fsdp over ``tp``'s local rows:
   still one box per rank); the real split of row-ragged ``Shard(0)`` DTensors
   (``mcore.ragged``: one small all-gather per group, so this step is collective);
4. allocates, on ``device``, every parameter and buffer still on the meta device: the local
   tensor only, for a DTensor; parameters keep their identity (ties and references held by
   others stay valid), and parameters that were views of one meta storage stay views of one
   storage (a module's packed layout, such as the MoE experts' ``[gate | up]`` buffer);
5. runs ``reset_parameters(generator)`` of the modules that own an undeclared parameter (the
   nearest module upward from the parameter's owner that has one; its generator is seeded
   from (seed, that module's canonical name)), then fills every parameter that declares
   ``ParamSpec.init`` from its ``Init`` (declared values win);
6. calls ``reset_buffers()`` of every module that owned a buffer on the meta device: it
   recomputes its buffers, which are allocated on ``device`` and uninitialised.

What can be initialised: a parameter that declares ``init`` in ``param_specs()``, in any
layout; one that does not only while it is whole (a plain tensor) and the module whose
``reset_parameters(generator)`` sets it holds no DTensor. Anything else is a one-line
``UserError`` naming the parameter and saying to declare ``init``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from mcore import init_rng
from mcore.errors import UserError
from mcore.observe.memory import available_bytes
from mcore.params import Init, collect_param_specs
from mcore.ragged import row_counts, row_dim

__all__ = [
    "WRAPPER_SEGMENTS",
    "Initialised",
    "Region",
    "canonical_name",
    "init_params",
    "local_regions",
]

#: Module-name segments that wrappers insert (activation checkpointing, ``torch.compile``,
#: FSDP1): not part of a parameter's canonical name.
WRAPPER_SEGMENTS: tuple[str, ...] = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def canonical_name(name: str) -> str:
    """``name`` without wrapper segments: the name that keys a parameter's initial values."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


@dataclass(frozen=True, slots=True)
class Region:
    """Where this rank's part of a parameter lies: the box ``offsets .. offsets + local_shape``
    of the ``full_shape`` tensor (the whole tensor for a plain one)."""

    full_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    local_shape: tuple[int, ...]


@dataclass(slots=True)
class Initialised:
    """What ``init_params`` did: parameters filled from their ``Init``, modules whose
    ``reset_parameters`` ran, modules whose ``reset_buffers`` ran (canonical names)."""

    declared: list[str] = field(default_factory=list)
    reset_modules: list[str] = field(default_factory=list)
    buffer_modules: list[str] = field(default_factory=list)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _strided_box(t: DTensor, at: int) -> bool:
    """Whether ``t``'s placement on mesh dim ``at`` is FSDP2's ``_StridedShard(d, split_factor)`` (fsdp
    over ``tp``'s local rows) whose later mesh dims split dim ``d`` into exactly ``split_factor`` chunks:
    each rank's part is then one box, which torch's ``compute_local_shape_and_global_offset`` finds
    (DCP relies on it too)."""
    placements = tuple(t.placements)
    placement = placements[at]
    if type(placement).__name__ != "_StridedShard":
        return False
    dim = placement.dim  # type: ignore[attr-defined]
    later = [
        t.device_mesh.size(j)
        for j in range(at + 1, len(placements))
        if isinstance(placements[j], Shard) and placements[j].dim == dim  # type: ignore[attr-defined]
    ]
    return int(placement.split_factor) == math.prod(later)  # type: ignore[attr-defined]


def local_regions(params: Mapping[str, torch.Tensor]) -> dict[str, Region]:
    """Each tensor's ``Region`` on this rank, by name.

    Collective when ``params`` holds row-ragged-capable DTensors (``(Shard(0),)``,
    ``(Replicate(), Shard(0))``): every rank of their groups calls it with the same names in the
    same order. Other DTensors must be split as DTensor splits them (``Shard``/``Replicate``
    placements, and FSDP2's ``_StridedShard`` where each rank's part is one box: ``_strided_box``);
    anything else is a ``ValueError`` naming the tensor.
    """
    out: dict[str, Region] = {}
    rowwise = [name for name, t in params.items() if row_dim(t) is not None]
    counts = dict(zip(rowwise, row_counts([params[n] for n in rowwise])))  # type: ignore[misc]
    for name, t in params.items():
        full = tuple(t.shape)
        local = tuple(_local(t).shape)
        if not isinstance(t, DTensor):
            out[name] = Region(full, (0,) * len(full), full)
            continue
        if name in counts:
            dim = row_dim(t)
            assert dim is not None
            rank = t.device_mesh.get_local_rank(dim)
            first = sum(counts[name][:rank])
            out[name] = Region(full, (first,) + (0,) * (len(full) - 1), local)
            continue
        placements = tuple(t.placements)
        bad = [p for i, p in enumerate(placements) if type(p) not in (Shard, Replicate) and not _strided_box(t, i)]
        if bad:
            raise ValueError(
                f"parameter {name!r} has placement {bad[0]!r}; allowed: Shard(dim), Replicate() and FSDP2's "
                "_StridedShard over dims that shard the same tensor dim after it"
            )
        expected, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        if tuple(expected) != local:
            raise ValueError(
                f"parameter {name!r}: local shape {list(local)} is not DTensor's split {list(expected)} of "
                f"{list(full)} over {tuple(t.placements)}; allowed: DTensor's own split, or ragged rows (mcore.ragged)"
            )
        out[name] = Region(full, tuple(offsets), local)
    return out


def _reset_owner(model: nn.Module, name: str) -> tuple[str, nn.Module] | None:
    """The nearest module, from the parameter's owner upward, with ``reset_parameters(generator)``."""
    parts = name.split(".")[:-1]
    for k in range(len(parts), -1, -1):
        path = ".".join(parts[:k])
        module = model.get_submodule(path)
        reset = getattr(module, "reset_parameters", None)
        if callable(reset) and "generator" in inspect.signature(reset).parameters:
            return path, module
    return None


#: The end of every error about a parameter that cannot be initialised.
_DECLARE = "declare init for it in its module's param_specs() (mcore.params.ParamSpec(..., init=Init(...)))"


def _plan_resets(
    model: nn.Module, params: Mapping[str, torch.Tensor], undeclared: Iterable[str]
) -> list[tuple[str, nn.Module]]:
    """The modules whose ``reset_parameters(generator)`` set the undeclared parameters, parents
    first; a ``UserError`` for a parameter that none can set."""
    owners: dict[int, tuple[str, nn.Module]] = {}
    for name in undeclared:
        where = canonical_name(name)
        param = params[name]
        if isinstance(param, DTensor):
            raise UserError(
                f"parameter {where!r} is sharded ({tuple(param.placements)}) and declares no init, so its "
                f"part on each rank cannot be initialised alone; {_DECLARE}"
            )
        found = _reset_owner(model, name)
        if found is None:
            raise UserError(
                f"parameter {where!r} declares no init and no module above it has reset_parameters(generator); "
                f"{_DECLARE}"
            )
        path, module = found
        sharded = next((n for n, p in module.named_parameters() if isinstance(p, DTensor)), None)
        if sharded is not None:
            raise UserError(
                f"parameter {where!r} declares no init, and {type(module).__name__}.reset_parameters "
                f"(at {canonical_name(path) or 'the model'!r}) would also set the sharded {canonical_name(sharded)!r}; "
                f"{_DECLARE}"
            )
        owners.setdefault(id(module), (path, module))
    order = {id(m): i for i, m in enumerate(model.modules())}
    return sorted(owners.values(), key=lambda item: order[id(item[1])])


def _materialize_params(model: nn.Module, device: torch.device) -> None:
    """Every parameter still on meta gets uninitialised storage on ``device`` (a DTensor: its
    local part only), keeping the ``Parameter`` object (ties and outside references hold).
    Parameters that are views of one meta storage (a module's packed weights, e.g. the MoE
    experts' gate and up in one buffer) become views of one storage, at the same offsets and
    strides: the layout the module chose survives."""
    seen: set[int] = set()
    shared: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}  # meta storage -> (it, real one)
    for module in model.modules():
        for p in module._parameters.values():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            local = _local(p)
            if not local.is_meta:
                continue
            empty = _allocate_like(local, device, shared)
            if isinstance(p, DTensor):
                empty = DTensor.from_local(  # type: ignore[assignment]
                    empty, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                )
            torch.utils.swap_tensors(p, nn.Parameter(empty, requires_grad=p.requires_grad))


def _check_fits(model: nn.Module, device: torch.device) -> None:
    """A one-line ``UserError`` when this rank's meta parameters and buffers (each storage once) need more bytes than
    ``device`` has, before anything is allocated (a typo'd ``vocab_size = 10**11`` is a message, not a traceback)."""
    storages: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        local = _local(t)
        if local.is_meta:
            storages[local.untyped_storage()._cdata] = local.untyped_storage().nbytes()
    need, have = sum(storages.values()), available_bytes(device)
    if have is not None and need > have:
        raise UserError(
            f"the model's parameters and buffers need {need / 2**30:,.1f} GiB on each rank ({device}), more than the "
            f"{have / 2**30:,.1f} GiB there; allowed: a smaller model (hidden_size, num_layers, vocab_size) or more "
            "ranks sharding it (parallel.layouts)"
        )


def _allocate_like(
    meta: torch.Tensor, device: torch.device, shared: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]]
) -> torch.Tensor:
    """Uninitialised ``meta`` on ``device``: a tensor of its own when ``meta`` is the whole of its storage,
    else a view, with ``meta``'s offset and strides, of the one real storage standing for its meta
    storage (``shared``, which also keeps the meta storage alive so its address is not reused)."""
    storage = meta.untyped_storage()
    whole = meta.storage_offset() == 0 and storage.nbytes() == meta.numel() * meta.element_size()
    if whole and meta.is_contiguous():
        return torch.empty(meta.shape, dtype=meta.dtype, device=device)
    key = storage._cdata
    if key not in shared:
        shared[key] = (storage, torch.empty(storage.nbytes(), dtype=torch.uint8, device=device).untyped_storage())
    real = shared[key][1]
    return torch.empty(0, dtype=meta.dtype, device=device).set_(real, meta.storage_offset(), meta.shape, meta.stride())


def _materialize_buffers(model: nn.Module, device: torch.device) -> list[tuple[str, nn.Module]]:
    """Buffers still on meta get uninitialised storage on ``device``; returns their modules, each of
    which must recompute them in ``reset_buffers()``."""
    owners = []
    for path, module in model.named_modules():
        metas = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not metas:
            continue
        if not callable(getattr(module, "reset_buffers", None)):
            raise UserError(
                f"buffer {canonical_name(f'{path}.{metas[0]}' if path else metas[0])!r} is on the meta device and "
                f"{type(module).__name__} has no reset_buffers() to compute it; define reset_buffers() in the module"
            )
        for n in metas:
            buf = module._buffers[n]
            assert buf is not None
            module._buffers[n] = torch.empty(buf.shape, dtype=buf.dtype, device=device)
        owners.append((path, module))
    return owners


def _fill(local: torch.Tensor, init: Init, key: int, region: Region) -> None:
    """Fill ``local`` (this rank's part, at ``region``) with the values of ``init`` keyed ``key``."""
    if init.kind in ("zeros", "ones", "constant"):
        local.fill_({"zeros": 0.0, "ones": 1.0}.get(init.kind, init.value or 0.0))
        return
    std, mean = float(init.std or 1.0), float(init.mean or 0.0)  # a normal's std is always given (Init checks)
    if init.kind == "normal":
        fill = functools.partial(init_rng.normal_, key=key, mean=mean, std=std)
    elif init.kind == "trunc_normal":
        a, b = init.bounds
        fill = functools.partial(init_rng.trunc_normal_, key=key, mean=mean, std=std, a=a, b=b)
    else:
        a, b = init.bounds
        fill = functools.partial(init_rng.uniform_, key=key, low=a, high=b)
    target = local if local.is_contiguous() else torch.empty(local.shape, dtype=local.dtype, device=local.device)
    init_rng.fill_box_(target, fill, region.full_shape, region.offsets)
    if target is not local:
        local.copy_(target)


@torch.no_grad()
def init_params(model: nn.Module, *, seed: int, device: torch.device | str) -> Initialised:
    """Allocate this rank's part of every meta parameter and buffer on ``device`` and initialise
    every parameter (see the module docstring). Collective when the model holds DTensors with
    ``Shard(0)`` rows: every rank of the model's groups calls it."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise UserError(f"train.seed = {seed!r}; allowed: an integer in [0, 2**64) for meta-device initialisation")
    device = torch.device(device)
    params = dict(model.named_parameters())  # a tied parameter once, under its first name
    specs = collect_param_specs(model)
    inits = {name: spec.init for name, spec in specs.items() if spec.init is not None}
    resets = _plan_resets(model, params, [name for name in params if name not in inits])
    regions = local_regions({name: params[name] for name in inits})
    _check_fits(model, device)
    _materialize_params(model, device)
    buffer_owners = _materialize_buffers(model, device)
    done = Initialised()
    for path, module in resets:
        where = canonical_name(path)
        generator = torch.Generator().manual_seed(init_rng.key_for(seed, f"reset_parameters:{where}") >> 1)
        module.reset_parameters(generator=generator)  # type: ignore[operator]
        done.reset_modules.append(where)
    for name, init in inits.items():
        where = canonical_name(name)
        _fill(_local(params[name]), init, init_rng.key_for(seed, where), regions[name])
        done.declared.append(where)
    for path, module in buffer_owners:
        module.reset_buffers()  # type: ignore[operator]
        done.buffer_modules.append(canonical_name(path))
    return done
