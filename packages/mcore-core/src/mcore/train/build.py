"""Compose a run's parts from their names: mesh, model, precision, recompute, layouts, optimizer.

The order is the contract: the model is built, the precision recipe prepares it, recompute
wraps its blocks, ``train.compile`` compiles them (with their recompute), the layouts apply in the order given, the parameters get their values, and
the optimizer is built last for the parallelized model. The data-parallel position is the
product over the layouts' ``data_parallel()`` answers. Each mesh dimension is owned by one
layout; another may work over it too when it names it in ``borrowed_dims`` (``fsdp`` sharding
over ``dp_shard`` x ``cp``). One data-parallel layout at most, listed after the layouts that replace or cut
parameters (``tp``, ``pp``, ``ep``): other orders are refused in one line (``check_order``).

Where the model is built (``builds_on_meta``): on the meta device when the model factory says
its models can be (``supports_meta_init = True``, see ``ModelFactory``) and every layout says
its ``apply`` works on a model on the meta device (class attribute ``supports_meta_init =
True``: ``single``, ``fsdp``, ``hsdp``). Then nothing is allocated until the layouts have
sharded the model, and ``mcore.construct.init_params`` gives each rank only its own part of
every parameter, on the mesh's device, filled from the parameters' declared ``init`` (values
that do not depend on the layouts or the world size). Otherwise the factory builds the whole
model on the mesh's device and initialises it, on every rank, before the recipe and layouts.

Every rank must have resolved the same config (a rank launched with other overrides would
abort in a collective, or train silently on other shapes): right after the process group
starts, the ranks all-gather digests of the resolved config, one per core-section field and
one per other section, and every rank refuses in one line naming the keys that differ
(``check_same_config``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mcore.config import RunConfig
from mcore.config.sections import CORE_SECTIONS, SELECTED_SECTIONS
from mcore.construct import init_params
from mcore.errors import ConfigError, UserError
from mcore.mesh import ParallelMesh, build_mesh
from mcore.protocols.layout import DataParallelInfo
from mcore.train.compile import apply_compile
from mcore.train.recompute import apply_recompute

#: Mesh dimensions that split the data, in the order their ranks nest.
DATA_DIMS = ("dp_replicate", "dp_shard")

#: Mesh dimensions whose layouts replace or cut the model's parameters: listed before any data-parallel
#: layout, which takes the parameters as they are when it applies (``check_order``).
RESHAPING_DIMS = ("tp", "pp", "ep")


@dataclass
class Parts:
    mesh: ParallelMesh
    model: nn.Module
    factory: Any
    precision: Any
    layouts: list[Any]
    optimizer: Any
    dp: DataParallelInfo


def combine_data_parallel(infos: list[DataParallelInfo]) -> DataParallelInfo:
    """Rank and size over all layouts' data-parallel splits (the first layout outermost)."""
    rank, size = 0, 1
    group = None
    for info in infos:
        rank = rank * info.size + info.rank
        size *= info.size
        if info.size > 1:
            group = info.group if group is None else None  # several groups: no single one to name
    return DataParallelInfo(rank=rank, size=size, group=group)


def load_model_factory(config: RunConfig) -> Any:
    try:
        return config.model.implementation.load()
    except ImportError as exc:
        source = config.model.implementation.source
        raise UserError(
            f"model {config.model.name!r} is registered by {source} but fails to import ({exc}); "
            f"reinstall {source.distribution}"
        ) from None


def builds_on_meta(factory: Any, layouts: list[Any]) -> bool:
    """Whether the model is built on the meta device and initialised after the layouts (module docstring)."""
    return getattr(factory, "supports_meta_init", False) is True and all(
        getattr(layout, "supports_meta_init", False) is True for layout in layouts
    )


def build_model(
    config: RunConfig, host: Any, device: torch.device | str, *, factory: Any = None
) -> tuple[nn.Module, Any]:
    factory = factory if factory is not None else load_model_factory(config)
    model = factory.build(
        config.model.config, seed=config.train.seed, device=device, block_lookup=lambda name: host.load("block", name)
    )
    return model, factory


def check_order(names: list[str], owned: list[tuple[str, ...]]) -> None:
    """Refuse layout orders that cannot apply (``owned``: each layout's mesh dims, in ``names``' order).

    One data-parallel layout at most (``hsdp`` is replicate x shard), and it comes after every layout
    that replaces or cuts parameters (``tp``, ``pp``, ``ep``): it shards or buckets them as it finds them.
    """
    data = [i for i, dims in enumerate(owned) if any(d in DATA_DIMS for d in dims)]
    if len(data) > 1:
        both = " and ".join(repr(names[i]) for i in data)
        raise ConfigError(
            f"parallel.layouts = {names}: {both} are both data parallel; allowed: one of them "
            "('hsdp' replicates over dp_replicate and shards over dp_shard)"
        )
    if not data:
        return
    later = [names[i] for i in range(data[0] + 1, len(names)) if any(d in RESHAPING_DIMS for d in owned[i])]
    if later:
        order = (
            [n for n in names[: data[0]] if n not in later] + later + [n for n in names[data[0] :] if n not in later]
        )
        raise ConfigError(
            f"parallel.layouts = {names}: {later[0]!r} is listed after the data-parallel layout {names[data[0]]!r}, "
            f"which must apply last of these; allowed: parallel.layouts = {order}"
        )


