"""Triton forward kernels of the chunked gated delta rule (chunk 64, fp32 state); imported only on CUDA.

Shape legend: N flattened tokens, S segments (``mcore_ssm.packing``), M chunks, hk query/key heads, hv value
heads, dk key dim, dv value dim, C = 64 chunk, BK dk padded to a power of two, BV a
block of the value dims.

The math is ``mcore_ssm.gdn_reference.chunk_gated_delta_rule`` (its docstring derives it). Chunks never
straddle segments: each segment is cut into its own chunks, and the rows of a chunk past its segment's end
load as zeros (``k = v = q = 0``, ``beta = g = 0``: inert; their ``G`` is the chunk's last, ``G_C``). Every exp
takes a non-positive argument (``G`` falls along a chunk; masked entries are set to ``-inf`` before the exp), so
a strong decay underflows to 0 and never overflows into ``inf * 0 = NaN``. Three kernels; only the second walks
the chunks in order, and it does nothing but the state recurrence:

1. ``_chunk_wy_kernel``, one program per (chunk, value head): ``G = cumsum(g)``, ``A = tril_{-1}(diag(beta) K K^T *
   exp(G_i - G_j))`` (``tl.dot`` on the inputs' dtype, fp32 accumulate), ``T = (I + A)^-1`` by doubling the
   inverted diagonal blocks, 1 -> 2 -> ... -> 64 (``_double``: five levels of two ``(C, C)`` dots after the first;
   exact, a reordered triangular solve, where the old row-by-row substitution took 64 dependent steps; no power
   series, which cancels badly when keys repeat; opt-in ``MCORE_SSM_GDN_INVERSE=blocks16``: the four diagonal 16 x 16
   blocks by forward substitution in fp32 registers, then only the levels 16 -> 32 -> 64, ``_unit_lower_inverse``),
   then the WY factors ``W = T diag(beta exp(G)) K`` and ``U~ = T diag(beta) V`` by dots, stored in the scratch
   dtype (the inputs' for 16-bit inputs, else fp32) with ``G`` (fp32). The inverse and the factors' dots run in
   tf32 for 16-bit inputs: in an fp32 emulation of tf32 rounding (2026-12-06, 256 chunks of dk 128 bench-like
   inputs), W came out 2e-4 relative off (4e-4 with keys repeated), against 1.7e-3 with T rounded to bf16 and 2e-8
   in fp32.
2. ``_chunk_state_kernel``, one program per (segment, value head, block of BV value dims): the columns of the
   state ``S (dk, dv)`` evolve independently (``u = beta (v - S^T k)`` is per value column), so a program holds
   ``S[:, block]`` in registers in fp32 and walks its segment's chunks in order, storing the state entering
   each chunk (scratch dtype, or fp32 when asked) and ``U = U~ - W S``; then ``S = exp(G_C) S + K~^T U`` with
   ``K~ = exp(G_C - G) K``. By default (``MCORE_SSM_GDN_FWD`` unset or ``v2``; dk <= 128) the forward runs
   ``mcore_ssm.gdn_triton_state_v2`` here instead, and kernel 1 ``narrow`` (``W`` by 64 key columns, 4 warps): same
   results, fewer registers; ``MCORE_SSM_GDN_FWD=v1`` (and dk > 128) runs this kernel and kernel 1 at full width.
3. ``_chunk_output_kernel``, one program per (chunk, value head, block of value dims), all in parallel:
   ``O = scale ((exp(G) Q) S_in + tril(Q K^T * exp(G_i - G_j)) U)``, stored in the inputs' dtype.

``K K^T`` and the dots of kernels 2 and 3 take 16-bit operands (fp32 accumulate) when the inputs are 16-bit; all
dots run in fp32 (``ieee``) for fp32 inputs; the backward asks for fp32 factors and states (tf32 dots for 16-bit
inputs, with ``MCORE_SSM_GDN_BWD_SCRATCH=fp32``; the inputs' 16-bit dtype by default, ``inputs``; the walk's launch
order by ``MCORE_SSM_GDN_WALK_ORDER``, ``gdn_triton_state_v2``). Work per (chunk, value head), dk = dv = d: kernel 1
``2 C^2 d`` (A) + ``20 C^3`` (T, tf32; ``8 C^3`` with blocks16) + ``4 C^2 d`` (W, U, tf32), kernel 2 ``4 C d^2``, kernel 3 ``2 C d^2 + 4 C^2 d``; scratch
``W, U~, U`` (``N hv d`` each) and the chunk states (``M hv d^2``) in the scratch dtype. Block sizes, warps and
stages of kernels 2 and 3 are autotuned on CUDA over a few configs (a config over the shared memory of the card is
skipped by the autotuner); Triton's interpreter takes fixed ones. Backward (``gated_delta_rule_triton`` is an
``autograd.Function``): ``mcore_ssm.gdn_triton_bwd``, which reruns kernels 1 and 2 in fp32 for the factors and the
chunk states (the same version the forward ran: v2's narrow launch and walk by default; kernel 1 also stores each
chunk's ``T`` with ``MCORE_SSM_GDN_PAIRS_T=saved``) instead of keeping anything from the forward but its inputs,
walks the chunks in reverse for the state gradients, and differentiates the per-chunk terms in Triton, all chunks in
parallel (``mcore_ssm.gdn_triton_chunk_bwd_split``). Which kernels a call runs is read once, when its forward starts
(``kernel_choice.gdn_kernels_for``), and kept for its backward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Unpack

import torch
import triton
import triton.language as tl

from mcore_ssm.gdn_reference import CHUNK, ChunkRuleOptions
from mcore_ssm.kernel_choice import gdn_kernels_for
from mcore_ssm.packing import Segments, check_state_count, segments_of


@triton.jit
def _double(inv, a, rows, S: tl.constexpr, PRECISION: tl.constexpr):
    """One level of the blocked inverse: ``inv``, the inverse of the blocks of ``S`` on the diagonal of ``I + a``
    (``(C, C)``, ``a`` strictly lower), becomes that of the blocks of ``2 S``. Within each ``2 S`` block
    ``[[L00, 0], [L10, L11]]``, the inverse is ``[[T00, 0], [-T11 L10 T00, T11]]``: ``inv - inv E inv`` with
    ``E`` the ``L10`` parts of ``a``. Exact (a reordered triangular solve, not a power series)."""
    pair = (rows // (2 * S))[:, None] == (rows // (2 * S))[None, :]  # (C, C) same block of 2 S
    apart = (rows // S)[:, None] != (rows // S)[None, :]  # different blocks of S
    e = tl.where(pair & apart, a, 0.0)  # (C, C) E
    return inv - tl.dot(inv, tl.dot(e, inv, input_precision=PRECISION), input_precision=PRECISION)


@triton.jit
def _diagonal_inverse16(a, C: tl.constexpr):
    """The inverse of the ``C / 16`` diagonal 16 x 16 blocks of ``I + a`` (``(C, C)``, ``a`` strictly lower), as a
    ``(C, C)`` block diagonal: all blocks at once by forward substitution, row after row, in fp32 registers (no dot;
    exact up to fp32 rounding). Row ``i`` of a block's inverse is ``e_i - sum_{j < i} L_ij T_j``, its rows above
    ``i`` already final."""
    blocks = tl.arange(0, C // 16)  # (NB,) NB = C / 16
    inner = tl.arange(0, 16)  # (16,)
    same = blocks[:, None, None, None] == blocks[None, None, :, None]  # (NB, 1, NB, 1) a diagonal block
    a4 = tl.reshape(a, (C // 16, 16, C // 16, 16))  # (NB, 16, NB, 16) row block, row, column block, column
    low_t = tl.permute(tl.sum(tl.where(same, a4, 0.0), axis=2), (0, 2, 1))  # (NB, 16, 16) [b, j, i] L^T
    row = inner[None, :, None]  # (1, 16, 1)
    col = inner[None, None, :]  # (1, 1, 16)
    inv = tl.where((row == col) & (blocks[:, None, None] >= 0), 1.0, 0.0)  # (NB, 16, 16) I
    for i in tl.static_range(1, 16):  # row i of L read from L^T's column: no layout change a step
        li = tl.sum(tl.where(col == i, low_t, 0.0), axis=2)  # (NB, 16) row i of each L, by j
        step = tl.sum(li[:, :, None] * inv, axis=1)  # (NB, 16) sum_j L_ij T_j (L_ij = 0 for j >= i)
        inv = inv - tl.where(row == i, step[:, None, :], 0.0)  # (NB, 16, 16) row i final
    full = tl.where(same, inv[:, :, None, :], 0.0)  # (NB, 16, NB, 16)
    return tl.reshape(full, (C, C))  # (C, C) block diagonal


@triton.jit
def _unit_lower_inverse(a, rows, C: tl.constexpr, PRECISION: tl.constexpr, BLOCKS16: tl.constexpr):
    """``T = (I + a)^-1`` (``(C, C)``, ``a`` strictly lower, C = 64): ``BLOCKS16`` (``MCORE_SSM_GDN_INVERSE=
    blocks16``) the diagonal 16 x 16 blocks by substitution (``_diagonal_inverse16``) and two doubling levels,
    16 -> 32 -> 64 (4 ``(C, C)`` dots); otherwise five doubling levels 1 -> 2 -> ... -> 64 (10 dots)."""
    if BLOCKS16:
        inv = _diagonal_inverse16(a, C)
    else:  # level 1 without dots: the inverse of each [[1, 0], [a, 1]] is [[1, 0], [-a, 1]]
        pair = (rows // 2)[:, None] == (rows // 2)[None, :]  # (C, C) same block of 2
        inv = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0) - tl.where(pair, a, 0.0)  # (C, C)
        inv = _double(inv, a, rows, 2, PRECISION)
        inv = _double(inv, a, rows, 4, PRECISION)
        inv = _double(inv, a, rows, 8, PRECISION)
    inv = _double(inv, a, rows, 16, PRECISION)
    return _double(inv, a, rows, 32, PRECISION)  # (C, C) T


@triton.jit
def _chunk_wy_kernel(
    k_ptr,  # (N, hk, dk)
    v_ptr,  # (N, hv, dv)
    g_ptr,  # (N, hv) fp32
    beta_ptr,  # (N, hv) fp32
    w_ptr,  # (N, hv, dk) scratch dtype out: W
    u_ptr,  # (N, hv, dv) scratch dtype out: U~
    cum_ptr,  # (N, hv) fp32 out: G
    chunk_start_ptr,  # (M,) int64 first flat token of each chunk
    chunk_len_ptr,  # (M,) int64 its tokens (1..C)
    t_ptr,  # (M, hv, C, C) fp32 out: T (unused without STORE_T)
    HK: tl.constexpr,
    HV: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BW: tl.constexpr,  # key columns of W per dot: BK (the first version), or fewer (K reloaded per block)
    C: tl.constexpr,
    PRECISION: tl.constexpr,
    STORE_T: tl.constexpr,  # the backward's rerun keeps T for the split terms' backward (MCORE_SSM_GDN_PAIRS_T)
    BLOCKS16: tl.constexpr,  # T from 16 x 16 diagonal blocks by substitution (MCORE_SSM_GDN_INVERSE=blocks16)
):
    chunk = tl.program_id(0)
    head = tl.program_id(1)
    qk_head = head // (HV // HK)
    start = tl.load(chunk_start_ptr + chunk)
    count = tl.load(chunk_len_ptr + chunk)

    rows = tl.arange(0, C)  # (C,) token within the chunk
    dks = tl.arange(0, BK)  # (BK,)
    valid = rows < count
    flat = start + rows  # (C,) flat token index
    k_mask = valid[:, None] & (dks < DK)[None, :]
    k = tl.load(k_ptr + (flat[:, None] * HK + qk_head) * DK + dks[None, :], mask=k_mask, other=0.0)  # (C, BK)
    g = tl.load(g_ptr + flat * HV + head, mask=valid, other=0.0)  # (C,)
    beta = tl.load(beta_ptr + flat * HV + head, mask=valid, other=0.0)  # (C,)
    cum = tl.cumsum(g, axis=0)  # (C,) G; rows past the end keep G_C (their g is 0)
    tl.store(cum_ptr + flat * HV + head, cum, mask=valid)

    # A = tril_{-1}(diag(beta) K K^T * exp(G_i - G_j)): -inf on and above the diagonal before the exp
    strict = rows[:, None] > rows[None, :]  # (C, C) j < i
    kk = tl.dot(k, tl.trans(k), input_precision=PRECISION)  # (C, C) fp32
    a = beta[:, None] * kk * tl.exp(tl.where(strict, cum[:, None] - cum[None, :], float("-inf")))  # (C, C)
    # T = (I + A)^-1, doubling the inverted diagonal blocks: 1 -> 2 -> ... -> 64, or 16 -> 32 -> 64 (BLOCKS16)
    inv = _unit_lower_inverse(a, rows, C, PRECISION, BLOCKS16)  # (C, C)
    if STORE_T:  # rows past the segment's end hold the identity's (their a is 0), as a recomputation gives
        t_off = (chunk * HV + head).to(tl.int64) * C * C + rows[:, None] * C + rows[None, :]  # (C, C)
        tl.store(t_ptr + t_off, inv)

    # W = T diag(beta exp(G)) K and U~ = T diag(beta) V: T and the right sides in fp32 (tf32 dots for 16-bit
    # inputs: T in 16 bits would cost W ~2e-3 relative), stored in the scratch dtype
    row_scale = beta * tl.exp(cum)  # (C,)
    if BW == BK:  # W at once from the K held since A (the first version)
        w = tl.dot(inv, k.to(tl.float32) * row_scale[:, None], input_precision=PRECISION)  # (C, BK)
        w_off = (flat[:, None] * HV + head) * DK + dks[None, :]  # (C, BK)
        tl.store(w_ptr + w_off, w.to(w_ptr.dtype.element_ty), mask=k_mask)
    else:  # W by blocks of BW key columns, K reloaded (L2) per block: fewer live registers (v2)
        for k_first in range(0, BK, BW):
            dws = k_first + tl.arange(0, BW)  # (BW,)
            kw_mask = valid[:, None] & (dws < DK)[None, :]
            kw = tl.load(k_ptr + (flat[:, None] * HK + qk_head) * DK + dws[None, :], mask=kw_mask, other=0.0)
            w = tl.dot(inv, kw.to(tl.float32) * row_scale[:, None], input_precision=PRECISION)  # (C, BW)
            w_off = (flat[:, None] * HV + head) * DK + dws[None, :]  # (C, BW)
            tl.store(w_ptr + w_off, w.to(w_ptr.dtype.element_ty), mask=kw_mask)
    for v_first in range(0, DV, BV):
        dvs = v_first + tl.arange(0, BV)  # (BV,)
        v_off = (flat[:, None] * HV + head) * DV + dvs[None, :]  # (C, BV)
        v_mask = valid[:, None] & (dvs < DV)[None, :]
        v = tl.load(v_ptr + v_off, mask=v_mask, other=0.0).to(tl.float32)  # (C, BV)
        u = tl.dot(inv, v * beta[:, None], input_precision=PRECISION)  # (C, BV) U~
        tl.store(u_ptr + v_off, u.to(u_ptr.dtype.element_ty), mask=v_mask)


@triton.jit
def _chunk_state_kernel(
    k_ptr,  # (N, hk, dk)
    w_ptr,  # (N, hv, dk) scratch dtype: W
    u_ptr,  # (N, hv, dv) scratch dtype: U~
    cum_ptr,  # (N, hv) fp32: G
    vnew_ptr,  # (N, hv, dv) scratch dtype out: U = U~ - W S
    h0_ptr,  # (S, hv, dk, dv) (unused without HAS_H0)
    ht_ptr,  # (S, hv, dk, dv) fp32 out (unused without STORE_HT)
    states_ptr,  # (M, hv, dk, dv) out: the state entering each chunk
    starts_ptr,  # (S,) int64
    lengths_ptr,  # (S,) int64
    first_chunk_ptr,  # (S,) int64 each segment's first chunk
    HK: tl.constexpr,
    HV: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seg = tl.program_id(0)
    head = tl.program_id(1)
    vblock = tl.program_id(2)
    qk_head = head // (HV // HK)
    start = tl.load(starts_ptr + seg)
    length = tl.load(lengths_ptr + seg)
    first_chunk = tl.load(first_chunk_ptr + seg)
    scratch = w_ptr.dtype.element_ty

    rows = tl.arange(0, C)  # (C,)
    dks = tl.arange(0, BK)  # (BK,)
    dvs = vblock * BV + tl.arange(0, BV)  # (BV,) this program's value columns
    kmask = dks < DK
    vmask = dvs < DV
    state_cols = dks[:, None] * DV + dvs[None, :]  # (BK, BV) inside one (dk, dv) state
    state_mask = kmask[:, None] & vmask[None, :]
    if HAS_H0:
        state = tl.load(h0_ptr + (seg * HV + head) * DK * DV + state_cols, mask=state_mask, other=0.0)
        state = state.to(tl.float32)  # (BK, BV)
    else:
        state = tl.zeros((BK, BV), dtype=tl.float32)

    for chunk_first in range(0, length, C):
        chunk_id = first_chunk + chunk_first // C
        states_off = (chunk_id * HV + head) * DK * DV + state_cols  # (BK, BV)
        tl.store(states_ptr + states_off, state.to(states_ptr.dtype.element_ty), mask=state_mask)
        tok = chunk_first + rows  # (C,) position in the segment
        valid = tok < length
        flat = start + tok  # (C,) flat token index
        k_mask = valid[:, None] & kmask[None, :]
        k = tl.load(k_ptr + (flat[:, None] * HK + qk_head) * DK + dks[None, :], mask=k_mask, other=0.0)  # (C, BK)
        w = tl.load(w_ptr + (flat[:, None] * HV + head) * DK + dks[None, :], mask=k_mask, other=0.0)  # (C, BK)
        v_off = (flat[:, None] * HV + head) * DV + dvs[None, :]  # (C, BV)
        v_mask = valid[:, None] & vmask[None, :]
        u = tl.load(u_ptr + v_off, mask=v_mask, other=0.0)  # (C, BV) U~
        last_tok = start + tl.minimum(chunk_first + C, length) - 1
        last = tl.load(cum_ptr + last_tok * HV + head)  # G_C: G at the chunk's last token
        # rows past the segment's end hold G_C (their g is 0): exp(G_C - G) of those rows is 1, never of 0 - G
        cum = tl.load(cum_ptr + flat * HV + head, mask=valid, other=0.0)
        cum = tl.where(valid, cum, last)  # (C,) G

        vnew = u.to(tl.float32) - tl.dot(w, state.to(scratch), input_precision=PRECISION)  # (C, BV) U
        vnew = vnew.to(scratch)
        tl.store(vnew_ptr + v_off, vnew, mask=v_mask)
        k_end = tl.where(valid[:, None], k.to(tl.float32) * tl.exp(last - cum)[:, None], 0.0).to(scratch)  # K~
        state = state * tl.exp(last) + tl.dot(tl.trans(k_end), vnew, input_precision=PRECISION)  # (BK, BV)

    if STORE_HT:
        tl.store(ht_ptr + (seg * HV + head) * DK * DV + state_cols, state, mask=state_mask)


@triton.jit
def _chunk_output_kernel(
    q_ptr,  # (N, hk, dk)
    k_ptr,  # (N, hk, dk)
    vnew_ptr,  # (N, hv, dv) scratch dtype: U
    cum_ptr,  # (N, hv) fp32: G
    states_ptr,  # (M, hv, dk, dv): the state entering each chunk
    out_ptr,  # (N, hv, dv) out, the inputs' dtype
    chunk_start_ptr,  # (M,) int64
    chunk_len_ptr,  # (M,) int64
    scale,
    HK: tl.constexpr,
    HV: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)  # int64: chunk * hv * dk * dv passes 2^31 at long batches
    head = tl.program_id(1)
    vblock = tl.program_id(2)
    qk_head = head // (HV // HK)
    start = tl.load(chunk_start_ptr + chunk)
    count = tl.load(chunk_len_ptr + chunk)
    scratch = vnew_ptr.dtype.element_ty

    rows = tl.arange(0, C)  # (C,)
    dks = tl.arange(0, BK)  # (BK,)
    dvs = vblock * BV + tl.arange(0, BV)  # (BV,)
    valid = rows < count
    flat = start + rows  # (C,)
    k_mask = valid[:, None] & (dks < DK)[None, :]
    qk_off = (flat[:, None] * HK + qk_head) * DK + dks[None, :]  # (C, BK)
    q = tl.load(q_ptr + qk_off, mask=k_mask, other=0.0)  # (C, BK)
    k = tl.load(k_ptr + qk_off, mask=k_mask, other=0.0)  # (C, BK)
    last = tl.load(cum_ptr + (start + count - 1) * HV + head)  # G_C
    cum = tl.load(cum_ptr + flat * HV + head, mask=valid, other=0.0)
    cum = tl.where(valid, cum, last)  # (C,) G, G_C past the segment's end
    v_off = (flat[:, None] * HV + head) * DV + dvs[None, :]  # (C, BV)
    v_mask = valid[:, None] & (dvs < DV)[None, :]
    vnew = tl.load(vnew_ptr + v_off, mask=v_mask, other=0.0)  # (C, BV) U
    state_off = (chunk * HV + head) * DK * DV + dks[:, None] * DV + dvs[None, :]  # (BK, BV)
    state = tl.load(states_ptr + state_off, mask=(dks < DK)[:, None] & (dvs < DV)[None, :], other=0.0)

    q_decayed = (q.to(tl.float32) * tl.exp(cum)[:, None]).to(scratch)  # (C, BK) exp(G) Q
    out = tl.dot(q_decayed, state.to(scratch), input_precision=PRECISION)  # (C, BV)
    lower = rows[:, None] >= rows[None, :]  # (C, C) j <= i
    # exp(G_i - G_j) for j <= i only: -inf above the diagonal before the exp
    ratio = tl.exp(tl.where(lower, cum[:, None] - cum[None, :], float("-inf")))  # (C, C)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * ratio  # (C, C)
    out += tl.dot(scores.to(scratch), vnew, input_precision=PRECISION)
    tl.store(out_ptr + v_off, (out * scale).to(out_ptr.dtype.element_ty), mask=v_mask)


def _value_configs(widths: tuple[tuple[int, int, int], ...]) -> list[triton.Config]:
    """Autotuning configs ``(BV, num_warps, num_stages)`` of a kernel over value blocks."""
    return [triton.Config({"BV": bv}, num_warps=warps, num_stages=stages) for bv, warps, stages in widths]


def _prune_wide(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Drop configs whose value block is wider than the value dims need (one kept at least)."""
    dv = kwargs.get("DV", named_args.get("DV"))
    need = max(16, triton.next_power_of_2(int(dv))) if dv is not None else None
    kept = [c for c in configs if need is None or c.kwargs["BV"] <= need]
    return kept or configs[-1:]


