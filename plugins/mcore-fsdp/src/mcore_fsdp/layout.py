"""Layouts ``fsdp`` (shard over ``dp_shard``) and ``hsdp`` (replicate over ``dp_replicate`` x shard).

``apply`` calls ``fully_shard`` on every unit (by default each child of the model's
``layers`` ``ModuleList``) and then on the root, as a user of FSDP2 would by hand. Mixed
precision comes from the config or, when the config says ``auto``, from the run's precision
recipe; a recipe whose ``gather_payload`` returns a payload has its parameters gathered in
that format.

After ``tp`` (``["tp", "fsdp"]``, ``["tp", "hsdp"]``) the tensor-parallel parameters are DTensors
over the ``tp`` dim; ``fully_shard`` shards their local tensors and makes them DTensors over the
dp dims and ``tp`` (``tp_params``), so nothing here changes: the run loop calls this layout's
``finish_grad_sync`` before tp's, and tp's sums over its group then read the reduced shards.

Borrowing ``cp`` (``[parallel.fsdp] borrow = ["cp"]`` with ``["cp", "fsdp"]``, torchtitan's layout): each
parameter is sharded over the flattened ``dp_shard x cp`` mesh, so its reduce-scatter also sums the
``cp`` ranks' partial gradients (the ``cp`` layout then leaves them alone) and the reduced gradient is
divided by ``dp_shard`` only: ``cp``'s ranks hold parts of ONE micro-batch, whose losses add up.
An option rather than the default: the core checks ``borrowed_dims`` before the mesh exists and
refuses a borrowed dimension no other layout owns, so fsdp cannot borrow ``cp`` in every run.

Borrowing ``ep`` (``borrow = ["ep"]`` with ``["ep", "fsdp"]``, torchtitan's expert-parallel layout): the
``ep`` ranks read different micro-batches, so the dense parameters are sharded over ``dp_shard x ep`` and
their gradients averaged over both (the default divisor, the flattened mesh's size); the modules holding
parameters that are already DTensors over ``ep`` (the experts) are ``fully_shard``-ed first, on their
own, over ``dp_shard`` only (their local rows, as for ``tp``), averaged over ``dp_shard``; the ``ep``
layout then divides them by ``ep`` once. Without ``borrow`` the same runs shard everything over
``dp_shard`` only (the dense parameters replicated over ``ep``, which averages their shards).

On one process without a process group, the parameters are DTensors over a ``LocalMesh``
(``local_mesh``): ``apply`` starts no process group, so ``torch.distributed.is_initialized()``
is what it was before.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from mcore.params import collect_param_specs
from mcore.protocols.layout import DataParallelInfo
from mcore_fsdp.api import FSDPModule, fully_shard
from mcore_fsdp.local_mesh import LocalMesh
from mcore_fsdp.policy import MixedPrecisionPolicy
from mcore_fsdp.runtime import state_of

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from mcore.mesh import ParallelMesh
    from mcore.protocols.precision import PrecisionRecipe

DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


WHOLE = ("none", "matrices", "all")
#: What ``borrow`` may name: ``cp`` splits one micro-batch's tokens, so its ranks' gradients are summed, not
#: averaged; ``ep`` ranks read different micro-batches (averaged), and its experts stay sharded over ``dp_shard``.
BORROWABLE = ((), ("cp",), ("ep",))
#: Roles of ``whole_params = "matrices"``: what Muon orthogonalises (``mcore.params``), not the embedding or head.
WHOLE_ROLES = ("matrix", "expert")


def keep_whole(model: nn.Module, whole_params: str) -> bool | Callable[[nn.Parameter], bool]:
    """The ``keep_whole`` of ``fully_shard`` for ``whole_params``: ``"matrices"`` chooses the parameters
    the model declares ``matrix`` or ``expert`` (2+ dims), read before any unit is sharded."""
    if whole_params != "matrices":
        return whole_params == "all"
    specs = collect_param_specs(model)
    chosen = {id(p) for name, p in model.named_parameters() if specs[name].role in WHOLE_ROLES and p.dim() >= 2}
    return lambda p: id(p) in chosen


def describe_params(model: nn.Module) -> Callable[[nn.Parameter], tuple[str, Any]]:
    """What a precision recipe is told about each parameter it may gather in its own format: the
    parameter's name in ``model`` and its declared ``ParamSpec`` (role), read before sharding."""
    specs = collect_param_specs(model)
    known = {id(p): (name, specs.get(name)) for name, p in model.named_parameters()}
    return lambda p: known.get(id(p), ("", None))


