"""Absorbed MLA decode attention in Triton: one query per sequence against its latent pages, split-K.

Why it exists: a latent (MLA) cache holds one key per token, ``c + dr`` channels (the compressed latent, then the
rotary part), and no value pages: the values are the key's first ``c`` channels. With the up-projections absorbed
into the queries and the output, decode is attention of ``nh`` query heads of ``c + dr`` channels over that single
key head. The torch path (``attention.paged_decode_torch``) gathers the pages into a padded copy, dequantises it
(FP8) and runs SDPA with the values as a slice of the keys; ``triton_decode.py`` serves GQA caches only. This
kernel reads each latent page once for a tile of ``BLOCK_H`` query heads and uses it twice: the scores are
``q[:, :c] @ k[:, :c]^T + q[:, c:] @ k[:, c:]^T`` (the latent part and the rotary part as two ``tl.dot`` of
power-of-two widths: 512 + 64, not 576 padded to 1024) and the output accumulates ``p @ k[:, :c]`` from the tile
already loaded. Split-K over the context, then ``triton_decode``'s log-sum-exp merge; the grid depends only on
shapes, so a CUDA graph captures it. FP8 pages (E4M3, one scale per key head): bytes converted in registers, the
key scale folded into the score scale and the output (the values are the keys).

Opt-in on CUDA (``attention.MLA_DECODE_ENV``); tests run it on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``). Shape legend: S sequences, nh query heads, nkv key heads (1 for MLA), G = nh / nkv,
hd = c + dr key dim, c = hdv value dim, dr = hd - hdv rotary dim, P blocks, bs block size, M table width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcore.errors import UserError
from mcore.protocols.block import PagedKV
from mcore_inference.triton_decode import _num_sms, merge_splits, num_splits, page_operands, split_range

_BLOCK_H = 16  # query heads per program (tl.dot needs 16 rows)
_KV_TILE_BYTES = 32 * 1024  # most bytes of one iteration's key tile


@triton.jit
def _mla_split_kernel(
    q_ptr,
    k_ptr,
    table_ptr,
    lens_ptr,
    mid_ptr,
    lse_ptr,
    k_scale_ptr,
    stride_qs,
    stride_qh,
    stride_kp,
    stride_kb,
    stride_kh,
    stride_ts,
    stride_ms,
    stride_mh,
    stride_mk,
    stride_ls,
    stride_lh,
    scale,
    window,
    GROUP: tl.constexpr,
    VALUE_DIM: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    FP8: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    tiles_per_kv: tl.constexpr = (GROUP + BLOCK_H - 1) // BLOCK_H
    kv_head = tile // tiles_per_kv
    g = (tile % tiles_per_kv) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,) index in the group
    head_ok = g < GROUP
    heads = kv_head * GROUP + g
    length = tl.load(lens_ptr + seq)
    lo, hi = split_range(length, window, split, HAS_WINDOW, BLOCK_N)  # this sequence's keys, cut in K slices
    dv = tl.arange(0, BLOCK_DV)
    dr = tl.arange(0, BLOCK_DR)
    n = tl.arange(0, BLOCK_N)
    q_row = q_ptr + seq * stride_qs + heads[:, None] * stride_qh
    q_main = tl.load(q_row + dv[None, :], mask=head_ok[:, None] & (dv[None, :] < VALUE_DIM), other=0.0)
    q_rope = tl.load(
        q_row + VALUE_DIM + dr[None, :], mask=head_ok[:, None] & (dr[None, :] < ROPE_DIM), other=0.0
    )  # (BLOCK_H, BLOCK_DR); all zero when ROPE_DIM == 0
    if FP8:  # latent pages of E4M3 bytes: the key scale joins the score scale and the output
        k_scale = tl.load(k_scale_ptr + kv_head)
        scale = scale * k_scale
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)  # running max (finite: no inf - inf)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + n  # (BLOCK_N,) key positions
        valid = pos < hi
        block = tl.load(table_ptr + seq * stride_ts + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        valid = valid & (block >= 0)  # a freed block (-1) is never read
        row = k_ptr + block[:, None] * stride_kp + (pos % BLOCK_SIZE)[:, None] * stride_kb + kv_head * stride_kh
        k_main = tl.load(row + dv[None, :], mask=valid[:, None] & (dv[None, :] < VALUE_DIM), other=0.0)
        k_rope = tl.load(row + VALUE_DIM + dr[None, :], mask=valid[:, None] & (dr[None, :] < ROPE_DIM), other=0.0)
        if FP8:
            k_main = k_main.to(tl.float8e4nv, bitcast=True).to(q_main.dtype)  # exact in bf16 / fp16 / fp32
            k_rope = k_rope.to(tl.float8e4nv, bitcast=True).to(q_main.dtype)
        scores = tl.dot(q_main, tl.trans(k_main), input_precision=PRECISION)  # (BLOCK_H, BLOCK_N) fp32
        scores = tl.dot(q_rope, tl.trans(k_rope), scores, input_precision=PRECISION) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_main.dtype), k_main, input_precision=PRECISION)  # values: k_main
        m_i = m_new
    has_keys = l_i > 0  # an empty split (past the length, or before the window) has none
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if FP8:
        out = out * k_scale
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    tl.store(
        mid_ptr + seq * stride_ms + heads[:, None] * stride_mh + split * stride_mk + dv[None, :],
        out,
        mask=head_ok[:, None] & (dv[None, :] < VALUE_DIM),
    )
    tl.store(lse_ptr + seq * stride_ls + heads * stride_lh + split, lse, mask=head_ok)


def paged_mla_decode_triton(
    q: torch.Tensor,
    paged: PagedKV,
    value_dim: int,
    scale: float,
    window: int | None,
    *,
    key_scale: torch.Tensor | None = None,
    value_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q (S, nh, hd)`` over a latent cache (no value pages; values are the keys' first ``hdv`` channels) ->
    ``(S, nh, hdv)`` in ``q``'s dtype, as ``paged_decode_torch``. FP8 pages need ``key_scale`` ``(nkv,)``
    (``value_scale`` is unread: the values are the keys)."""
    keys, table, lens = paged.key_cache, paged.block_table, paged.seq_lens
    if paged.value_cache is not None:
        raise UserError("paged_mla_decode_triton: the cache has value pages; it serves latent (MLA) caches only")
    seqs, heads, head_dim = q.shape
    _, block_size, kv_heads, key_dim = keys.shape
    if key_dim != head_dim or not 0 < value_dim <= head_dim or heads % kv_heads != 0:
        raise UserError(
            f"paged_mla_decode_triton: q (S, {heads}, {head_dim}) over latent pages of {kv_heads} heads x {key_dim} "
            f"with value_dim {value_dim}: needs equal key dims, 0 < value_dim <= head dim and nh a multiple of nkv"
        )
    dtype = q.dtype
    ops = page_operands("paged_mla_decode_triton", q, paged, key_scale, None)
    q, keys = ops.q, ops.keys
    group = heads // kv_heads
    tiles = kv_heads * triton.cdiv(group, _BLOCK_H)
    max_keys = table.shape[1] * block_size
    splits = num_splits(seqs * tiles, max_keys, _num_sms(q.device))
    block_dv = max(16, triton.next_power_of_2(value_dim))
    block_dr = max(16, triton.next_power_of_2(head_dim - value_dim))
    key_bytes = keys.element_size() * (block_dv + block_dr)
    block_n = 64 if 64 * key_bytes <= _KV_TILE_BYTES else 32 if 32 * key_bytes <= _KV_TILE_BYTES else 16
    mid = torch.empty(seqs, heads, splits, value_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(seqs, heads, splits, dtype=torch.float32, device=q.device)
    out = torch.empty(seqs, heads, value_dim, dtype=dtype, device=q.device)
    _mla_split_kernel[(seqs, tiles, splits)](
        q,
        keys,
        table,
        lens,
        mid,
        lse,
        ops.key_scale,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        table.stride(0),
        mid.stride(0),
        mid.stride(1),
        mid.stride(2),
        lse.stride(0),
        lse.stride(1),
        scale,
        window or 0,
        GROUP=group,
        VALUE_DIM=value_dim,
        ROPE_DIM=head_dim - value_dim,
        BLOCK_SIZE=block_size,
        BLOCK_H=_BLOCK_H,
        BLOCK_DV=block_dv,
        BLOCK_DR=block_dr,
        BLOCK_N=block_n,
        HAS_WINDOW=window is not None,
        FP8=ops.fp8,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=8 if _BLOCK_H * block_dv * 4 > 16 * 1024 else 4,
        num_stages=2,
    )
    return merge_splits(mid, lse, out, block_dv)