# Offline build numbers in this module's comments dated 2026-12-06 are builds without the launcher's 16-byte pointer
# marks (no vectorized load): inflated. Aligned (2026-12-07, benchmarks/offline_gdn_fwd.py): walk v1 136-198
# registers, output 123-146, WY 255 / 8 bytes (full width) and 190 / none (narrow), no other spill; RESULTS.md.
# Kernel 2: the walk holds S (BK, BV) fp32. Offline sm_90 builds (Triton 3.9, 2026-12-06) at dk = dv = 128, bf16:
# 255 registers in each config; local-memory spills of 64 bytes (64 columns, 8 warps), 0 (32 columns, 8 warps),
# 0 (16, 4), 72 (32, 4), 656 (64, 4: left out); 22-40 KB of shared memory (80-144 KB with the backward's fp32
# factors and tf32 dots), under the 227 KB of an H100/H200 block.
_chunk_state_tuned = triton.autotune(
    configs=_value_configs(((64, 8, 2), (32, 8, 2), (64, 8, 1), (32, 4, 2), (16, 4, 2))),
    key=["HV", "DK", "DV", "HAS_H0", "STORE_HT", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_wide},
)(_chunk_state_kernel)
# Kernel 3: no loop; one chunk's q, k (C, BK), U (C, BV) and S_in (BK, BV) per program. Offline builds as above:
# 207 registers, no spill, 72 KB (64 columns, 8 warps); 253, none, 96 KB (128, 8); 255, 32 bytes, 72 KB (64, 4).
_chunk_output_tuned = triton.autotune(
    configs=_value_configs(((64, 8, 1), (128, 8, 1), (64, 4, 1))),
    key=["HV", "DK", "DV", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_wide},
)(_chunk_output_kernel)