def _dtype(key: str, value: str) -> torch.dtype | None:
    if value not in DTYPES:
        raise ValueError(f"parallel.fsdp.{key} = {value!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[value]


def find_units(model: nn.Module, paths: tuple[str, ...]) -> list[nn.Module]:
    """Children of each ``ModuleList`` (or ``ModuleDict``: a pipeline stage keeps the model's layer
    indices as keys) named in ``paths`` (dotted attribute paths)."""
    units: list[nn.Module] = []
    for path in paths:
        target: Any = model
        for part in path.split("."):
            target = getattr(target, part, None)
            if target is None:
                break
        if not isinstance(target, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            raise ValueError(
                f"parallel.fsdp.units names {path!r}, which is not a ModuleList of {type(model).__name__}; "
                "allowed: dotted paths of ModuleLists or ModuleDicts (e.g. 'layers'), or [] for the root only"
            )
        units.extend(target.values() if isinstance(target, nn.ModuleDict) else target)
    return units


def modules_over(model: nn.Module, dim: str) -> list[nn.Module]:
    """The modules whose own parameters are DTensors over mesh dimension ``dim`` (``ep``'s experts)."""
    return [
        m
        for m in model.modules()
        if any(
            isinstance(p, DTensor) and dim in (p.device_mesh.mesh_dim_names or ())
            for p in m._parameters.values()
            if p is not None
        )
    ]


class FSDPLayout:
    """Fully sharded data parallel over the ``dp_shard`` mesh dimension."""

    name: ClassVar[str] = "fsdp"
    mesh_dims: ClassVar[tuple[str, ...]] = ("dp_shard",)
    #: ``apply`` works on a model on the meta device: only each rank's rows are allocated (see ``api``)
    supports_meta_init: ClassVar[bool] = True

    @dataclass(kw_only=True, slots=True)
    class Config:
        units: tuple[str, ...] = ("layers",)
        """ModuleLists whose children become units, each gathered and resharded on its own."""
        reshard_after_forward: bool = True
        """Free each unit's gathered parameters after forward (gather again for backward)."""
        param_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
        """dtype of gathered parameters ('auto': the precision recipe's)."""
        reduce_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
        """dtype of the gradient reduction ('auto': the precision recipe's)."""
        prefetch: int = 1
        """Units gathered ahead of the one computing, in forward and backward (>= 0)."""
        gradient_divide_factor: float | None = None
        """Divide reduced gradients by this instead of the data-parallel size (none: that size)."""
        quantized_gather: bool = True
        """Gather in the recipe's low-precision format when it offers one (gather_payload)."""
        whole_params: Literal["none", "matrices", "all"] = "none"
        """Parameters kept whole on one rank instead of split by rows: 'none', 'matrices' (declared matrix/expert, what Muon orthogonalises; not the embedding or head) or 'all'."""
        borrow: tuple[str, ...] = ()
        """Mesh dimensions of another layout that fsdp also shards over: ['cp'] shards every parameter over dp_shard x cp, ['ep'] the dense ones over dp_shard x ep (module docstring); [] for dp_shard only."""

        def __post_init__(self) -> None:
            _dtype("param_dtype", self.param_dtype)
            _dtype("reduce_dtype", self.reduce_dtype)
            if self.prefetch < 0:
                raise ValueError(f"parallel.fsdp.prefetch = {self.prefetch!r}; allowed: an int >= 0")
            if isinstance(self.borrow, str):
                self.borrow = (self.borrow,) if self.borrow else ()
            self.borrow = tuple(self.borrow)
            if self.borrow not in BORROWABLE:
                raise ValueError(f"parallel.fsdp.borrow = {list(self.borrow)!r}; allowed: [], ['cp'] or ['ep']")
            if self.whole_params not in WHOLE:
                raise ValueError(f"parallel.fsdp.whole_params = {self.whole_params!r}; allowed: {', '.join(WHOLE)}")
            factor = self.gradient_divide_factor
            if factor is not None and not (math.isfinite(factor) and factor > 0):
                raise ValueError(
                    f"parallel.fsdp.gradient_divide_factor = {factor!r}; allowed: a finite number > 0 or none"
                )

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or type(self).Config()
        if isinstance(self.config.units, str):
            self.config.units = (self.config.units,) if self.config.units else ()
        self._model: nn.Module | None = None
        self._mesh: ParallelMesh | None = None

    @property
    def borrowed_dims(self) -> tuple[str, ...]:
        """Mesh dimensions of another layout this one also shards over (``Config.borrow``)."""
        return self.config.borrow

    # -- apply ---------------------------------------------------------------------------------
    def _device_mesh(self, mesh: ParallelMesh) -> DeviceMesh:
        if mesh.device_mesh is not None:
            sub = mesh.submesh(self.mesh_dims + self.borrowed_dims)
            assert sub is not None
            if self.borrowed_dims:  # one flattened shard dim over dp_shard x cp
                return sub._flatten("_".join(self.mesh_dims + self.borrowed_dims))  # type: ignore[no-any-return]
            return sub
        if dist.is_initialized():  # the caller's own (1-rank) group
            from torch.distributed.device_mesh import init_device_mesh

            return init_device_mesh(mesh.device_type, (1,) * len(self.mesh_dims), mesh_dim_names=self.mesh_dims)
        # one process without a process group: DTensors over a mesh of its own, starting no group
        return LocalMesh(mesh.device_type, self.mesh_dims)

    def _policy(self, precision: PrecisionRecipe | None) -> MixedPrecisionPolicy:
        param = _dtype("param_dtype", self.config.param_dtype)
        reduce = _dtype("reduce_dtype", self.config.reduce_dtype)
        if precision is not None:
            param = param or precision.param_dtype
            reduce = reduce or precision.reduce_dtype
        return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)

    def apply(self, model: nn.Module, mesh: ParallelMesh, precision: PrecisionRecipe | None = None) -> nn.Module:
        device_mesh = self._device_mesh(mesh)
        cfg = self.config
        divide = cfg.gradient_divide_factor
        if divide is None and "cp" in self.borrowed_dims:  # cp's ranks add up to one micro-batch's gradient
            divide = float(mesh.size("dp_shard"))
        options: dict[str, Any] = {
            "mesh": device_mesh,
            "mp_policy": self._policy(precision),
            "gradient_divide_factor": divide,
            "gather_recipe": precision if cfg.quantized_gather else None,
            "prefetch": cfg.prefetch,
            "keep_whole": keep_whole(model, cfg.whole_params),
            "describe_param": describe_params(model) if cfg.quantized_gather and precision is not None else None,
        }
        if "ep" in self.borrowed_dims and mesh.device_mesh is not None:  # experts: over dp_shard only
            own = {
                **options,
                "mesh": mesh.submesh(self.mesh_dims),
                "gradient_divide_factor": cfg.gradient_divide_factor,
            }
            for holder in modules_over(model, "ep"):
                fully_shard(holder, reshard_after_forward=cfg.reshard_after_forward, **own)
        for unit in find_units(model, cfg.units):
            fully_shard(unit, reshard_after_forward=cfg.reshard_after_forward, **options)
        fully_shard(model, reshard_after_forward=cfg.reshard_after_forward, **options)
        self._model, self._mesh = model, mesh
        return model

    # -- per step --------------------------------------------------------------------------------
    def data_parallel(self) -> DataParallelInfo:
        mesh = self._require_mesh()
        return DataParallelInfo(rank=mesh.rank("dp_shard"), size=mesh.size("dp_shard"), group=mesh.group("dp_shard"))

    @contextlib.contextmanager
    def no_grad_sync(self) -> Iterator[None]:
        root = self._require_model()
        root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True)

    def finish_grad_sync(self) -> None:
        state = state_of(self._require_model())
        if state is not None and state.ctx is not None:
            state.ctx.drain()

    def state_dict_options(self) -> dict[str, Any]:
        """Parameters and their grads are ``Shard(0)`` DTensors: save sharded, reshard on load."""
        return {"full_state_dict": False, "cpu_offload": False}

    def _require_model(self) -> FSDPModule:
        if self._model is None:
            raise RuntimeError(f"layout {self.name!r}: apply() has not been called")
        return self._model  # type: ignore[return-value]

    def _require_mesh(self) -> ParallelMesh:
        self._require_model()
        assert self._mesh is not None
        return self._mesh


