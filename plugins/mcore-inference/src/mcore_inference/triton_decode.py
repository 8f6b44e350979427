"""Paged decode attention in Triton: one query per sequence against its pages, GQA, split-K over long contexts.

Why it exists: a decode step reads each sequence's whole cache once; the torch reference (``attention.py``)
gathers the pages into a padded copy first and masks by the lengths, which costs a copy of every table's width.
This kernel reads the pages in place, up to each sequence's length only, and fills the GPU at small batch with
split-K: program ``(s, kv head, split)`` attends the ``GROUP`` query heads of one key/value head over one
slice of the context (online softmax), writing a partial output and its log-sum-exp; a second kernel merges
the slices (with one slice, the first kernel writes the output itself: one launch). The grid depends only on
shapes (the number of splits comes from the table's width), so a CUDA graph captures it; the slices come from
each sequence's own length (in the kernel: K slices of ``ceil(L / K)`` keys rounded up to a key tile), so a short
sequence in a wide table (a static step's table padded to the longest length it may reach, or a batch with one
long sequence) still spreads its keys over several programs instead of leaving them all to the first slice.

FP8 pages (``kv_cache_dtype="fp8_e4m3"``, ``kv_quant.py``): the kernel loads the pages' bytes, turns them into
the query's dtype in registers (exact: every E4M3 value is a bf16, fp16 and fp32 value) and folds the per-head
scales in where they cost nothing: the key scale into the score scale, the value scale into the split's output.
So an FP8 step reads a quarter of an fp32 cache's bytes (half a bf16 one's) and accumulates in fp32 as the
others do. A latent cache (MLA, no value pages), FP8 or not, goes to the torch reference
(``paged_decode_torch``), which dequantises the gathered pages first.

Imported only on CUDA when triton imports (``attention.decode_kernel_for``); tests run it on the CPU through
Triton's interpreter (``TRITON_INTERPRET=1``). Shape legend: S sequences, nh query heads, nkv key/value heads,
G = nh / nkv, hd key dim, hdv value dim, P blocks, bs block size, M table width, K splits.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mcore.errors import UserError
from mcore.protocols.block import PagedKV
from mcore_inference.attention import paged_decode_torch

_BLOCK_N = 64  # keys per inner iteration
_MIN_SPLIT = 64  # splits: at most the table's width over this (swept on an H100: sweep_decode_splits.py)
_NUM_WARPS = 4  # of the split kernel (benchmarks/device/sweep_decode_splits.py sweeps these three)


@triton.jit
def split_range(length, window, split, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys ``[lo, hi)`` of split ``split`` (of ``tl.num_programs(2)``): the sequence's keys ``[first, length)``
    cut in that many slices of whole ``BLOCK_N`` tiles (the last ones may be empty); ``first`` is 0, or with a
    window the first key inside it (keys ``window`` or more back are never read: their blocks may be freed)."""
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(length - window, 0)
    per_split = tl.cdiv(tl.cdiv(length - first, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    lo = first + split * per_split
    return lo, tl.minimum(lo + per_split, length)


@triton.jit
def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    lens_ptr,
    mid_ptr,
    lse_ptr,
    k_scale_ptr,
    v_scale_ptr,
    stride_qs,
    stride_qh,
    stride_kp,
    stride_kb,
    stride_kh,
    stride_vp,
    stride_vb,
    stride_vh,
    stride_ts,
    stride_ms,
    stride_mh,
    stride_mk,
    stride_ls,
    stride_lh,
    scale,
    window,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    VALUE_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    FP8: tl.constexpr,
    DIRECT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lens_ptr + seq)
    lo, hi = split_range(length, window, split, HAS_WINDOW, BLOCK_N)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + g  # (BLOCK_G,) query heads of this key/value head
    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + d[None, :],
        mask=(g[:, None] < GROUP) & (d[None, :] < HEAD_DIM),
        other=0.0,
    )  # (BLOCK_G, BLOCK_D)
    if FP8:  # pages of E4M3 bytes: the key scale joins the score scale, the value scale the output
        scale = scale * tl.load(k_scale_ptr + kv_head)
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)  # running max (finite: no inf - inf)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of exp
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + n  # (BLOCK_N,) key positions
        valid = pos < hi
        block = tl.load(table_ptr + seq * stride_ts + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        valid = valid & (block >= 0)  # a freed block (-1) is never read
        offset = pos % BLOCK_SIZE
        k = tl.load(
            k_ptr + block[:, None] * stride_kp + offset[:, None] * stride_kb + kv_head * stride_kh + d[None, :],
            mask=valid[:, None] & (d[None, :] < HEAD_DIM),
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        if FP8:
            k = k.to(tl.float8e4nv, bitcast=True).to(q.dtype)  # exact in bf16 / fp16 / fp32
        scores = tl.dot(q, tl.trans(k)) * scale  # (BLOCK_G, BLOCK_N) fp32
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + block[:, None] * stride_vp + offset[:, None] * stride_vb + kv_head * stride_vh + dv[None, :],
            mask=valid[:, None] & (dv[None, :] < VALUE_DIM),
            other=0.0,
        )  # (BLOCK_N, BLOCK_DV)
        if FP8:
            v = v.to(tl.float8e4nv, bitcast=True).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has_keys = l_i > 0  # an empty split (past the length, or before the window) has none
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if FP8:
        out = out * tl.load(v_scale_ptr + kv_head)
    head_ok = g < GROUP
    tl.store(  # DIRECT (one split): the output itself, in its dtype; else the split's fp32 partial
        mid_ptr + seq * stride_ms + heads[:, None] * stride_mh + split * stride_mk + dv[None, :],
        out.to(mid_ptr.dtype.element_ty),
        mask=head_ok[:, None] & (dv[None, :] < VALUE_DIM),
    )
    if not DIRECT:
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + seq * stride_ls + heads * stride_lh + split, lse, mask=head_ok)


