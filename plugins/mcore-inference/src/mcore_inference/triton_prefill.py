"""Paged prefill attention in Triton: packed new tokens of several sequences against their cached pages (varlen).

Why it exists: a step with prefill tokens (a chunk of a prompt, a prompt whose prefix the cache already holds)
goes through the torch reference (``attention.paged_attention_torch``), which gathers every sequence's pages into
a padded ``(S, K)`` copy, scatters the queries into ``(S, C)`` rows and runs one masked SDPA: its memory and time
grow with the widest table times the longest chunk of the step. This kernel reads the pages in place through the
block table, only the keys a query tile can see (causal, and within the window when one is given).

Program ``(s, tile, kv head)`` takes ``BLOCK_M`` new tokens of sequence ``s`` and the ``GROUP`` query heads of one
key/value head, flattened into ``BLOCK_M * BLOCK_G`` rows of one ``tl.dot`` (GQA reads each page once per group),
and runs an online softmax in fp32 over the keys from the tile's first visible key to its last query's position.
Masking is ``KVCacheHandle``'s (``attention.py``): query ``j`` of sequence ``i`` (``c_i`` new tokens, ``L_i``
cached once appended) sits at ``L_i - c_i + j`` and sees key ``s`` when ``s <= L_i - c_i + j`` and, with a window
``w``, ``L_i - c_i + j - s < w``; a ``-1`` table entry (a freed block) is never read. The grid is
``(S, ceil(max_seqlen / BLOCK_M), nkv)``; tiles past a sequence's new tokens return at once.

FP8 pages (``kv_quant.py``) as in ``triton_decode.py``: the kernel loads the bytes, converts them to the query's
dtype in registers (exact) and folds the per-head key scale into the score scale and the value scale into the
output. fp32 inputs take ``tl.dot`` at IEEE precision (no TF32), so the kernel matches the torch path to fp32
rounding compiled as in the interpreter. A latent cache (MLA, no value pages) goes to the torch reference.

Imported only on CUDA when triton imports and opted in (``attention.PREFILL_ENV``); tests run it on the CPU through
Triton's interpreter (``TRITON_INTERPRET=1``). Shape legend: N new tokens, S sequences, nh query heads, nkv
key/value heads, G = nh / nkv, hd key dim, hdv value dim, P blocks, bs block size, M table width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcore.errors import UserError
from mcore.protocols.block import PagedKV
from mcore_inference.attention import paged_attention_torch
from mcore_inference.triton_decode import page_operands

_ROWS = 64  # query rows (tokens x heads of a group) per program
_KV_TILE_BYTES = 64 * 1024  # most bytes of one iteration's key and value tiles (two are in flight: num_stages=2)
_ACC_BYTES = 32 * 1024  # fp32 accumulator bytes of a program beyond which it takes 8 warps, not 4


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    cu_ptr,
    table_ptr,
    lens_ptr,
    k_scale_ptr,
    v_scale_ptr,
    stride_qn,
    stride_qh,
    stride_kp,
    stride_kb,
    stride_kh,
    stride_vp,
    stride_vb,
    stride_vh,
    stride_on,
    stride_oh,
    stride_ts,
    table_width,
    scale,
    window,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    VALUE_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    FP8: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    first = tl.load(cu_ptr + seq)
    count = tl.load(cu_ptr + seq + 1) - first  # c_i new tokens
    m_start = tile * BLOCK_M
    if m_start >= count:
        return
    length = tl.load(lens_ptr + seq)  # L_i, the new tokens included
    offset0 = length - count  # position of the first new token
    rows = tl.arange(0, BLOCK_M * BLOCK_G)
    token = m_start + rows // BLOCK_G  # (R,) index among the sequence's new tokens
    g = rows % BLOCK_G
    row_ok = (token < count) & (g < GROUP)
    heads = kv_head * GROUP + g  # (R,)
    qpos = offset0 + token  # (R,) query positions
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    n = tl.arange(0, BLOCK_N)
    q = tl.load(
        q_ptr + (first + token)[:, None].to(tl.int64) * stride_qn + heads[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & (d[None, :] < HEAD_DIM),
        other=0.0,
    )  # (R, BLOCK_D)
    if FP8:  # pages of E4M3 bytes: the key scale joins the score scale, the value scale the output
        scale = scale * tl.load(k_scale_ptr + kv_head)
    hi = tl.minimum(offset0 + m_start + BLOCK_M, length)  # one past the tile's last query position
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(offset0 + m_start - window + 1, 0)  # the first key the tile's first query sees
    m_i = tl.full([BLOCK_M * BLOCK_G], -1.0e30, dtype=tl.float32)  # running max (finite: no inf - inf)
    l_i = tl.zeros([BLOCK_M * BLOCK_G], dtype=tl.float32)  # running sum of exp
    acc = tl.zeros([BLOCK_M * BLOCK_G, BLOCK_DV], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + n  # (BLOCK_N,) key positions
        idx = pos // BLOCK_SIZE
        valid = (pos < hi) & (idx < table_width)
        block = tl.load(table_ptr + seq * stride_ts + idx, mask=valid, other=-1).to(tl.int64)
        valid = valid & (block >= 0)  # a freed block (-1) is never read
        offset = pos % BLOCK_SIZE
        k = tl.load(
            k_ptr + block[:, None] * stride_kp + offset[:, None] * stride_kb + kv_head * stride_kh + d[None, :],
            mask=valid[:, None] & (d[None, :] < HEAD_DIM),
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        if FP8:
            k = k.to(tl.float8e4nv, bitcast=True).to(q.dtype)  # exact in bf16 / fp16 / fp32
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (R, BLOCK_N) fp32
        see = valid[None, :] & (pos[None, :] <= qpos[:, None])  # causal
        if HAS_WINDOW:
            see = see & (qpos[:, None] - pos[None, :] < window)
        scores = tl.where(see, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])  # 0 where unseen (m_new is finite)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + block[:, None] * stride_vp + offset[:, None] * stride_vb + kv_head * stride_vh + dv[None, :],
            mask=valid[:, None] & (dv[None, :] < VALUE_DIM),
            other=0.0,
        )  # (BLOCK_N, BLOCK_DV)
        if FP8:
            v = v.to(tl.float8e4nv, bitcast=True).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # (R, BLOCK_DV); padding rows have no keys
    if FP8:
        out = out * tl.load(v_scale_ptr + kv_head)
    tl.store(
        out_ptr + (first + token)[:, None].to(tl.int64) * stride_on + heads[:, None] * stride_oh + dv[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (dv[None, :] < VALUE_DIM),
    )


def paged_prefill_triton(
    q: torch.Tensor,
    paged: PagedKV,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    value_dim: int,
    scale: float,
    window: int | None,
    *,
    key_scale: torch.Tensor | None = None,
    value_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q (N, nh, hd)`` packed by ``cu_seqlens (S+1,)`` -> ``(N, nh, hdv)`` in ``q``'s dtype, as
    ``paged_attention_torch`` (a ``PagedKernel``). FP8 pages (``float8_e4m3fn``) need ``key_scale`` /
    ``value_scale`` ``(nkv,)``; a latent cache goes to the torch path."""
    if paged.value_cache is None:
        return paged_attention_torch(
            q, paged, cu_seqlens, max_seqlen, value_dim, scale, window, key_scale=key_scale, value_scale=value_scale
        )
    table, lens, dtype = paged.block_table, paged.seq_lens, q.dtype
    ops = page_operands("paged_prefill_triton", q, paged, key_scale, value_scale)
    q, keys, values = ops.q, ops.keys, ops.values
    assert values is not None
    tokens, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = keys.shape
    if heads % kv_heads != 0:
        raise UserError(f"paged_prefill_triton: {heads} query heads are not a multiple of {kv_heads} kv heads")
    group = heads // kv_heads
    out = torch.empty(tokens, heads, value_dim, dtype=dtype, device=q.device)
    seqs = table.shape[0]
    if tokens == 0 or seqs == 0:
        return out
    block_g = triton.next_power_of_2(group)
    block_m = max(1, _ROWS // block_g)
    if block_m * block_g < 16:  # tl.dot needs 16 rows
        block_m = 16 // block_g
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(value_dim))
    key_bytes = keys.element_size() * (block_d + block_dv)  # one key's tile bytes (FP8 pages: loaded as bytes)
    block_n = 64 if 64 * key_bytes <= _KV_TILE_BYTES else 32 if 32 * key_bytes <= _KV_TILE_BYTES else 16
    warps = 8 if block_m * block_g * block_dv * 4 > _ACC_BYTES else 4
    grid = (seqs, triton.cdiv(max(max_seqlen, 1), block_m), kv_heads)
    _prefill_kernel[grid](
        q,
        keys,
        values,
        out,
        cu,
        table,
        lens,
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
        out.stride(0),
        out.stride(1),
        table.stride(0),
        table.shape[1],
        scale,
        window or 0,
        GROUP=group,
        HEAD_DIM=head_dim,
        VALUE_DIM=value_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_G=block_g,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        BLOCK_N=block_n,
        HAS_WINDOW=window is not None,
        FP8=ops.fp8,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps,
        num_stages=2,
    )
    return out
