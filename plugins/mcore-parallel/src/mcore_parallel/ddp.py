"""Layout ``ddp``: replicated data parallelism over ``dp_replicate``, and the base of ZeRO-1.

Every rank of the group holds the same parameters (plain tensors, or the same tensor-parallel
shards: see Composition); gradients live in flat buckets (``buckets``)
reduced during backward (``reducer``) and averaged over the ``dp_replicate`` group by the end of
the synchronised backward (or by ``finish_grad_sync`` when none ran it), so that another layout's
``finish_grad_sync`` (``tp``'s sums over its group) finds them final whatever the order. An optimizer that shards its state asks ``shard_grads()`` at build time
(``mcore.protocols.sharded_grads``): from then on the buckets are reduce-scattered and the
optimizer calls ``gather_params()`` after its update.

When the buckets are built: at ``apply`` for a model with real parameters; for a model on the
meta device (``supports_meta_init``) at first use (the first forward, ``shard_grads`` or
``finish_grad_sync``), after ``mcore.construct.init_params`` has allocated the parameters (it keeps
their identity). ``apply`` on meta only plans; nothing is allocated until then.

Composition: ``ddp`` is the data-parallel layout listed last (``["tp", "ddp"]``: tensor parallel
inside, replicated data parallel outside). A parameter that a layout before it made a ``DTensor``
over dimensions other than ``dp_replicate`` (``tp``'s ``Shard(0)``/``Shard(1)`` weights) is bucketed
by its local shard and that shard is reduced over ``dp_replicate`` (the ranks of the group hold the
same part); its ``.grad`` stays a ``DTensor`` with the parameter's mesh and placements, its local
tensor the bucket view (``buckets``), so the global norm and checkpoints see the layout ``tp`` made.
A ``DTensor`` over a mesh that includes ranks of this rank's ``dp_replicate`` group is refused with
one line. ZeRO-1 with ``DTensor`` parameters is declined (``shard_grads`` answers ``None``, as the
protocol allows): ``ShardPiece`` numbers a whole parameter's elements, and the optimizer's state
format has no place for a tensor-parallel shard yet; gradients are then all-reduced as without
ZeRO-1. A layout listed after ``ddp`` must not replace parameters; the first forward checks that
the model still holds the parameters ``ddp`` bucketed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from mcore.errors import UserError
from mcore.protocols.layout import DataParallelInfo
from mcore.protocols.sharded_grads import GradShards, ShardPiece
from mcore_parallel.buckets import Bucket, local, plan_buckets
from mcore_parallel.reducer import Reducer

if TYPE_CHECKING:
    from mcore.mesh import ParallelMesh
    from mcore.protocols.precision import PrecisionRecipe

DIM = "dp_replicate"
REDUCE_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}


class DDPLayout:
    """Replicated data parallelism with bucketed, overlapped gradient reduction (a ``GradientShardingLayout``)."""

    name: ClassVar[str] = "ddp"
    mesh_dims: ClassVar[tuple[str, ...]] = (DIM,)
    #: ``apply`` works on a model on the meta device: parameters stay whole, buckets are built after init
    supports_meta_init: ClassVar[bool] = True

    @dataclass(kw_only=True, slots=True)
    class Config:
        bucket_mb: float = 25.0
        """Gradient bucket size in MiB: each bucket is reduced with one collective as soon as its gradients are ready (> 0)."""
        reduce_dtype: Literal["auto", "fp32", "bf16"] = "auto"
        """dtype gradients are summed in across ranks ('auto': the precision recipe's reduce_dtype)."""
        overlap: bool = True
        """Reduce each bucket during backward as soon as it is ready (false: all at finish_grad_sync)."""

        def __post_init__(self) -> None:
            mb = self.bucket_mb
            if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not (math.isfinite(mb) and mb > 0):
                raise ValueError(f"parallel.ddp.bucket_mb = {mb!r}; allowed: a finite number of MiB > 0")
            if self.reduce_dtype not in REDUCE_DTYPES:
                raise ValueError(
                    f"parallel.ddp.reduce_dtype = {self.reduce_dtype!r}; allowed: {', '.join(REDUCE_DTYPES)}"
                )
            if not isinstance(self.overlap, bool):
                raise ValueError(f"parallel.ddp.overlap = {self.overlap!r}; allowed: true or false")

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or type(self).Config()
        self._model: nn.Module | None = None
        self._mesh: ParallelMesh | None = None
        self._named: list[tuple[str, nn.Parameter]] = []
        self._reduce_dtype: torch.dtype | None = None
        self._reducer: Reducer | None = None
        self._sync = True
        self._checked = False
        self._shards: GradShards | None = None

    # -- apply -----------------------------------------------------------------------------------
    def apply(self, model: nn.Module, mesh: ParallelMesh, precision: PrecisionRecipe | None = None) -> nn.Module:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        _refuse_dtensors_over_dp(named, mesh)
        self._model, self._mesh, self._named = model, mesh, named
        self._reduce_dtype = REDUCE_DTYPES[self.config.reduce_dtype] or getattr(precision, "reduce_dtype", None)
        model.register_forward_pre_hook(self._before_forward)
        if not any(local(p).is_meta for _, p in named):
            self._build()
        return model

    def _build(self) -> Reducer:
        """Plan and allocate the buckets and hook the parameters (once, on real parameters)."""
        if self._reducer is not None:
            return self._reducer
        meta = next((n for n, p in self._named if local(p).is_meta), None)
        if meta is not None:
            raise UserError(
                f"ddp: parameter {meta!r} is still on the meta device; call mcore.construct.init_params(model, ...) "
                "before the first forward, shard_grads() or finish_grad_sync()"
            )
        dp = self.data_parallel()
        buckets = plan_buckets(self._named, cap_bytes=max(1, int(self.config.bucket_mb * 2**20)))
        for bucket in buckets:
            bucket.allocate(dp.size)
        self._reducer = Reducer(
            buckets,
            rank=dp.rank,
            size=dp.size,
            group=dp.group,
            reduce_dtype=self._reduce_dtype,
            overlap=self.config.overlap,
        )
        self._reducer.sync = self._sync
        return self._reducer

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        """Buckets built (a model initialised after ``apply``) and still holding the model's parameters."""
        if self._checked:
            return
        self._build()
        self._check_params_unchanged()

    def _check_params_unchanged(self) -> None:
        model = self._require_model()
        now = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for n, p in self._named:
            if now.get(n) is not p:
                raise UserError(
                    f"ddp: parameter {n!r} was replaced after 'ddp' was applied (by a layout listed after it); "
                    "allowed: list 'ddp' after the layouts that replace or shard parameters in parallel.layouts"
                )
        self._checked = True

    # -- per step ----------------------------------------------------------------------------------
    def data_parallel(self) -> DataParallelInfo:
        mesh = self._require_mesh()
        return DataParallelInfo(rank=mesh.rank(DIM), size=mesh.size(DIM), group=mesh.group(DIM))

    @contextlib.contextmanager
    def no_grad_sync(self) -> Iterator[None]:
        before = self._sync
        self._set_sync(False)
        try:
            yield
        finally:
            self._set_sync(before)

    def _set_sync(self, sync: bool) -> None:
        self._sync = sync
        if self._reducer is not None:
            self._reducer.sync = sync

    def finish_grad_sync(self) -> None:
        self._build().finish()

    def state_dict_options(self) -> dict[str, Any]:
        """Plain replicated parameters: nothing to tell the checkpoint code."""
        return {}

    def grad_norm_replicas(self, name: str, param: torch.Tensor) -> int | None:
        """1 once gradients are reduce-scattered (each element on one rank), else the default."""
        return 1 if self._shards is not None else None

    @property
    def buckets(self) -> tuple[Bucket, ...]:
        """The gradient buckets, in the order they are reduced (empty before they are built)."""
        return tuple(self._reducer.buckets) if self._reducer is not None else ()

    @property
    def buckets_issued(self) -> int:
        """How many buckets' collectives this step has issued so far (0 after ``finish_grad_sync``)."""
        return self._reducer.issued if self._reducer is not None else 0

    # -- ZeRO-1 ------------------------------------------------------------------------------------
    def shard_grads(self) -> GradShards | None:
        """Switch to reduce-scatter and hand the optimizer this rank's pieces (same shards when asked again).

        ``None`` (declined: gradients stay all-reduced) when a parameter is a ``DTensor``: a piece of a
        tensor-parallel shard has no place in ``ShardPiece`` nor in the optimizer's state format yet."""
        if self._shards is not None:
            return self._shards
        if any(isinstance(p, DTensor) for _, p in self._named):
            return None
        reducer = self._build()
        reducer.shard()
        dp = self.data_parallel()
        pieces = []
        for bucket in reducer.buckets:
            lo, hi = bucket.range_of(dp.rank, dp.size)
            for name, p, at in zip(bucket.names, bucket.params, bucket.offsets):
                start, stop = max(lo, at) - at, min(hi, at + p.numel()) - at
                start, stop = (start, stop) if start < stop else (0, 0)
                piece = ShardPiece(
                    name=name, shape=tuple(p.shape), dtype=p.dtype, start=start, stop=stop, bucket=bucket.index, param=p
                )
                pieces.append(piece)
        mesh = self._require_mesh()
        self._shards = GradShards(
            pieces=tuple(pieces),
            rank=dp.rank,
            size=dp.size,
            group=dp.group,
            device_mesh=mesh.submesh([DIM]) if dp.size > 1 else None,
            reduce_dtype=self._reduce_dtype or (self._named[0][1].dtype if self._named else torch.float32),
        )
        return self._shards

    def gather_params(self) -> None:
        if self._reducer is None or self._shards is None:
            raise RuntimeError("ddp: gather_params() before shard_grads()")
        self._reducer.gather_params()

    # -- helpers -----------------------------------------------------------------------------------
    def _require_model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError(f"layout {self.name!r}: apply() has not been called")
        return self._model

    def _require_mesh(self) -> ParallelMesh:
        self._require_model()
        assert self._mesh is not None
        return self._mesh


def _refuse_dtensors_over_dp(named: list[tuple[str, nn.Parameter]], mesh: ParallelMesh) -> None:
    """A ``DTensor`` parameter whose mesh holds another rank of this rank's ``dp_replicate`` group is
    already spread over the data-parallel ranks: reducing its local shard over them would be wrong."""
    group = mesh.group(DIM)
    if group is None:
        return
    peers = set(dist.get_process_group_ranks(group))
    for n, p in named:
        if not isinstance(p, DTensor):
            continue
        ranks = set(p.device_mesh.mesh.flatten().tolist())
        if len(ranks & peers) > 1:
            dims = p.device_mesh.mesh_dim_names or ()
            raise ValueError(
                f"parameter {n!r} is a DTensor over mesh dims {tuple(dims)} (placements {tuple(p.placements)}), "
                f"which span ranks of {DIM!r}; allowed: plain parameters or DTensors over dims other than {DIM!r} "
                "(list 'ddp' after 'tp': ['tp', 'ddp'])"
            )
