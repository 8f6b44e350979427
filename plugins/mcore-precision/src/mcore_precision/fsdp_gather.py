"""FSDP's all-gather of a quantised linear's weight in the linear's own format (``PrecisionRecipe.gather_payload``
/ ``unpack``), and the operands its GEMMs read from the gathered bytes (``mcore.precision.quantized``).

Why: a sharded weight gathered in bf16 and quantised by the linear moves 2 bytes per element and quantises the
whole weight on every rank; gathered quantised it moves 1 (FP8, MXFP8) or 1/2 (NVFP4) byte plus scales, each
rank quantises only its shard, and the GEMM reads the gathered codes directly (``QuantizedWeight``; no
dequantised buffer, no second quantisation in the linear).

Shape legend: F output features (the weight's rows, the dim FSDP splits), K input features; ``rows`` the
rows of one rank's padded shard (``ceil(F / N)``, zero padding on the last ranks), N the shard group's size.

Every payload tensor is gathered along dim 0, so each rank's piece must be the same quantisation of its rows
as the whole weight's would be:

* per-tensor FP8 (``TensorScheme``: ``fp8-current``, ``fp8-delayed``): the scale comes from the GLOBAL amax,
  an all-reduce (max) of the shard's amax over the shard group (``global_amaxes``: the group is read off the
  linear's sharded ``DTensor`` weight); ``fp8-delayed`` records that amax in its weight history, as a single
  process records the whole weight's. Payload ``(codes (rows, K) uint8, scale (1,))``. ``payloads`` serves
  FSDP's batch (a recipe's ``gather_payloads``): the amaxes of all the unit's weights stacked into one tensor,
  ONE all-reduce per unit gather instead of one per weight (max is exact in any order: the same bytes).
* ``fp8-blockwise`` (``tile`` x ``tile`` weight blocks), MXFP8 (1x32 blocks along K for the forward copy, 32x1
  along F for the backward one: the row- and column-wise copies, both gathered, E8M0 scales as bytes) and NVFP4 (16x16 weight blocks, plus the fp32
  tensor scale from the global amax): a block must never be cut by a shard boundary, so the weight is gathered
  quantised only when ``rows`` is a multiple of the block height (or the weight is kept whole on one rank);
  otherwise that weight falls back to the plain high-precision gather (``gather_payload`` answers ``None``; the
  linear quantises the gathered weight itself, the results are the same) and the recipe warns once per weight.
  NVFP4 codes travel packed, two E2M1 codes per byte.
* ``fp8-rowwise``: its backward quantises the weight per column (across all ranks' rows): gathered plainly.

A payload depends on the shard's values only through the global amax, so the gathered weight equals the one a
single process quantises from the whole weight, byte for byte. Emulated GEMMs then give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from mcore.precision.quantized import QuantizedWeight
from mcore.protocols.precision import GatherPayload
from mcore_precision import kernels
from mcore_precision.formats import E4M3
from mcore_precision.mx import MX_BLOCK, MXTensor, mx_quantize, pow2
from mcore_precision.nvfp4 import E2M1_GRID, NVFP4_BLOCK, NVFP4Tensor, nvfp4_quantize
from mcore_precision.scaling import BlockwiseScheme, FP8Tensor, MXScheme, NVFP4Scheme, Quantized, TensorScheme

__all__ = [
    "GatherLayout",
    "Request",
    "block_rows",
    "dequantize",
    "global_amax",
    "global_amaxes",
    "operands",
    "payload",
    "payloads",
    "unpack",
]

Kind = Literal["tensor", "block", "mx", "nvfp4"]


@dataclass(frozen=True)
class GatherLayout:
    """The metadata of a gathered weight: its format (``kind``), K, the fp8 code dtype, the block height
    (``block``: ``tile`` for blockwise FP8, 32 for MXFP8, 16 for NVFP4, 1 per tensor) and its own dtype."""

    kind: Kind
    k: int
    codes: torch.dtype
    block: int
    dtype: torch.dtype


def block_rows(scheme: Any) -> int | None:
    """The row alignment a shard needs for ``scheme``'s weight blocks (1: any), or ``None``: not gathered
    quantised (a scheme whose weight copies span the rows of every rank)."""
    if isinstance(scheme, TensorScheme):
        return 1
    if isinstance(scheme, BlockwiseScheme):
        return scheme.tile
    if isinstance(scheme, MXScheme):
        return MX_BLOCK
    if isinstance(scheme, NVFP4Scheme):
        return NVFP4_BLOCK
    return None


def _shard_groups(weight: torch.Tensor) -> list[Any]:
    """The process groups of the mesh dims on which ``weight`` (a sharded ``DTensor``) is split; none for a plain
    tensor (one process, a probe before sharding, a weight kept whole: whole already)."""
    mesh, placements = getattr(weight, "device_mesh", None), getattr(weight, "placements", ())
    if mesh is None:
        return []
    return [mesh.get_group(d) for d, p in enumerate(placements) if p.is_shard()]


def global_amaxes(local: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The amax of each whole weight from this shard's ``local[i]`` amax (0-d fp32): the max over the mesh dims on
    which ``weights[i]`` (a linear's sharded ``DTensor``) is split; a NaN on any rank stays NaN. Weights split
    over the same groups share one all-reduce per group (their amaxes stacked: ``(2, M)``), so every rank must
    ask for the same weights in the same order (FSDP's unit does)."""
    out = list(local)
    batches: dict[tuple[int, ...], tuple[list[Any], list[int]]] = {}
    for i, weight in enumerate(weights):
        groups = _shard_groups(weight)
        if groups:
            batches.setdefault(tuple(id(g) for g in groups), (groups, []))[1].append(i)
    for groups, members in batches.values():
        amax = torch.stack([out[i] for i in members])  # (M,)
        packed = torch.stack([torch.nan_to_num(amax, nan=0.0), torch.isnan(amax).float()])  # (2, M): amax, NaN seen
        for group in groups:
            dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
        result = torch.where(packed[1] > 0, torch.full_like(packed[0], float("nan")), packed[0])  # (M,)
        for j, i in enumerate(members):
            out[i] = result[j]
    return out


