"""``layerwise-distributed``: whole parameters spread over data-parallel ranks, each updated by its owner.

Under replicated data parallelism, parameters are assigned to DP ranks by balanced bin
packing (largest first, each to the least-loaded rank; ties go to the lower rank, so every
rank computes the same assignment). A parameter is never split between ranks
("shard-aligned"), which is what Muon needs: each owner orthogonalises whole matrices. Each
rank runs the wrapped optimizer (``inner = "adamw"`` or ``"muon"``) on the parameters it
owns, then every owner broadcasts its updated parameters (one flat buffer per owner and
dtype).

State: each rank holds the state of the parameters it owns. ``state_dict()`` scatters each
state tensor by rows from its owner and returns it as a ``DTensor`` ``Shard(0)`` over the DP
group (as FSDP would shard it), so every rank's state dict names every parameter and holds
only its share; ``load_state_dict`` gathers the rows back on the (new) owner, reading a saved ``DTensor``'s
real row split (``mcore.ragged``: a ragged FSDP checkpoint loads too). Checkpoints thus
reshard under any DP size. The format is the wrapped optimizer's, so a
``layerwise-distributed`` (adamw) checkpoint resumes plain ``adamw`` and the other way round.

Under FSDP (``DTensor`` parameters) the wrapped optimizer is built and returned as is: AdamW
updates shards, Muon gathers each matrix on its owner itself. With no data parallelism,
likewise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from mcore.config.coerce import build_dataclass
from mcore.ragged import even_counts
from mcore_optim import state as state_format
from mcore_optim.adamw import AdamWFactory, check_rate
from mcore_optim.dist import counts_of, data_parallel, gather_rows, is_dtensor, scatter_rows, whole
from mcore_optim.groups import make_groups, zero_grad
from mcore_optim.muon import MuonFactory
from mcore_optim.packing import assign
from mcore_optim.roles import NamedParam, classify

if TYPE_CHECKING:
    from torch import nn

    from mcore.mesh import ParallelMesh
    from mcore.params import ParamSpec
    from mcore.protocols.layout import DataParallelInfo, ParallelLayout

INNER: dict[str, Any] = {"adamw": AdamWFactory, "muon": MuonFactory}


class Layerwise:
    """The ``MeshOptimizer`` of ``layerwise-distributed`` under replicated data parallelism."""

    def __init__(self, named: Sequence[NamedParam], inner_factory: Any, dp: DataParallelInfo) -> None:
        self._named = list(named)
        self.rank, self.size, self.group = dp.rank, dp.size, dp.group
        self.owners = assign([(n.name, n.param.numel()) for n in self._named], self.size)
        owned = [n for n in self._named if self.owners[n.name] == self.rank]
        self.inner = inner_factory.make(owned, model_params=self._named)
        self.algorithm: str = self.inner.algorithm
        self.param_groups = make_groups(self._named, inner_factory.settings())
        self._device_mesh: DeviceMesh | None = None
        # (owner, dtype) -> parameters, in model order: the broadcast buffers.
        self._buckets: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        for n in self._named:
            self._buckets.setdefault((self.owners[n.name], n.param.dtype), []).append(n.param)

    def _sync_hyperparameters(self) -> None:
        inner = {g["role"]: g for g in self.inner.param_groups}
        for g in self.param_groups:
            if g["role"] in inner:
                inner[g["role"]]["lr"] = g["lr"]
                inner[g["role"]]["weight_decay"] = g["weight_decay"]

    @torch.no_grad()
    def step(self) -> None:
        self._sync_hyperparameters()
        self.inner.step()
        for (owner, dtype), params in self._buckets.items():
            if owner == self.rank:
                flat = torch.cat([p.detach().reshape(-1) for p in params])
            else:
                flat = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
            dist.broadcast(flat, group=self.group, group_src=owner)
            if owner != self.rank:
                pieces = flat.split([p.numel() for p in params])
                torch._foreach_copy_([p.detach() for p in params], [x.view(p.shape) for x, p in zip(pieces, params)])

    def zero_grad(self, set_to_none: bool = True) -> None:
        zero_grad(self.param_groups, set_to_none)

    # -- state: each parameter's state row-sharded over the DP group, like FSDP's ----------
    def _mesh(self) -> DeviceMesh:
        if self._device_mesh is None:
            assert self.group is not None, "layerwise-distributed runs only with a data-parallel group"
            self._device_mesh = DeviceMesh.from_group(self.group, self._named[0].param.device.type)
        return self._device_mesh

    @torch.no_grad()
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's format. Each state tensor is scattered by rows from its owner and
        saved as a ``DTensor`` ``Shard(0)`` over the DP group (step counts, 0-d, are broadcast), so
        every rank's state dict names every parameter, no rank holds more than its share, and
        checkpoints reshard under any DP size, also through a checkpointer that loads each
        rank's own list of keys."""
        own = self.inner.state_entries()
        mesh = self._mesh()
        entries: dict[str, dict[str, torch.Tensor]] = {}
        for n in self._named:
            owner, p = self.owners[n.name], n.param
            entries[n.name] = {}
            for key, dtype in self.inner.schema(n).items():
                mine = own[n.name][key] if owner == self.rank else None
                if dtype is None or p.dim() == 0:  # the step count, or a 0-d parameter: whole everywhere
                    if mine is not None:
                        value = mine.clone()
                    else:
                        value = torch.empty((), dtype=dtype or torch.float32, device=p.device)
                    dist.broadcast(value, group=self.group, group_src=owner)
                    entries[n.name][key] = value
                    continue
                like = torch.empty((0, *p.shape[1:]), device=p.device)
                piece = scatter_rows(mine, like, dtype, p.shape[0], owner, self.group, self.rank, self.size)
                entries[n.name][key] = DTensor.from_local(
                    piece.contiguous(), mesh, [Shard(0)], shape=p.shape, stride=p.stride()
                )
        return {**state_format.header(self.algorithm, self._named, self.param_groups), "state": entries}

    def _row_piece(self, n: NamedParam, value: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
        """This rank's even row chunk of a saved state tensor: a DTensor split like ours (by its real
        row ``counts``), any other DTensor (gathered, ragged splits included), or a full tensor."""
        rows = n.param.shape[0]
        chunk = -(-rows // self.size)
        lo, hi = min(self.rank * chunk, rows), min((self.rank + 1) * chunk, rows)
        if isinstance(value, DTensor):
            if (
                tuple(value.placements) == (Shard(0),)
                and value.device_mesh.size() == self.size
                and counts == even_counts(rows, self.size)
            ):
                return value._local_tensor
            value = whole(value, counts)
        return value[lo:hi]

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state_format.check(state_dict, self.algorithm, self._named, self.param_groups)
        saved = state_dict["state"]
        plan = []
        for n in self._named:  # every check before the first collective, so a refusal hangs no rank
            for key, dtype in self.inner.schema(n).items():
                value = saved.get(n.name, {}).get(key)
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"saved optimizer state lacks {key!r} for parameter {n.name!r}; refusing to load")
                expected = () if dtype is None else tuple(n.param.shape)
                if tuple(value.shape) != expected and not (dtype is not None and state_format.is_flat(value, expected)):
                    raise ValueError(
                        f"saved optimizer state {n.name!r}.{key!r} has shape {state_format.shape_text(value.shape)}, "
                        f"expected {state_format.shape_text(expected)}; refusing to load"
                    )
                plan.append((n, key, dtype, value))
        shapes = [() if dtype is None else tuple(n.param.shape) for n, _, dtype, _ in plan]
        unflat = state_format.unflatten([value for _, _, _, value in plan], shapes)  # saved flat (ZeRO-1 pieces)
        plan = [(n, key, dtype, value) for (n, key, dtype, _), value in zip(plan, unflat)]
        loaded: dict[str, dict[str, torch.Tensor]] = {}
        counts = counts_of([value for _, _, _, value in plan])  # the real row splits (one batched collective)
        for (n, key, dtype, value), split in zip(plan, counts):
            owner = self.owners[n.name]
            if dtype is None or n.param.dim() == 0 or not isinstance(value, DTensor):
                mine: torch.Tensor | None = value  # every rank holds it whole
            else:
                piece = self._row_piece(n, value, split)
                mine = gather_rows(piece, n.param.shape[0], owner, self.group, self.rank, self.size)
            if owner == self.rank:
                assert mine is not None
                loaded.setdefault(n.name, {})[key] = mine
        self.inner.load_entries(loaded)
        state_format.restore_groups(self.param_groups, state_dict["groups"])


class LayerwiseFactory:
    """Registered as optimizer ``layerwise-distributed``."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        lr: float = 1e-3
        """Peak learning rate of the inner optimizer (finite, >= 0)."""
        weight_decay: float = 0.1
        """Weight decay of the inner optimizer (finite, >= 0)."""
        inner: str = "adamw"
        """The optimizer each rank runs on the parameters it owns: 'adamw' or 'muon'."""
        options: dict[str, Any] = field(default_factory=dict)
        """The rest of the inner optimizer's Config (e.g. {"ns_coefficients": "polar-express"})."""

        def __post_init__(self) -> None:
            for key in ("lr", "weight_decay"):
                check_rate(key, getattr(self, key))
            if self.inner not in INNER:
                raise ValueError(f"inner = {self.inner!r}; allowed: {sorted(INNER)}")
            config_cls = INNER[self.inner].Config
            for key in ("lr", "weight_decay"):
                if key in self.options:
                    raise ValueError(f"options.{key} is set; allowed: set {key} at the top level, not in options")
            known = set(config_cls.__dataclass_fields__)
            unknown = [k for k in self.options if k not in known]
            if unknown:
                raise ValueError(
                    f"options.{unknown[0]} = {self.options[unknown[0]]!r} is not a setting of inner optimizer "
                    f"{self.inner!r}; allowed: {sorted(known - {'lr', 'weight_decay'})}"
                )
            # typed and checked as the inner optimizer's own section would be (values from the CLI are strings)
            inner = build_dataclass(
                config_cls, {**self.options, "lr": self.lr, "weight_decay": self.weight_decay}, "options"
            )
            self.options = {key: getattr(inner, key) for key in self.options}

    def __init__(self, config: LayerwiseFactory.Config | None = None) -> None:
        c = self.config = config if config is not None else LayerwiseFactory.Config()
        factory = INNER[c.inner]
        self.inner = factory(factory.Config(lr=c.lr, weight_decay=c.weight_decay, **c.options))

    def build(self, model: nn.Module, *, mesh: ParallelMesh, layouts: Sequence[ParallelLayout]) -> Any:
        named = classify(model, role_overrides=self.inner.config.role_overrides)
        if any(is_dtensor(n.param) for n in named):
            return self.inner.build(model, mesh=mesh, layouts=layouts)  # sharded AdamW, or Muon's own split
        dp = data_parallel(layouts, optimizer="layerwise-distributed")
        if dp.size == 1:
            return self.inner.build(model, mesh=mesh, layouts=layouts)
        return Layerwise(named, self.inner, dp)

    # -- OptimizerStateSize (read by ``mcore plan``) -----------------------------------------
    def state_bytes(self, shape: tuple[int, ...], spec: ParamSpec, *, param_dtype: torch.dtype) -> int:
        """The inner optimizer's state (each parameter's lives on its owner only)."""
        return int(self.inner.state_bytes(shape, spec, param_dtype=param_dtype))

    def shards_state_over_dp(self, *, sharded_params: bool) -> bool:
        """Whole parameters are bin-packed over replicas; under FSDP the inner optimizer runs as is."""
        return not sharded_params