# Kernel 1 (one launch, no autotuning; ``prepare``). Full width (v1, dk > 128 and the backward's rerun): W at once
# (BW = BK), 64 value columns, 8 warps; offline sm_90 builds (Triton 3.9, ptxas 13.4, 2026-12-06) at dk = dv = 128,
# bf16: wgmma, 255 registers, 20 bytes spilled (268 with 4 warps), 32 KB shared: one program an SM. ``narrow`` (v2,
# the forward's default): W by 64 key columns with K reloaded, 4 warps: 243 registers, no spill, 16 KB: two programs
# an SM. fp32 inputs (ieee dots) keep 8 warps with 32 value columns when narrow (4.2 KB spilled, against 6.4 KB at
# full width; at 4 warps ~100 KB). With BLOCKS16 (MCORE_SSM_GDN_INVERSE=blocks16; aligned builds, 2026-12-07,
# RESULTS.md): full width 220 registers, no spill (doubling 255 / 8 bytes), narrow 161 (190), 32 KB either way, half
# the wgmma instructions; fp32 inputs narrow 255 / 3.9 KB (4.4 KB), full width 30 KB spilled (5.5 KB).


def _interpreted() -> bool:
    """Triton's CPU interpreter runs the kernels (its autotuner would time on a GPU): fixed configs then."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def chunk_layout(segments: Segments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each segment cut into chunks of C, segment after segment: ``(M,)`` first flat token and ``(M,)`` token
    count of every chunk, and ``(S,)`` the first chunk of each segment."""
    per_segment = (segments.lengths + CHUNK - 1) // CHUNK  # (S,)
    total = int(per_segment.sum())  # the grid size: one host read
    owner = torch.repeat_interleave(
        torch.arange(segments.count, device=per_segment.device), per_segment, output_size=total
    )
    first = torch.cumsum(per_segment, 0) - per_segment  # (S,) first chunk of each segment
    index = torch.arange(total, device=per_segment.device) - first[owner]  # (M,) chunk within its segment
    starts = segments.starts[owner] + index * CHUNK
    lengths = torch.clamp(segments.lengths[owner] - index * CHUNK, max=CHUNK)
    return starts, lengths, first