def global_amax(local: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``global_amaxes`` of one weight (one all-reduce per mesh dim it is split on)."""
    return global_amaxes([local], [weight])[0]


def _amax(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)


def _needs_global_amax(scheme: Any, whole: bool, probe: bool) -> bool:
    return not (whole or probe) and isinstance(scheme, (TensorScheme, NVFP4Scheme))


@dataclass(frozen=True)
class Request:
    """One weight's ``payload`` arguments, for ``payloads``."""

    scheme: Any
    shard: torch.Tensor
    weight: torch.Tensor
    whole: bool
    probe: bool = False


def payloads(requests: Sequence[Request | None]) -> list[GatherPayload | None]:
    """``payload`` of each request (``None`` answers ``None``), the global amaxes of all those that need one in a
    single all-reduce (``global_amaxes``; a unit's weights share their shard group): the same bytes as one
    ``payload`` call each. Collective: every rank of the group passes the same weights in the same order."""
    chosen = [
        (i, r) for i, r in enumerate(requests) if r is not None and _needs_global_amax(r.scheme, r.whole, r.probe)
    ]
    amaxes = global_amaxes([_amax(r.shard) for _, r in chosen], [r.weight for _, r in chosen])
    given = {i: amax for (i, _), amax in zip(chosen, amaxes)}
    return [
        None if r is None else payload(r.scheme, r.shard, r.weight, whole=r.whole, probe=r.probe, amax=given.get(i))
        for i, r in enumerate(requests)
    ]


def payload(
    scheme: Any,
    shard: torch.Tensor,
    weight: torch.Tensor,
    *,
    whole: bool,
    probe: bool = False,
    amax: torch.Tensor | None = None,
) -> GatherPayload:
    """The gathered form of ``shard (rows, K)`` (module docstring) for ``scheme`` (``block_rows`` not ``None``;
    the caller checked the alignment). ``weight``: the linear's parameter (its mesh gives the amax's group);
    ``whole``: the shard is the whole weight (no all-reduce); ``probe``: FSDP asks for shapes only (no
    collective, no scaler state touched); ``amax``: the weight's global amax, already all-reduced (``payloads``)."""
    rows, k = shard.shape

    def amax_of() -> torch.Tensor:  # read only by the formats with a per-tensor scale
        if amax is not None:
            return amax
        return _amax(shard) if whole or probe else global_amax(_amax(shard), weight)

    if isinstance(scheme, TensorScheme):
        scaler = scheme.scalers["weight"]
        scale = torch.ones((), device=shard.device) if probe else scaler.scale_of_amax(amax_of())  # type: ignore[attr-defined]
        q, _, s, _, _ = kernels.quantize_tensorwise(shard, scaler.fmt, scale=scale)  # (rows, K) fp8, ()
        layout = GatherLayout("tensor", k, q.dtype, 1, shard.dtype)
        return GatherPayload(tensors=(q.view(torch.uint8), s.reshape(1)), metadata=layout)
    if isinstance(scheme, BlockwiseScheme):
        tile = scheme.tile
        q, s = kernels.quantize_blockwise(shard, E4M3, (tile, tile), scheme.margin)  # (rows, K), (rows/tile, K/tile)
        layout = GatherLayout("block", k, q.dtype, tile, shard.dtype)
        return GatherPayload(tensors=(q.view(torch.uint8), s), metadata=layout)
    if isinstance(scheme, MXScheme):
        fmt = scheme.fmts["weight"]
        rowwise = mx_quantize(shard, fmt, scheme.rounding)  # (rows, K), (rows, K/32): the forward copy
        colwise = mx_quantize(shard.t(), fmt, scheme.rounding)  # (K, rows), (K, rows/32): dgrad's w.T copy
        tensors = (
            rowwise.data.view(torch.uint8),
            _e8m0(rowwise.scale),
            colwise.data.t().contiguous().view(torch.uint8),  # (rows, K): gathered along the rows
            _e8m0(colwise.scale.t().contiguous()),  # (rows/32, K)
        )
        return GatherPayload(tensors=tensors, metadata=GatherLayout("mx", k, rowwise.data.dtype, MX_BLOCK, shard.dtype))
    if isinstance(scheme, NVFP4Scheme):
        # the tensor scale from the global amax: one extra 16-row block holding it (its own blocks, dropped)
        top = torch.zeros(NVFP4_BLOCK, k, dtype=shard.dtype, device=shard.device)
        top[0, 0] = amax_of().to(shard.dtype)
        q = nvfp4_quantize(torch.cat([shard, top]), (NVFP4_BLOCK, NVFP4_BLOCK))
        scales = q.block_scale[: rows // NVFP4_BLOCK]  # (rows/16, K/16) e4m3
        packed = (_pack_e2m1(q.data[:rows]), scales.view(torch.uint8), q.global_scale.reshape(1))
        return GatherPayload(tensors=packed, metadata=GatherLayout("nvfp4", k, scales.dtype, NVFP4_BLOCK, shard.dtype))
    raise TypeError(f"fsdp_gather.payload: scheme {type(scheme).__name__} is not gathered quantised")


def unpack(gathered: tuple[torch.Tensor, ...], metadata: GatherLayout) -> QuantizedWeight:
    """The gathered payload as a ``QuantizedWeight`` (rows: the padded ``N * rows``; the layout sets ``shape``)."""
    rows = gathered[0].shape[0]
    return QuantizedWeight(
        tensors=tuple(gathered), metadata=metadata, shape=torch.Size((rows, metadata.k)), dtype=metadata.dtype
    )


def operands(weight: QuantizedWeight) -> tuple[Quantized, Quantized | None]:
    """The forward GEMM's weight operand ``(F, K)`` read from ``weight``'s gathered codes, and dgrad's ``(K, F)``
    when it is its own copy (MXFP8's column-wise one; ``None``: the forward operand's transpose serves)."""
    layout: GatherLayout = weight.metadata
    f, k = weight.shape[0], layout.k
    blocks = -(-f // layout.block)  # block rows of the used rows
    t = weight.tensors
    if layout.kind == "tensor":
        return FP8Tensor(t[0][:f].view(layout.codes), t[1][0], None), None
    if layout.kind == "block":
        return FP8Tensor(t[0][:f].view(layout.codes), t[1][:blocks], (layout.block, layout.block)), None
    if layout.kind == "mx":
        rowwise = MXTensor(t[0][:f].view(layout.codes), _from_e8m0(t[1][:f]))
        colwise = MXTensor(t[2][:f].view(layout.codes).t(), _from_e8m0(t[3][:blocks]).t())  # (K, F), (K, F/32)
        return rowwise, colwise
    values = _unpack_e2m1(t[0][:f], k)  # (F, K) fp32
    return NVFP4Tensor(values, t[1][:blocks].view(layout.codes), t[2][0], (NVFP4_BLOCK, NVFP4_BLOCK)), None


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    """The weight's rows in high precision (``weight.dtype``), from the gathered codes: for checks and tools."""
    forward, _ = operands(weight)
    return forward.dequantize()[: weight.shape[0]].to(weight.dtype)


# -- E8M0 scale bytes: ``2**k`` as ``k + 127``, 255 for NaN --------------------------------------------------------
def _e8m0(scale: torch.Tensor) -> torch.Tensor:
    """MXFP8's fp32 ``2**k`` scales (``k`` in ``[-127, 127]``, or NaN) as E8M0 bytes (uint8)."""
    k = torch.frexp(scale).exponent - 1  # exact, subnormal 2**-127 included
    return torch.where(torch.isnan(scale), 255, k + 127).to(torch.uint8)


def _from_e8m0(codes: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_e8m0``: fp32 ``2**(code - 127)``, NaN for 255."""
    scale = pow2((codes.int() - 127).float())  # exact on CUDA too (``mx.pow2``)
    return torch.where(codes == 255, torch.full_like(scale, float("nan")), scale)


# -- E2M1 codes: sign bit and grid index, two per byte along K --------------------------------------------------
def _pack_e2m1(values: torch.Tensor) -> torch.Tensor:
    """``values (M, K)`` on the E2M1 grid (fp32; NaN only in blocks whose scale is NaN, which read NaN anyway)
    -> ``(M, ceil(K/2))`` uint8, the even column in the low nibble."""
    grid = torch.tensor(E2M1_GRID, device=values.device)
    magnitude = torch.nan_to_num(values.abs(), nan=0.0)
    index = torch.bucketize(magnitude, grid)  # exact grid values: their own index
    codes = (index | (torch.signbit(values).long() << 3)).to(torch.uint8)  # (M, K)
    codes = torch.nn.functional.pad(codes, (0, codes.shape[1] % 2))  # (M, K'): K' even
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _unpack_e2m1(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of ``_pack_e2m1``: ``(M, ceil(K/2))`` uint8 -> ``(M, K)`` fp32 values."""
    grid = torch.tensor(E2M1_GRID, device=packed.device)
    table = torch.cat([grid, -grid])  # code -> value (code 8: -0.0)
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1)[:, :k]  # (M, K)
    return table[codes.long()]
