"""Parameters that are already DTensors of another layout (``tp``): fsdp shards their local tensors.

Why a module of its own: under ``["tp", "fsdp"]`` (or ``["tp", "hsdp"]``) a tensor-parallel
parameter reaches ``fully_shard`` as a DTensor over the ``tp`` mesh (``Shard(0)`` for column
linears and vocabulary rows, ``Shard(1)`` for row linears, ``Replicate()``), and each parameter
then has two descriptions, kept here side by side (``ParamLayout``):

* **sharded** (what the optimizer, the gradient norm and checkpoints see): as FSDP2 does, fsdp
  splits the tp-LOCAL tensor by rows over ``dp_shard`` (``ceil(rows / N)`` per rank, the last
  ranks fewer or none) and the result is one DTensor over the combined mesh ``(dp_shard, *tp)``
  (HSDP: ``(dp_replicate, dp_shard, *tp)``), fsdp's placements followed by tp's. Where tp also
  splits rows, rank ``(f, t)`` holds part ``f`` of tp's chunk ``t``, which DTensor's
  left-to-right reading of ``(Shard(0), Shard(0))`` would place elsewhere; the fsdp dim is then
  ``_StridedShard(0, split_factor=tp)``, FSDP2's placement, so ``full_tensor()``, DCP and
  ``mcore.construct`` see the single-process parameter. ``check_rows`` asks torch where it
  thinks each rank's rows lie and refuses a torch that reads the placement otherwise (one line);
* **compute** (what the module sees between gather and reshard): the gathered tp-local tensor as
  the tp DTensor it was (``DTensor.from_local(gathered, tp_mesh, tp_placements)``), so torch's
  parallel styles and the tp layout's modules run unchanged; its gradient's local tensor
  (``local_grad``) is what fsdp reduce-scatters over ``dp_shard``.

A plain parameter has no compute mesh: it is gathered as a plain tensor and sharded over the
dp mesh only (replicated over tp, which the gradient norm reads from the placements).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from mcore_fsdp.groups import MeshGroups

__all__ = ["ParamLayout", "contiguous_stride", "describe_params", "local_tensor", "strided_shard"]


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def strided_shard(dim: int, split_factor: int) -> Placement:
    """FSDP2's placement for rows split over dp inside ``split_factor`` row chunks of tp (torch's
    ``_StridedShard``, private in every release that has it: looked up, not assumed)."""
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError as exc:  # pragma: no cover - every torch >= 2.11 has it
        raise ValueError(
            f"fully_shard: torch {torch.__version__} has no _StridedShard placement, needed to shard rows that tp "
            "already splits; allowed: a torch release with torch.distributed.tensor.placement_types._StridedShard"
        ) from exc
    return _StridedShard(dim, split_factor=split_factor)  # type: ignore[no-any-return]


def _is_strided(p: Placement) -> bool:
    return type(p).__name__ == "_StridedShard"


@dataclass(frozen=True, slots=True)
class ParamLayout:
    """One parameter as fsdp holds it (``sharded``) and as its module computes with it (``compute``)."""

    name: str
    local_shape: tuple[int, ...]  # what fsdp splits by rows: the plain tensor, or a DTensor's tp-local one
    shape: torch.Size  # the parameter's global shape
    stride: tuple[int, ...]  # its global stride
    mesh: DeviceMesh  # the sharded parameter's mesh: fsdp's, then tp's dims
    placements: tuple[Placement, ...]
    compute_mesh: DeviceMesh | None = None  # None: gathered as a plain tensor
    compute_placements: tuple[Placement, ...] = ()

    @property
    def is_dtensor(self) -> bool:
        """Whether the module computes with a DTensor (a tp parameter) rather than a plain tensor."""
        return self.compute_mesh is not None

    def sharded(self, local: torch.Tensor) -> DTensor:
        """``local`` (this rank's rows of the tp-local tensor) as the sharded DTensor (no copy, no check)."""
        return DTensor.from_local(
            local, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
        )

    def compute_param(self, dtype: torch.dtype, device: torch.device, requires_grad: bool) -> nn.Parameter:
        """The persistent un-sharded parameter: empty until ``bind`` points it at gathered memory."""
        empty = torch.empty(0, dtype=dtype, device=device)
        if self.compute_mesh is None:
            return nn.Parameter(empty, requires_grad=requires_grad)
        dt = DTensor.from_local(
            empty, self.compute_mesh, self.compute_placements, run_check=False, shape=self.shape, stride=self.stride
        )
        return nn.Parameter(dt, requires_grad=requires_grad)

    def bind(self, param: nn.Parameter, view: torch.Tensor) -> None:
        """Point the un-sharded ``param`` at ``view`` (the gathered local tensor), keeping its identity."""
        if self.compute_mesh is None:
            param.data = view
        else:
            param._local_tensor.data = view  # type: ignore[attr-defined]  # the tp DTensor's local tensor

    def local_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """The tp-local gradient of the un-sharded parameter (redistributed to its placements first when
        autograd left it another way, e.g. ``Partial``)."""
        if not isinstance(grad, DTensor):
            return grad
        assert self.compute_mesh is not None, f"{self.name}: a DTensor gradient for a plain parameter"
        if tuple(grad.placements) != self.compute_placements:
            grad = grad.redistribute(self.compute_mesh, self.compute_placements)
        return grad._local_tensor

    def check_rows(self, rows: int, start: int) -> None:
        """Refuse a torch that places this rank's ``rows`` rows (from ``start`` of the tp-local tensor)
        elsewhere in the global tensor than fsdp holds them (``_StridedShard`` readings differ)."""
        if self.compute_mesh is None or rows == 0:
            return
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, tp_offset = compute_local_shape_and_global_offset(self.shape, self.compute_mesh, self.compute_placements)
        want_shape = (rows, *self.local_shape[1:])
        want_offset = (tp_offset[0] + start, *tp_offset[1:])
        got_shape, got_offset = compute_local_shape_and_global_offset(self.shape, self.mesh, self.placements)
        if tuple(got_shape) != want_shape or tuple(got_offset) != want_offset:
            raise ValueError(
                f"fully_shard: torch {torch.__version__} places this rank's part of {self.name} "
                f"{list(self.placements)} at {tuple(got_offset)} with shape {tuple(got_shape)}, but fsdp holds rows "
                f"at {want_offset} with shape {want_shape}; allowed: sizes whose tp-local rows divide by the "
                "dp_shard size, or a torch release whose DTensor reads FSDP2's _StridedShard this way"
            )


def _dim_names(mesh: DeviceMesh) -> tuple[str, ...]:
    return tuple(mesh.mesh_dim_names or ())


def combined_mesh(dp_mesh: DeviceMesh, tp_mesh: DeviceMesh, name: str) -> DeviceMesh:
    """The mesh over fsdp's dims and then ``tp_mesh``'s, both slices of one root mesh (torch's
    ``DeviceMesh._concatenate`` where it exists, else the root mesh sliced by the dims' names)."""
    concatenate = getattr(type(dp_mesh), "_concatenate", None)
    try:
        if concatenate is not None:
            return concatenate([dp_mesh, tp_mesh])  # type: ignore[no-any-return]
        root = dp_mesh._get_root_mesh()  # type: ignore[attr-defined]
        return root[(*_dim_names(dp_mesh), *_dim_names(tp_mesh))]  # type: ignore[no-any-return]
    except (RuntimeError, KeyError, ValueError, AttributeError) as exc:
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f"fully_shard: parameter {name} is a DTensor over mesh dims {_dim_names(tp_mesh)} that do not combine "
            f"with fully_shard's mesh {_dim_names(dp_mesh)} ({cause}); allowed: DTensors over other dims of the same "
            "root mesh (e.g. its 'tp' slice)"
        ) from None