@dataclass(kw_only=True)
class Launch:
    """Sizes and settings of one call's kernels (shared by the forward and the backward)."""

    hk: int
    hv: int
    dk: int
    dv: int
    scale: float
    precision: str
    segments: Segments
    chunk_starts: torch.Tensor  # (M,)
    chunk_lengths: torch.Tensor  # (M,)
    first_chunk: torch.Tensor  # (S,)

    @property
    def dims(self) -> dict[str, int]:
        block_k = max(16, triton.next_power_of_2(self.dk))
        # fp32 (ieee) dots at dk 128 with 64 value columns needed 296 KB of shared memory on an H100 (2026-12-06;
        # 227 KB there); offline sm_90 builds (Triton 3.9, 2026-12-06) of the backward state kernel at dk 128 with
        # tf32 dots and 64 value columns asked for 417 KB (288 KB with one stage): 32 value columns at dk >= 128
        widest = 32 if block_k >= 128 else 64
        block_v = min(widest, max(16, triton.next_power_of_2(self.dv)))
        return {"HK": self.hk, "HV": self.hv, "DK": self.dk, "DV": self.dv, "BK": block_k, "BV": block_v, "C": CHUNK}

    @property
    def warps(self) -> int:
        return 8 if self.dims["BK"] >= 64 else 4

    @property
    def stages(self) -> int:
        """Software-pipelining stages of the kernels that walk a segment's chunks: one. Prefetching the next
        chunk's q, k, W, U~ into shared memory (Triton's default 3) took the backward state kernel to 345 KB
        (dk 128, ieee, 32 value columns), 417 KB (dk 128, tf32, 64) and 241 KB (dk 64, tf32, 64) in offline sm_90
        builds (Triton 3.9, 2026-12-06), over the 227 KB an H100/H200 block may use; one stage: 144, 208, 160 KB
        (dk 128 tf32 at 32 columns)."""
        return 1

    @property
    def value_blocks(self) -> int:
        return triton.cdiv(self.dv, self.dims["BV"])