@triton.jit
def _merge_kernel(
    mid_ptr,
    lse_ptr,
    out_ptr,
    num_splits,
    stride_ms,
    stride_mh,
    stride_mk,
    stride_ls,
    stride_lh,
    stride_os,
    stride_oh,
    VALUE_DIM: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    k = tl.arange(0, BLOCK_K)
    dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(lse_ptr + seq * stride_ls + head * stride_lh + k, mask=k < num_splits, other=float("-inf"))
    weights = tl.exp(lse - tl.max(lse, 0))  # (BLOCK_K,), 0 for empty splits; at least one split has a key
    part = tl.load(
        mid_ptr + seq * stride_ms + head * stride_mh + k[:, None] * stride_mk + dv[None, :],
        mask=(k[:, None] < num_splits) & (dv[None, :] < VALUE_DIM),
        other=0.0,
    )  # (BLOCK_K, BLOCK_DV)
    out = tl.sum(weights[:, None] * part, 0) / tl.sum(weights, 0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + dv, out.to(out_ptr.dtype.element_ty), mask=dv < VALUE_DIM)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter (tests on the CPU): an H100's count
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(programs: int, max_keys: int, sms: int) -> int:
    """Splits of a context of up to ``max_keys`` keys so that ``programs`` (S * nkv) fill about two waves of
    ``sms``; at most ``max_keys / _MIN_SPLIT`` of them (each sequence's keys are then cut in as many slices)."""
    wanted = math.ceil(2 * sms / max(programs, 1))
    return max(1, min(wanted, math.ceil(max_keys / _MIN_SPLIT)))


@dataclass(frozen=True)
class PageOperands:
    """What a paged kernel reads (``page_operands``): ``q`` in the pages' dtype (as given over FP8 pages) with
    a contiguous last dim, the pages (FP8 ones as their bytes), the per-head scales (``lens`` as an unread
    placeholder when the pages are not FP8) and whether they are."""

    q: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor | None
    key_scale: torch.Tensor
    value_scale: torch.Tensor
    fp8: bool


def page_operands(
    who: str,
    q: torch.Tensor,
    paged: PagedKV,
    key_scale: torch.Tensor | None,
    value_scale: torch.Tensor | None,
) -> PageOperands:
    """The operands of ``who``'s launch over ``paged`` (``PageOperands``); FP8 pages (``float8_e4m3fn``) need
    ``key_scale`` ``(nkv,)``, and ``value_scale`` too when there are value pages."""
    keys, values, lens = paged.key_cache, paged.value_cache, paged.seq_lens
    fp8 = keys.dtype == torch.float8_e4m3fn
    if fp8:
        if key_scale is None or (values is not None and (value_scale is None or values.dtype != keys.dtype)):
            raise UserError(f"{who}: FP8 pages need their per-head scales: key_scale (and value_scale) of shape (nkv,)")
        keys = keys.view(torch.uint8)  # bytes; decoded in the kernel
        values = None if values is None else values.view(torch.uint8)
        k_scale = key_scale.float().contiguous()
        v_scale = value_scale.float().contiguous() if value_scale is not None else lens
    else:
        q = q.to(keys.dtype)  # (the pages' dtype: tl.dot takes one)
        k_scale = v_scale = lens  # unread
    if q.stride(-1) != 1:
        q = q.contiguous()
    return PageOperands(q, keys, values, k_scale, v_scale, fp8)


def merge_splits(mid: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, block_dv: int) -> torch.Tensor:
    """``out (S, nh, hdv)``: the split-K partial outputs ``mid (S, nh, K, hdv)`` merged by their log-sum-exps
    ``lse (S, nh, K)`` (``_merge_kernel``)."""
    seqs, heads, splits, value_dim = mid.shape
    _merge_kernel[(seqs, heads)](
        mid,
        lse,
        out,
        splits,
        mid.stride(0),
        mid.stride(1),
        mid.stride(2),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        VALUE_DIM=value_dim,
        BLOCK_DV=block_dv,
        BLOCK_K=max(2, triton.next_power_of_2(splits)),
    )
    return out


def paged_decode_triton(
    q: torch.Tensor,
    paged: PagedKV,
    value_dim: int,
    scale: float,
    window: int | None,
    *,
    key_scale: torch.Tensor | None = None,
    value_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q (S, nh, hd)`` -> ``(S, nh, hdv)`` in ``q``'s dtype, as ``paged_decode_torch``. FP8 pages
    (``float8_e4m3fn``) need ``key_scale`` / ``value_scale`` ``(nkv,)`` fp32; a latent cache goes to the torch path."""
    if paged.value_cache is None:
        return paged_decode_torch(q, paged, value_dim, scale, window, key_scale=key_scale, value_scale=value_scale)
    table, lens, dtype = paged.block_table, paged.seq_lens, q.dtype
    ops = page_operands("paged_decode_triton", q, paged, key_scale, value_scale)
    q, keys, values = ops.q, ops.keys, ops.values
    assert values is not None
    seqs, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = keys.shape
    group = heads // kv_heads
    max_keys = table.shape[1] * block_size
    splits = num_splits(seqs * kv_heads, max_keys, _num_sms(q.device))
    out = torch.empty(seqs, heads, value_dim, dtype=dtype, device=q.device)
    direct = splits == 1  # one split writes the output itself: no partials, no merge launch
    if direct:
        mid, lse = out[:, :, None], out  # (S, nh, 1, hdv) view of the output; lse unread
    else:
        mid = torch.empty(seqs, heads, splits, value_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(seqs, heads, splits, dtype=torch.float32, device=q.device)
    block_dv = max(16, triton.next_power_of_2(value_dim))
    _split_kernel[(seqs, kv_heads, splits)](
        q,
        keys,
        values,
        table,
        lens,
        mid,
        lse,
        ops.key_scale,
        ops.value_scale,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        table.stride(0),
        mid.stride(0),
        mid.stride(1),
        mid.stride(2),
        lse.stride(0),
        lse.stride(1),
        scale,
        window or 0,
        GROUP=group,
        HEAD_DIM=head_dim,
        VALUE_DIM=value_dim,
        BLOCK_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_DV=block_dv,
        BLOCK_N=_BLOCK_N,
        HAS_WINDOW=window is not None,
        FP8=ops.fp8,
        DIRECT=direct,
        num_warps=_NUM_WARPS,
    )
    return out if direct else merge_splits(mid, lse, out, block_dv)
