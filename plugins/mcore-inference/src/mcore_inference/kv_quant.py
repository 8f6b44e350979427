"""FP8 (E4M3) KV cache: the ``kv_cache_dtype`` option, per-head scales, quantise on append, dequantise on read.

Why it exists: the KV cache is what bounds the batch; storing keys/values as ``float8_e4m3fn`` halves the bytes
of a bf16 block (a quarter of fp32), so the same memory holds twice the blocks. ``PagedKVCache`` quantises what
the layers append and ``PagedAttention`` dequantises the pages it reads; the core protocol is unchanged
(``PagedKV`` carries the fp8 pages, the scales come from the cache's own ``kv_scales``).

Scales: one fp32 scale per layer and key/value head (``(nkv,)`` for keys, another for values), fixed by the
layer's first append outside a static decode step (the first prefill chunk): ``amax(|x|) * MARGIN / 448`` per
head, so that values up to ``MARGIN`` times the first chunk's largest fit; larger ones saturate at +-448. A
fixed scale keeps a page's bytes the same whoever reads them: prefix-cache hits, preemption and recompute,
rollback, CUDA-graph replays (the graphs read the scale tensors, which calibration updates in place). E4M3 has
3 mantissa bits: a value in the normal range is stored with relative error at most 2^-4.

Clipping: values beyond ``MARGIN`` times the calibration chunk's largest saturate. ``quantize`` can count them
into a device counter (no host sync); the cache keeps one per layer (``PagedKVCache.fp8_clipped``) and the
server exports it (``mcore:kv_cache_fp8_clipped_total{layer}``), so a user sees when the first chunk set the
scales too low.

Shape legend: N tokens, nkv heads, d key or value dim.
"""

from __future__ import annotations

import torch

from mcore.errors import UserError

#: E4M3's largest finite value.
FP8_MAX = 448.0
#: Headroom over the first chunk's amax: later tokens up to 4x larger are stored unclipped.
MARGIN = 4.0
#: ``kv_cache_dtype`` values: ``"auto"`` keeps each layer's spec dtype (the model's).
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


def resolve_kv_cache_dtype(value: object) -> torch.dtype | None:
    """``torch.float8_e4m3fn`` for ``"fp8_e4m3"`` (or ``"fp8"``), ``None`` for ``"auto"``; anything else raises."""
    if not isinstance(value, str) or value not in KV_CACHE_DTYPES:
        raise UserError(f"kv_cache_dtype = {value!r}: must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}")
    return KV_CACHE_DTYPES[value]


def calibrate(x: torch.Tensor, out: torch.Tensor) -> None:
    """Set ``out (nkv,)`` fp32 to the per-head scale of ``x (N, nkv, d)``, on the device, without a host sync;
    a head that is all zero gets scale 1."""
    amax = x.detach().abs().amax(dim=(0, 2)).float()  # (nkv,)
    out.copy_(torch.where(amax > 0, amax * (MARGIN / FP8_MAX), torch.ones_like(amax)))


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    *,
    clipped: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (N, nkv, d)`` -> ``round(x / scale)`` saturated to +-448, in ``dtype`` (fp8), ``scale (nkv,)`` fp32.
    ``clipped`` (a 0-d int64 tensor on ``x``'s device): add the number of saturated values to it, in place,
    counting only the rows where ``rows (N,)`` bool is true (``None``: all)."""
    scaled = x.detach().float() / scale[:, None]  # (N, nkv, d)
    clamped = scaled.clamp(-FP8_MAX, FP8_MAX)  # clamp: out-of-range casts are NaN on some devices
    if clipped is not None:
        beyond = clamped != scaled  # (N, nkv, d); NaN inputs count too
        if rows is not None:
            beyond &= rows[:, None, None]
        clipped.add_(beyond.sum())
    return clamped.to(dtype)


def take_pages(pages: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``pages[index]`` (``pages (P, ...)``, ``index`` of block ids), through a byte view for FP8 pages: advanced
    indexing needs no fp8 kernel then, on any device."""
    if pages.dtype == torch.float8_e4m3fn:
        return pages.view(torch.uint8)[index].view(pages.dtype)
    return pages[index]


def dequantize(pages: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Gathered pages ``(..., nkv, d)`` back to ``dtype``: times ``scale (nkv,)`` (``None``: a plain cast)."""
    if scale is None:
        return pages.to(dtype)
    return (pages.float() * scale[:, None]).to(dtype)  # (..., nkv, d)