def launch_for(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    segments: Segments | None,
) -> Launch:
    """Check the arguments (one-line ``ValueError``) and size the kernels."""
    batch, seq, hk, dk = q.shape
    hv, dv = v.shape[2:]
    if (
        k.shape != q.shape
        or v.shape[:2] != q.shape[:2]
        or hv % hk
        or g.shape != (batch, seq, hv)
        or beta.shape != g.shape
    ):
        raise ValueError(
            f"gated delta rule: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, "
            f"beta {tuple(beta.shape)}; expected q, k (B, T, hk, dk), v (B, T, hv, dv) with hk dividing hv, "
            "g and beta (B, T, hv)"
        )
    segments = segments_of(batch, seq, cu_seqlens, v.device, segments)
    if initial_state is not None:
        check_state_count(segments, initial_state.shape[0], cu_seqlens, "gated delta rule initial_state")
        if tuple(initial_state.shape[1:]) != (hv, dk, dv):
            raise ValueError(
                f"gated delta rule: initial_state of shape {tuple(initial_state.shape)}; expected (S, hv, dk, dv)"
            )
    starts, lengths, first = chunk_layout(segments)
    return Launch(
        hk=hk,
        hv=hv,
        dk=dk,
        dv=dv,
        scale=float(dk**-0.5 if scale is None else scale),
        precision="tf32" if q.dtype in (torch.float16, torch.bfloat16) else "ieee",
        segments=segments,
        chunk_starts=starts,
        chunk_lengths=lengths,
        first_chunk=first,
    )