def config_digests(values: dict[str, Any]) -> list[tuple[str, int]]:
    """``(key, digest)`` of a resolved config (``RunConfig.to_dict()``): one per field of each core section
    (``train.seq_len``), one per other section; the list's length and order depend on the code only, so ranks
    running the same code compare them position by position."""

    def digest(value: Any) -> int:
        text = json.dumps(value, sort_keys=True, default=str)
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")  # < 2**56: fits an int64

    out: list[tuple[str, int]] = []
    for section in ("schema_version", *SELECTED_SECTIONS):
        out.append((section, digest(values.get(section))))
    for section, cls in CORE_SECTIONS.items():
        table = values.get(section)
        table = table if isinstance(table, dict) else {}
        names = [f.name for f in dataclasses.fields(cls)]
        out.extend((f"{section}.{name}", digest(table.get(name))) for name in names)
        rest = {k: v for k, v in table.items() if k not in names}  # [parallel.<layout>] tables
        out.append((f"[{section}.*] tables", digest(rest)))
    known = {"schema_version", *SELECTED_SECTIONS, *CORE_SECTIONS}
    out.append(("other sections", digest({k: v for k, v in values.items() if k not in known})))
    return out


def check_same_config(config: RunConfig, device: torch.device) -> None:
    """Refuse (``ConfigError`` on every rank) when the ranks did not resolve the same config (module docstring).

    One all-gather of a small int64 tensor over the default process group; nothing on one process.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    named = config_digests(config.to_dict())
    mine = torch.tensor([d for _, d in named], dtype=torch.int64, device=device)  # (K,)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    try:
        dist.all_gather(gathered, mine)
    except RuntimeError as exc:  # a peer that failed before this point: its own message says why
        raise UserError(
            f"rank {dist.get_rank()}: the ranks could not compare their configs (another rank failed or was "
            f"stopped; its own message says why): {' '.join(str(exc).split())[:200]}"
        ) from None
    table = torch.stack(gathered).cpu()  # (world, K)
    differs = (table != table[0]).any(dim=0).tolist()
    keys = [name for (name, _), bad in zip(named, differs) if bad]
    if keys:
        ranks = [r for r in range(table.shape[0]) if bool((table[r] != table[0]).any())]
        raise ConfigError(
            f"the ranks resolved different configs: rank(s) {', '.join(map(str, ranks))} differ from rank 0 in "
            f"{', '.join(keys)}; allowed: the same config file and overrides on every rank"
        )


def build_parts(config: RunConfig, host: Any) -> Parts:
    layouts = [sel.instantiate() for sel in config.layouts]
    check_order([sel.name for sel in config.layouts], [tuple(layout.mesh_dims) for layout in layouts])
    dims: list[str] = []
    for layout in layouts:
        for d in layout.mesh_dims:
            if d in dims:
                raise ConfigError(f"parallel.layouts = {config.parallel.layouts}: two layouts own mesh dimension {d!r}")
            dims.append(d)
    for sel, layout in zip(config.layouts, layouts):
        for d in getattr(layout, "borrowed_dims", ()):
            if d not in dims or d in layout.mesh_dims:
                owned = ", ".join(dims) or "none"
                raise ConfigError(
                    f"parallel.layouts: layout {sel.name!r} works over mesh dimension {d!r}, which no other layout "
                    f"owns (owned: {owned}); add the layout that owns {d!r} to parallel.layouts"
                )
    fill = next((d for d in DATA_DIMS if d in dims), dims[0] if dims else None)
    device_type = None if config.parallel.device == "auto" else config.parallel.device
    try:
        mesh = build_mesh(
            dims,
            config.parallel.sizes,
            fill=fill,
            device_type=device_type,
            timeout_s=config.parallel.timeout_s,
            # before any group or collective whose shapes come from the config: the mesh's own groups too
            check=lambda device: check_same_config(config, device),
        )
    except UserError:
        raise
    except ValueError as exc:
        raise ConfigError(f"parallel: {exc}") from None
    factory = load_model_factory(config)
    on_meta = builds_on_meta(factory, layouts)
    model, factory = build_model(config, host, "meta" if on_meta else mesh.device, factory=factory)
    precision = config.precision.instantiate()
    bind_mesh = getattr(precision, "bind_mesh", None)
    if callable(bind_mesh):
        bind_mesh(mesh)  # a recipe reducing state over ranks picks its groups (protocols.precision)
    model = precision.prepare(model)
    apply_recompute(model, config.train.recompute)
    apply_compile(model, config.train.compile, backend=config.train.compile_backend)
    for sel, layout in zip(config.layouts, layouts):
        try:
            model = layout.apply(model, mesh, precision)
        except ValueError as exc:
            raise ConfigError(f"parallel.layouts: layout {sel.name!r} cannot apply: {exc}") from None
    if on_meta:  # each rank's own part, allocated and filled now that the layouts have sharded it
        init_params(model, seed=config.train.seed, device=mesh.device)
    dp = combine_data_parallel([layout.data_parallel() for layout in layouts])
    optimizer = config.optimizer.instantiate().build(model, mesh=mesh, layouts=layouts)
    return Parts(mesh, model, factory, precision, layouts, optimizer, dp)