class HSDPLayout(FSDPLayout):
    """Hybrid sharding: parameters sharded over ``dp_shard``, replicated over ``dp_replicate``."""

    name: ClassVar[str] = "hsdp"
    mesh_dims: ClassVar[tuple[str, ...]] = ("dp_replicate", "dp_shard")

    def __init__(self, config: FSDPLayout.Config | None = None) -> None:
        super().__init__(config)
        self._dp_group: dist.ProcessGroup | None = None

    def apply(self, model: nn.Module, mesh: ParallelMesh, precision: PrecisionRecipe | None = None) -> nn.Module:
        if self.borrowed_dims:
            raise ValueError(
                f"parallel.hsdp.borrow = {list(self.borrowed_dims)!r}: hsdp does not shard over other layouts' "
                "dimensions yet; allowed: [] (or layout 'fsdp' with borrow = ['cp'] or ['ep'])"
            )
        model = super().apply(model, mesh, precision)
        if mesh.device_mesh is not None and mesh.size("dp_replicate") * mesh.size("dp_shard") > 1:
            flat = mesh.submesh(self.mesh_dims)._flatten("dp_replicate_shard")  # type: ignore[union-attr]
            self._dp_group = flat.get_group()
        return model

    def data_parallel(self) -> DataParallelInfo:
        mesh = self._require_mesh()
        shard = mesh.size("dp_shard")
        rank = mesh.rank("dp_replicate") * shard + mesh.rank("dp_shard")
        return DataParallelInfo(rank=rank, size=mesh.size("dp_replicate") * shard, group=self._dp_group)