def prepare(
    launch: Launch,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    dtype: torch.dtype,
    *,
    narrow: bool = False,
    inverse: torch.Tensor | None = None,
    inverse_by: str = "doubling",
) -> tuple[torch.Tensor, ...]:
    """Kernel 1: ``(W (N, hv, dk), U~ (N, hv, dv))`` in ``dtype`` (``scratch_dtype``'s, or fp32) and
    ``G (N, hv)`` fp32 (inputs contiguous, g and beta fp32). ``narrow`` (v2, the forward's default): W by blocks of
    64 key columns, 4 warps for 16-bit inputs (two programs an SM in offline builds), same results. ``inverse``
    (``(M, hv, C, C)`` fp32, or None): filled with each chunk's ``T = (I + A)^-1``; ``inverse_by``
    (``kernel_choice.GDN_INVERSE``): how ``T`` is computed, ``doubling`` or ``blocks16``, same ``T``."""
    assert inverse_by in ("doubling", "blocks16"), inverse_by
    tokens = v.shape[0] * v.shape[1]
    w = torch.empty(tokens, launch.hv, launch.dk, device=v.device, dtype=dtype)
    u = torch.empty(tokens, launch.hv, launch.dv, device=v.device, dtype=dtype)
    cum = torch.empty(tokens, launch.hv, device=v.device, dtype=torch.float32)
    if inverse is not None:
        assert inverse.shape == (launch.chunk_starts.numel(), launch.hv, CHUNK, CHUNK), inverse.shape
        assert inverse.dtype == torch.float32 and inverse.is_contiguous()
    dims = launch.dims
    two_per_sm = narrow and launch.precision == "tf32"  # narrow with 16-bit inputs: 4 warps
    block_v = min(32 if narrow and not two_per_sm else 64, max(16, triton.next_power_of_2(launch.dv)))
    _chunk_wy_kernel[(launch.chunk_starts.numel(), launch.hv)](
        k,
        v,
        g,
        beta,
        w,
        u,
        cum,
        launch.chunk_starts,
        launch.chunk_lengths,
        inverse if inverse is not None else cum,
        HK=dims["HK"],
        HV=dims["HV"],
        DK=dims["DK"],
        DV=dims["DV"],
        BK=dims["BK"],
        BV=block_v,
        BW=min(64, dims["BK"]) if narrow else dims["BK"],
        C=CHUNK,
        PRECISION=launch.precision,
        STORE_T=inverse is not None,
        BLOCKS16=inverse_by == "blocks16",
        num_warps=4 if two_per_sm else 8,  # offline builds: the comment above ``_interpreted``
    )
    return w, u, cum