def check_dtensor(name: str, param: DTensor, dp_mesh: DeviceMesh) -> None:
    """A parameter fsdp can shard as FSDP2 does: a DTensor over other dims of the same mesh, laid out
    by ``Shard``/``Replicate`` (a one-line ``ValueError`` otherwise)."""
    tp_mesh = param.device_mesh
    shared = sorted(set(_dim_names(tp_mesh)) & set(_dim_names(dp_mesh)))
    if shared or (tp_mesh is dp_mesh):
        raise ValueError(
            f"fully_shard: parameter {name} is a DTensor over mesh dims {_dim_names(tp_mesh)}, which include "
            f"fully_shard's {shared or list(_dim_names(dp_mesh))}; allowed: plain tensors or DTensors over other dims "
            "(e.g. 'tp')"
        )
    if tp_mesh.device_type != dp_mesh.device_type:
        raise ValueError(
            f"fully_shard: parameter {name} is a DTensor on {tp_mesh.device_type!r} but the mesh is on "
            f"{dp_mesh.device_type!r}; allowed: the same device type"
        )
    bad = [p for p in param.placements if _is_strided(p) or not isinstance(p, (Shard, Replicate))]
    if bad:
        raise ValueError(
            f"fully_shard: parameter {name} has placement {bad[0]!r}; allowed: DTensor parameters placed by "
            "Shard(dim) and Replicate() only"
        )


def describe_params(names: list[str], params: list[torch.Tensor], groups: MeshGroups) -> list[ParamLayout]:
    """Each parameter's ``ParamLayout`` under ``groups`` (one combined mesh per distinct tp mesh)."""
    meshes: dict[int, DeviceMesh] = {}
    out = []
    for name, p in zip(names, params):
        if not isinstance(p, DTensor):
            shape = tuple(p.shape)
            out.append(ParamLayout(name, shape, p.shape, contiguous_stride(shape), groups.mesh, groups.placements))
            continue
        check_dtensor(name, p, groups.mesh)
        tp_mesh, tp_placements = p.device_mesh, tuple(p.placements)
        if id(tp_mesh) not in meshes:
            meshes[id(tp_mesh)] = combined_mesh(groups.mesh, tp_mesh, name)
        split = math.prod(tp_mesh.size(i) for i, q in enumerate(tp_placements) if isinstance(q, Shard) and q.dim == 0)
        rows: Placement = strided_shard(0, split) if split > 1 else Shard(0)
        out.append(
            ParamLayout(
                name,
                tuple(p._local_tensor.shape),
                p.shape,
                tuple(p.stride()),
                meshes[id(tp_mesh)],
                (*groups.placements[:-1], rows, *tp_placements),
                tp_mesh,
                tp_placements,
            )
        )
    return out


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """What fsdp shards of ``p``: a DTensor's local tensor, or ``p`` itself."""
    return p._local_tensor if isinstance(p, DTensor) else p