def run_states(
    launch: Launch,
    k: torch.Tensor,
    prepared: tuple[torch.Tensor, ...],
    initial_state: torch.Tensor | None,
    *,
    final: bool,
    states_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Kernel 2: ``(U (N, hv, dv) in the factors' dtype, the state entering every chunk (M, hv, dk, dv) in
    ``states_dtype``, final state (S, hv, dk, dv) fp32 or None)``."""
    w, u, cum = prepared
    count, chunks = launch.segments.count, launch.chunk_starts.numel()
    vnew = torch.empty_like(u)
    h0 = initial_state.contiguous() if initial_state is not None else cum.new_empty(1)
    ht = cum.new_empty(count, launch.hv, launch.dk, launch.dv) if final else cum.new_empty(1)
    states = torch.empty(chunks, launch.hv, launch.dk, launch.dv, device=u.device, dtype=states_dtype)
    args = (k, w, u, cum, vnew, h0, ht, states, launch.segments.starts, launch.segments.lengths, launch.first_chunk)
    flags = {"HAS_H0": initial_state is not None, "STORE_HT": final, "PRECISION": launch.precision}
    dims = {key: size for key, size in launch.dims.items() if key != "BV"}
    if _interpreted():
        grid = (count, launch.hv, launch.value_blocks)
        _chunk_state_kernel[grid](*args, **dims, BV=launch.dims["BV"], **flags, num_warps=launch.warps, num_stages=1)
    else:
        _chunk_state_tuned[lambda meta: (count, launch.hv, triton.cdiv(launch.dv, meta["BV"]))](*args, **dims, **flags)
    return vnew, states, ht if final else None


def run_output(
    launch: Launch, q: torch.Tensor, k: torch.Tensor, cum: torch.Tensor, vnew: torch.Tensor, states: torch.Tensor
) -> torch.Tensor:
    """Kernel 3: ``out (N, hv, dv)`` in q's dtype."""
    chunks = launch.chunk_starts.numel()
    out = torch.empty(vnew.shape, device=q.device, dtype=q.dtype)
    args = (q, k, vnew, cum, states, out, launch.chunk_starts, launch.chunk_lengths, launch.scale)
    dims = {key: size for key, size in launch.dims.items() if key != "BV"}
    if _interpreted():
        grid = (chunks, launch.hv, launch.value_blocks)
        _chunk_output_kernel[grid](*args, **dims, BV=launch.dims["BV"], PRECISION=launch.precision, num_warps=4)
    else:
        grid_of = lambda meta: (chunks, launch.hv, triton.cdiv(launch.dv, meta["BV"]))  # noqa: E731
        _chunk_output_tuned[grid_of](*args, **dims, PRECISION=launch.precision)
    return out


def scratch_dtype(dtype: torch.dtype) -> torch.dtype:
    """The forward's dtype of W, U~, U and the chunk states: 16-bit inputs keep theirs, others take fp32."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


class _ChunkGatedDeltaRule(torch.autograd.Function):
    """Forward: the three kernels. Backward: ``mcore_ssm.gdn_triton_bwd`` (recomputes the forward's factors and
    chunk states, walks the chunks in reverse, differentiates the per-chunk terms in parallel; all in Triton)."""

    @staticmethod
    def forward(ctx: Any, q, k, v, g, beta, initial_state, cu_seqlens, scale, output_final_state, segments):  # type: ignore[override]
        launch = launch_for(q, k, v, g, beta, scale, initial_state, cu_seqlens, segments)
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
        scratch = scratch_dtype(q.dtype)
        kernels = gdn_kernels_for(launch.dims["BK"])  # read once: the backward runs what the forward chose
        v2 = kernels.forward == "v2"  # the default; v1 by MCORE_SSM_GDN_FWD=v1 or for dk > 128
        gf, bf = g.float().contiguous(), beta.float().contiguous()
        prepared = prepare(launch, kc, vc, gf, bf, scratch, narrow=v2, inverse_by=kernels.inverse)
        if v2:
            from mcore_ssm.gdn_triton_state_v2 import run_states_v2

            blocks_first = kernels.walk_order == "blocks"  # MCORE_SSM_GDN_WALK_ORDER: same results
            walked = run_states_v2(
                launch,
                kc,
                prepared,
                initial_state,
                final=output_final_state,
                states_dtype=scratch,
                blocks_first=blocks_first,
            )
        else:
            walked = run_states(launch, kc, prepared, initial_state, final=output_final_state, states_dtype=scratch)
        vnew, states, final = walked
        out = run_output(launch, qc, kc, prepared[2], vnew, states)
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        ctx.launch, ctx.output_final_state, ctx.kernels = launch, output_final_state, kernels
        return out.view(*v.shape[:2], launch.hv, launch.dv).to(v.dtype), final

    @staticmethod
    def backward(ctx: Any, grad_out, grad_final):  # type: ignore[override]
        from mcore_ssm.gdn_triton_bwd import chunk_gated_delta_rule_bwd

        q, k, v, g, beta, initial_state = ctx.saved_tensors
        grads = chunk_gated_delta_rule_bwd(
            ctx.launch,
            q,
            k,
            v,
            g,
            beta,
            initial_state,
            grad_out,
            grad_final if ctx.output_final_state else None,
            kernels=ctx.kernels,
        )
        return (*grads, None, None, None, None)


def gated_delta_rule_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    **options: Unpack[ChunkRuleOptions],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``chunk_gated_delta_rule`` computed by the Triton kernels, forward and backward (``chunk_size`` must be 64)."""
    chunk_size = options.get("chunk_size", CHUNK)
    if chunk_size != CHUNK:
        raise ValueError(f"chunk_size = {chunk_size}; allowed with the Triton kernel: {CHUNK}")
    out, final = _ChunkGatedDeltaRule.apply(
        q,
        k,
        v,
        g,
        beta,
        options.get("initial_state"),
        options.get("cu_seqlens"),
        options.get("scale"),
        options.get("output_final_state", False),
        options.get("segments"),
    )
    return out, final
