"""Backward of the per-chunk terms of the Triton gated delta rule split in three kernels, none holding every tile.

Same arguments, results and math as ``mcore_ssm.gdn_triton_chunk_bwd.chunk_terms_bwd`` (its docstring derives every
gradient and the cancellation-free gate sums; the names below are its). That kernel, one program per (chunk, q/k
head) looping over the group's value heads, holds ``T, T^T, dA, dP, Gamma`` (C x C) and the ``dq, dk`` (C x dk)
accumulators together: 255 registers and ~1.3 KB spilled a thread, 15 ms of a 29 ms GDN step on an H100
(2026-12-06, B 8, T 4096, hk 16, hv 32, dk = dv = 128, bf16). Here the work is cut where the data allows:

1. ``_pairs_bwd_kernel``, grid (chunk, value head): everything that needs the ``(C, C)`` matrices. ``T`` is
   recomputed (``gdn_triton._unit_lower_inverse``: doubling, or 16 x 16 blocks with ``MCORE_SSM_GDN_INVERSE=
   blocks16``), or loaded as the backward's rerun of the WY kernel stored it (opt-in
   ``MCORE_SSM_GDN_PAIRS_T=saved``, ``inverse``; then 4 warps and 64 value columns at dk 128 for 16-bit inputs:
   two programs an SM in aligned offline builds); a first walk over the value blocks forms ``dR_u = T^T dU``
   (stores ``dv = beta dR_u``, and ``dR_u`` in fp32 scratch ``(N, hv, dv)`` for kernel 2), ``dA =
   -tril_{-1}(dR_u U^T)`` and ``rowsum(dR_u V)``; ``T`` dies, ``dA`` gives its ``dbeta`` row sum and straddling gate pairs and becomes ``B``;
   a second walk forms ``dP = dO U^T``, whose ``dS = tril(dP * Gamma)`` gives its gate pairs; last, in blocks of
   ``BKS`` key dims, ``dK = (B + B^T) K + dS^T Qs`` and ``dQs = dS K`` go to fp32 scratch ``(N, hv, dk)`` (per value
   head), and the partial ``dg, dbeta`` to the fp32 ``(N, hv)`` results. ``K K^T``, ``Q K^T`` are built in key
   blocks too (``_gram``), and ``Gamma`` is rebuilt after the first walk: no ``(C, dk)`` tile lives across a walk.
2. ``_states_bwd_kernel``, grid (chunk, q/k head, block of BKS key dims): the products against the states. For each
   value head of the group, a walk over the value blocks accumulates ``-dR_w = dR_u S^T``, ``dQe = dO S^T``, ``dK~ =
   U dS'^T`` (three ``(C, BKS)`` fp32 tiles) and ``dgamma = <S, dS'>``; their row sums against ``K, Qs``
   (``rowsum(dR_w K)``, ``rowsum(dQe Qs)``, ``rowsum(dK~ K)``: no extra ``K S`` dots) and ``dgamma`` are stored per
   key block; ``dK += beta e^G dR_w + e^{G_C - G} dK~`` and ``dQs += e^G dQe`` plus kernel 1's parts are summed
   over the group in registers (fixed order) and stored as ``dq, dk`` in the inputs' dtype.
3. ``_gate_bwd_kernel``, grid (chunk, value head), ``(C,)`` vectors only: sums kernel 2's key blocks in order and
   finishes ``dg`` (masked sums over ``i >= m`` and ``i < m``, never a difference; ``e^{G_C - G_i}`` is the exp of
   the gates after ``i``, summed from a shifted load, not ``G_C - G_i``) and ``dbeta``.

Deterministic (no atomics: every output element is one program's). Precision as the one-kernel version: ``ieee``
fp32 dots for fp32 inputs, otherwise ``K K^T`` and ``Q K^T`` on the inputs' dtype and the rest tf32; with the opt-in
``MCORE_SSM_GDN_BWD_SCRATCH=inputs`` (16-bit inputs) ``U``, ``S``, ``dS'`` and ``dR_u`` come in the inputs' dtype and
the dots that take them (``dR_u U^T``, ``dO U^T``, ``dR_u S^T``, ``dO S^T``, ``U dS'^T``) run on 16-bit operands with
fp32 accumulation (the operand dtype is the scratch pointers' element type: the fp32 builds are unchanged). Tiles: C = 64,
BV = 32 value columns (16 below dv 32), BKS = 64 key dims (the padded dk below 64), 8 warps, one stage. Offline
sm_90 builds (Triton 3.9, ``triton.compile`` of an ``ASTSource`` on CPU, ``cuobjdump --dump-resource-usage``;
2026-12-06; pointers not marked aligned, which inflates these: aligned builds in RESULTS.md, 2026-12-07), registers
a thread / spilled bytes / shared memory, bf16 (tf32): dk = dv = 128: kernel 1 253 / 0 / 100 KB, kernel 2 244 / 0 /
24 KB, kernel 3 80 / 0; dk = dv = 64: 255 / 56 / 52 KB and 255 / 0; dk = dv = 32: 255 / 72 and 193 / 0. fp32 (ieee,
FMA dots) at 128: kernel 1 spills 2.8 KB, kernel 2 144 bytes. Rejected: kernel 2 over the whole dk (128: 544 bytes
spilled; as a loop over key blocks inside one program, too: 536) or with 64 value columns (264), kernel 2 with 4
warps (~300-2000), per-value-head kernel-2 results summed by torch (2 GB more traffic at the bench shape). Extra
traffic against the one-kernel version, fp32 at the bench shape: ``dR_u`` written once and read per key block, the
per-value-head ``dQs, dK`` written and read, ``dO, U`` read per key block: ~4 GB, ~1.3 ms of H100 bandwidth, traded
for kernels that do not spill.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcore_ssm.gdn_triton import CHUNK, Launch, _unit_lower_inverse
from mcore_ssm.gdn_triton_chunk_bwd import _straddling


@triton.jit
def _gamma(g, strict, lower):
    """``(C, C)`` ``Gamma_ij = exp(sum_{j < l <= i} g_l)`` for ``j <= i``, 0 above the diagonal: the exponent a sum of
    the gates between (not a difference of two ``G``, see ``gdn_triton_chunk_bwd``)."""
    between = tl.cumsum(tl.where(strict, g[:, None], 0.0), axis=0)  # (C, C) [i, j]: sum_{j < l <= i} g_l
    return tl.exp(tl.where(lower, between, float("-inf")))


@triton.jit
def _gram(
    x_ptr,
    y_ptr,
    flat,
    valid,
    qk_head,
    HK: tl.constexpr,
    DK: tl.constexpr,
    BKS: tl.constexpr,
    C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``(C, C)`` ``X Y^T`` of two ``(N, hk, dk)`` inputs' rows of a chunk, in blocks of ``BKS`` key dims (operands in
    the inputs' dtype: exact products, fp32 accumulate)."""
    out = tl.zeros((C, C), dtype=tl.float32)
    for k_first in range(0, DK, BKS):
        dks = k_first + tl.arange(0, BKS)  # (BKS,)
        off = (flat[:, None] * HK + qk_head) * DK + dks[None, :]  # (C, BKS)
        mask = valid[:, None] & (dks < DK)[None, :]
        x = tl.load(x_ptr + off, mask=mask, other=0.0)  # (C, BKS)
        y = tl.load(y_ptr + off, mask=mask, other=0.0)
        out += tl.dot(x, tl.trans(y), input_precision=PRECISION)
    return out


@triton.jit
def _pairs_bwd_kernel(
    q_ptr,  # (N, hk, dk)
    k_ptr,  # (N, hk, dk)
    v_ptr,  # (N, hv, dv)
    g_ptr,  # (N, hv) fp32
    beta_ptr,  # (N, hv) fp32
    u_ptr,  # (N, hv, dv) scratch dtype (fp32, or the 16-bit inputs': MCORE_SSM_GDN_BWD_SCRATCH=inputs): U~ - W S
    dout_ptr,  # (N, hv, dv) the output's dtype: dO
    du_ptr,  # (N, hv, dv) fp32: dU
    dv_ptr,  # (N, hv, dv) out: beta dR_u
    dru_ptr,  # (N, hv, dv) scratch dtype out: dR_u = T^T dU
    dqh_ptr,  # (N, hv, dk) fp32 out: dS K (unscaled dQs, this value head's part)
    dkh_ptr,  # (N, hv, dk) fp32 out: (B + B^T) K + dS^T Qs
    dg_ptr,  # (N, hv) fp32 out: the straddling pairs of dA * A and dP * P
    dbeta_ptr,  # (N, hv) fp32 out: rowsum(dR_u V) + rowsum(dA * K K^T * Gamma)
    chunk_start_ptr,  # (M,) int64
    chunk_len_ptr,  # (M,) int64
    t_ptr,  # (M, hv, C, C) fp32: T as the forward's rerun stored it (unused without SAVED_T)
    scale,
    HK: tl.constexpr,
    HV: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BKS: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    PRECISION: tl.constexpr,
    SAVED_T: tl.constexpr,
    BLOCKS16: tl.constexpr,  # T recomputed from 16 x 16 diagonal blocks (MCORE_SSM_GDN_INVERSE=blocks16)
):
    chunk = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    qk_head = head // (HV // HK)
    start = tl.load(chunk_start_ptr + chunk)
    count = tl.load(chunk_len_ptr + chunk)
    scratch = u_ptr.dtype.element_ty  # operands of the dots with U, dO: fp32 (tf32 / ieee) or 16-bit

    rows = tl.arange(0, C)  # (C,)
    valid = rows < count
    flat = start + rows  # (C,) flat token index
    strict = rows[:, None] > rows[None, :]  # (C, C) j < i
    lower = rows[:, None] >= rows[None, :]  # (C, C) j <= i
    tok_head = flat * HV + head  # (C,)
    g = tl.load(g_ptr + tok_head, mask=valid, other=0.0)  # (C,)
    beta = tl.load(beta_ptr + tok_head, mask=valid, other=0.0)  # (C,)

    if SAVED_T:  # T^T loaded: the forward's rerun kept T (MCORE_SSM_GDN_PAIRS_T=saved)
        t_base = t_ptr + (chunk * HV + head) * C * C
        inv_t = tl.load(t_base + rows[None, :] * C + rows[:, None])  # (C, C) T^T
    else:  # T = (I + A)^-1 as the forward builds it
        kk = _gram(k_ptr, k_ptr, flat, valid, qk_head, HK, DK, BKS, C, PRECISION)  # (C, C) K K^T
        a = beta[:, None] * kk * tl.where(strict, _gamma(g, strict, lower), 0.0)  # (C, C) A
        inv = _unit_lower_inverse(a, rows, C, PRECISION, BLOCKS16)  # (C, C) T
        inv_t = tl.trans(inv)  # (C, C) T^T

    # first walk: dR_u, dv, dA (T^T and dA live)
    da = tl.zeros((C, C), dtype=tl.float32)  # -dA: dR_u U^T (masked below)
    dbeta = tl.zeros((C,), dtype=tl.float32)
    for v_first in range(0, DV, BV):
        dvs = v_first + tl.arange(0, BV)  # (BV,)
        v_off = (flat[:, None] * HV + head) * DV + dvs[None, :]  # (C, BV)
        v_mask = valid[:, None] & (dvs < DV)[None, :]
        du = tl.load(du_ptr + v_off, mask=v_mask, other=0.0)  # (C, BV) dU = dU~
        dru = tl.dot(inv_t, du, input_precision=PRECISION)  # (C, BV) dR_u
        tl.store(dru_ptr + v_off, dru.to(scratch), mask=v_mask)
        tl.store(dv_ptr + v_off, (beta[:, None] * dru).to(dv_ptr.dtype.element_ty), mask=v_mask)
        vals = tl.load(v_ptr + v_off, mask=v_mask, other=0.0).to(tl.float32)  # (C, BV)
        dbeta += tl.sum(dru * vals, axis=1)
        u = tl.load(u_ptr + v_off, mask=v_mask, other=0.0)  # (C, BV) U
        da = tl.dot(dru.to(scratch), tl.trans(u), acc=da, input_precision=PRECISION)

    # dA: B = diag(beta) (dA * Gamma) (dK += (B + B^T) K below), its dbeta row sum and gate pairs
    g = tl.load(g_ptr + tok_head, mask=valid, other=0.0)  # reloaded: Gamma rebuilt, not kept over the walk
    gamma_lower = _gamma(g, strict, lower)  # (C, C)
    da_gamma = tl.where(strict, -da * gamma_lower, 0.0)  # (C, C) dA * Gamma
    kk = _gram(k_ptr, k_ptr, flat, valid, qk_head, HK, DK, BKS, C, PRECISION)  # (C, C)
    dbeta += tl.sum(da_gamma * kk, axis=1)
    b = beta[:, None] * da_gamma  # (C, C) B
    dg = _straddling(b * kk, strict)  # (C,) dA * A
    tl.store(dbeta_ptr + tok_head, dbeta, mask=valid)

    # second walk: dP = dO U^T (dP, B and Gamma live)
    dp = tl.zeros((C, C), dtype=tl.float32)
    for v_first in range(0, DV, BV):
        dvs = v_first + tl.arange(0, BV)  # (BV,)
        v_off = (flat[:, None] * HV + head) * DV + dvs[None, :]  # (C, BV)
        v_mask = valid[:, None] & (dvs < DV)[None, :]
        u = tl.load(u_ptr + v_off, mask=v_mask, other=0.0)  # (C, BV) U
        dout = tl.load(dout_ptr + v_off, mask=v_mask, other=0.0).to(scratch)  # (C, BV) dO
        dp = tl.dot(dout, tl.trans(u), acc=dp, input_precision=PRECISION)

    # dS = tril(dP * Gamma): its gate pairs (Qs K^T)
    ds = tl.where(lower, dp * gamma_lower, 0.0)  # (C, C) dS
    qk = _gram(q_ptr, k_ptr, flat, valid, qk_head, HK, DK, BKS, C, PRECISION) * scale  # (C, C) Qs K^T
    dg += _straddling(ds * qk, strict)  # dP * P
    tl.store(dg_ptr + tok_head, dg, mask=valid)

    # (C, C) x (C, dk) products in blocks of BKS key dims: dK = (B + B^T) K + dS^T Qs, dQs = dS K (unscaled)
    for k_first in range(0, DK, BKS):
        dks = k_first + tl.arange(0, BKS)  # (BKS,)
        k_mask = valid[:, None] & (dks < DK)[None, :]  # (C, BKS)
        qk_off = (flat[:, None] * HK + qk_head) * DK + dks[None, :]  # (C, BKS)
        kh_off = (flat[:, None] * HV + head) * DK + dks[None, :]  # (C, BKS) per value head scratch
        k = tl.load(k_ptr + qk_off, mask=k_mask, other=0.0).to(tl.float32)  # (C, BKS)
        q = tl.load(q_ptr + qk_off, mask=k_mask, other=0.0).to(tl.float32) * scale  # (C, BKS) Qs
        dkh = tl.dot(b, k, input_precision=PRECISION) + tl.dot(tl.trans(b), k, input_precision=PRECISION)
        dkh += tl.dot(tl.trans(ds), q, input_precision=PRECISION)
        tl.store(dkh_ptr + kh_off, dkh, mask=k_mask)
        tl.store(dqh_ptr + kh_off, tl.dot(ds, k, input_precision=PRECISION), mask=k_mask)


@triton.jit
def _gates(g_ptr, beta_ptr, tok_head, rows, valid, count, HV: tl.constexpr, C: tl.constexpr):
    """``(C,)`` ``e^G``, ``beta e^G``, ``e^{G_C - G}`` (the exp of the gates after each token, summed from a shifted
    load: no difference of two ``G``; 0 past the end) and the scalar ``G_C`` of a chunk's rows of one value head."""
    g = tl.load(g_ptr + tok_head, mask=valid, other=0.0)  # (C,)
    later = tl.load(g_ptr + tok_head + HV, mask=rows + 1 < count, other=0.0)  # (C,) g_{i+1}, 0 past the end
    beta = tl.load(beta_ptr + tok_head, mask=valid, other=0.0)  # (C,)
    cum = tl.cumsum(g, axis=0)  # (C,) G; rows past the end hold G_C
    last = tl.sum(tl.where(rows == C - 1, cum, 0.0), axis=0)  # G_C
    decay = tl.exp(cum)  # (C,) e^G
    to_end = tl.where(valid, tl.exp(tl.cumsum(later, axis=0, reverse=True)), 0.0)  # (C,) e^{sum_{l > i} g_l}
    return decay, beta * decay, to_end, last


@triton.jit
def _states_bwd_kernel(
    q_ptr,  # (N, hk, dk)
    k_ptr,  # (N, hk, dk)
    g_ptr,  # (N, hv) fp32
    beta_ptr,  # (N, hv) fp32
    u_ptr,  # (N, hv, dv) scratch dtype (fp32, or the 16-bit inputs': MCORE_SSM_GDN_BWD_SCRATCH=inputs): U
    states_ptr,  # (M, hv, dk, dv) scratch dtype: S, the state entering each chunk
    dstates_ptr,  # (M, hv, dk, dv) scratch dtype: dS', the gradient of the state leaving it
    dout_ptr,  # (N, hv, dv) the output's dtype: dO
    dru_ptr,  # (N, hv, dv) scratch dtype: dR_u (kernel 1)
    dqh_ptr,  # (N, hv, dk) fp32: kernel 1's dQs of each value head (unscaled)
    dkh_ptr,  # (N, hv, dk) fp32: kernel 1's dK of each value head
    dq_ptr,  # (N, hk, dk) out
    dk_ptr,  # (N, hk, dk) out
    drw_k_ptr,  # (KB, N, hv) fp32 out: rowsum(dR_w K) over this block of key dims
    dqe_q_ptr,  # (KB, N, hv) fp32 out: rowsum(dQe Qs)
    dkt_k_ptr,  # (KB, N, hv) fp32 out: rowsum(dK~ K)
    dgamma_ptr,  # (KB, M, hv) fp32 out: <S, dS'> over this block of key dims
    chunk_start_ptr,  # (M,) int64
    chunk_len_ptr,  # (M,) int64
    plane,  # N hv
    scale,
    HK: tl.constexpr,
    HV: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BKS: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)  # int64: chunk * hv * dk * dv passes 2^31 at long batches
    qk_head = tl.program_id(1)
    block = tl.program_id(2).to(tl.int64)
    chunks = tl.num_programs(0)
    start = tl.load(chunk_start_ptr + chunk)
    count = tl.load(chunk_len_ptr + chunk)
    scratch = states_ptr.dtype.element_ty  # the dots' operands (S, dS', U, dR_u, dO): fp32 or 16-bit

    rows = tl.arange(0, C)  # (C,)
    valid = rows < count
    flat = start + rows  # (C,)
    dks = block * BKS + tl.arange(0, BKS)  # (BKS,)
    kmask = dks < DK
    k_mask = valid[:, None] & kmask[None, :]  # (C, BKS)
    qk_off = (flat[:, None] * HK + qk_head) * DK + dks[None, :]  # (C, BKS)
    dq = tl.zeros((C, BKS), dtype=tl.float32)  # dQs of the q/k head: its group summed in registers
    dk = tl.zeros((C, BKS), dtype=tl.float32)
    for member in range(0, HV // HK):
        head = qk_head * (HV // HK) + member
        tok_head = flat * HV + head  # (C,)
        drw = tl.zeros((C, BKS), dtype=tl.float32)  # -dR_w = dR_u S^T
        dqe = tl.zeros((C, BKS), dtype=tl.float32)  # dQe = dO S^T
        dkt = tl.zeros((C, BKS), dtype=tl.float32)  # dK~ = U dS'^T
        dgamma = 0.0
        state_base = (chunk * HV + head) * DK * DV
        for v_first in range(0, DV, BV):
            dvs = v_first + tl.arange(0, BV)  # (BV,)
            vmask = dvs < DV
            v_off = (flat[:, None] * HV + head) * DV + dvs[None, :]  # (C, BV)
            v_mask = valid[:, None] & vmask[None, :]
            s_off = state_base + dks[:, None] * DV + dvs[None, :]  # (BKS, BV)
            s_mask = kmask[:, None] & vmask[None, :]
            state = tl.load(states_ptr + s_off, mask=s_mask, other=0.0)  # (BKS, BV) S
            dstate = tl.load(dstates_ptr + s_off, mask=s_mask, other=0.0)  # (BKS, BV) dS'
            dgamma += tl.sum(tl.sum(state.to(tl.float32) * dstate.to(tl.float32), axis=1), axis=0)
            dru = tl.load(dru_ptr + v_off, mask=v_mask, other=0.0)  # (C, BV) dR_u
            drw = tl.dot(dru, tl.trans(state), acc=drw, input_precision=PRECISION)
            dout = tl.load(dout_ptr + v_off, mask=v_mask, other=0.0).to(scratch)  # (C, BV) dO
            dqe = tl.dot(dout, tl.trans(state), acc=dqe, input_precision=PRECISION)
            u = tl.load(u_ptr + v_off, mask=v_mask, other=0.0)  # (C, BV) U
            dkt = tl.dot(u, tl.trans(dstate), acc=dkt, input_precision=PRECISION)

        k = tl.load(k_ptr + qk_off, mask=k_mask, other=0.0).to(tl.float32)  # (C, BKS)
        q = tl.load(q_ptr + qk_off, mask=k_mask, other=0.0).to(tl.float32) * scale  # (C, BKS) Qs
        part = block * plane + tok_head  # (C,) this block's row of the partial sums
        tl.store(drw_k_ptr + part, -tl.sum(drw * k, axis=1), mask=valid)
        tl.store(dqe_q_ptr + part, tl.sum(dqe * q, axis=1), mask=valid)
        tl.store(dkt_k_ptr + part, tl.sum(dkt * k, axis=1), mask=valid)
        tl.store(dgamma_ptr + (block * chunks + chunk) * HV + head, dgamma)

        # dK += beta e^G dR_w + e^{G_C - G} dK~ + kernel 1's part, dQs += e^G dQe + kernel 1's part
        decay, scaled, to_end, last = _gates(g_ptr, beta_ptr, tok_head, rows, valid, count, HV, C)
        kh_off = (flat[:, None] * HV + head) * DK + dks[None, :]  # (C, BKS)
        dk += tl.load(dkh_ptr + kh_off, mask=k_mask, other=0.0) - scaled[:, None] * drw + to_end[:, None] * dkt
        dq += tl.load(dqh_ptr + kh_off, mask=k_mask, other=0.0) + decay[:, None] * dqe

    tl.store(dq_ptr + qk_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=k_mask)
    tl.store(dk_ptr + qk_off, dk.to(dk_ptr.dtype.element_ty), mask=k_mask)


@triton.jit
def _gate_bwd_kernel(
    g_ptr,  # (N, hv) fp32
    beta_ptr,  # (N, hv) fp32
    drw_k_ptr,  # (KB, N, hv) fp32: kernel 2's partial row sums
    dqe_q_ptr,  # (KB, N, hv) fp32
    dkt_k_ptr,  # (KB, N, hv) fp32
    dgamma_ptr,  # (KB, M, hv) fp32
    dg_ptr,  # (N, hv) fp32 in/out
    dbeta_ptr,  # (N, hv) fp32 in/out
    chunk_start_ptr,  # (M,) int64
    chunk_len_ptr,  # (M,) int64
    plane,  # N hv
    HV: tl.constexpr,
    KB: tl.constexpr,
    C: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    chunks = tl.num_programs(0)
    start = tl.load(chunk_start_ptr + chunk)
    count = tl.load(chunk_len_ptr + chunk)
    rows = tl.arange(0, C)  # (C,)
    valid = rows < count
    tok_head = (start + rows) * HV + head  # (C,)

    drw_k = tl.zeros((C,), dtype=tl.float32)  # rowsum(dR_w K)
    dqe_q = tl.zeros((C,), dtype=tl.float32)  # rowsum(dQe Qs)
    dkt_k = tl.zeros((C,), dtype=tl.float32)  # rowsum(dK~ K)
    dgamma = 0.0
    for _ in range(0, KB):  # fixed order: deterministic
        drw_k += tl.load(drw_k_ptr + tok_head, mask=valid, other=0.0)
        dqe_q += tl.load(dqe_q_ptr + tok_head, mask=valid, other=0.0)
        dkt_k += tl.load(dkt_k_ptr + tok_head, mask=valid, other=0.0)
        dgamma += tl.load(dgamma_ptr + chunk * HV + head)
        drw_k_ptr += plane
        dqe_q_ptr += plane
        dkt_k_ptr += plane
        dgamma_ptr += chunks * HV

    # dg_m += sum_{i >= m} (per-token terms) + sum_{i < m} z_i + dgamma e^{G_C}
    decay, scaled, to_end, last = _gates(g_ptr, beta_ptr, tok_head, rows, valid, count, HV, C)
    strict = rows[:, None] > rows[None, :]  # (C, C) j < i
    lower = rows[:, None] >= rows[None, :]  # (C, C) j <= i
    token_dG = scaled * drw_k + decay * dqe_q  # (C,)
    z = to_end * dkt_k  # (C,)
    dg = tl.sum(tl.where(lower, token_dG[:, None], 0.0), axis=0)  # (C,) over i >= m (column m)
    dg += tl.sum(tl.where(strict, z[None, :], 0.0), axis=1)  # over i < m (row m)
    dg += dgamma * tl.exp(last)
    dg += tl.load(dg_ptr + tok_head, mask=valid, other=0.0)
    dbeta = tl.load(dbeta_ptr + tok_head, mask=valid, other=0.0) + decay * drw_k
    tl.store(dg_ptr + tok_head, dg, mask=valid)
    tl.store(dbeta_ptr + tok_head, dbeta, mask=valid)


def chunk_terms_bwd_split(
    launch: Launch,
    inputs: tuple[torch.Tensor, ...],
    saved: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    grads: tuple[torch.Tensor, torch.Tensor],
    *,
    inverse: torch.Tensor | None = None,
    inverse_by: str = "doubling",
) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv, dg, dbeta)`` in the inputs' dtypes and shapes from ``inputs = (q, k, v, g, beta)`` (q, k, v
    contiguous, g and beta fp32 contiguous), ``saved = (U (N, hv, dv), S, dS' (M, hv, dk, dv))`` and ``grads =
    (dO, dU (N, hv, dv))``, all contiguous and fp32 but ``dO`` (the output's dtype): the contract of
    ``gdn_triton_chunk_bwd.chunk_terms_bwd``; or ``U, S, dS'`` all in the 16-bit inputs' dtype
    (``MCORE_SSM_GDN_BWD_SCRATCH=inputs``): then the dots that take them (and ``dR_u``, stored in that dtype too) run
    on 16-bit operands, fp32 accumulate. ``inverse``: each chunk's ``T (M, hv, C, C)`` fp32 as the WY kernel stored it
    (``gdn_triton.prepare``), loaded instead of recomputed; None recomputes it, by ``inverse_by``
    (``kernel_choice.GDN_INVERSE``: ``doubling`` or ``blocks16``, as the WY kernel)."""
    q, k, v, g, beta = inputs
    u, states, dstates = saved
    dout, du = grads
    tokens, hk, hv, dk = u.shape[0], launch.hk, launch.hv, launch.dk
    dv = torch.empty_like(v)
    dru = torch.empty_like(u)  # (N, hv, dv) U's dtype: fp32, or 16-bit with MCORE_SSM_GDN_BWD_SCRATCH=inputs
    dqh = g.new_empty(tokens, hv, dk)  # (N, hv, dk) fp32 kernel 1's parts; every token's row written
    dkh = g.new_empty(tokens, hv, dk)
    dg = g.new_empty(tokens, hv)  # (N, hv) fp32
    dbeta = g.new_empty(tokens, hv)
    dims = launch.dims
    key_block = min(64, dims["BK"])  # kernel 2's key dims a program (see the top)
    blocks = triton.cdiv(dk, key_block)
    chunks = launch.chunk_starts.numel()
    sums = g.new_empty(3, blocks, tokens, hv)  # (3, KB, N, hv) fp32 kernel 2's partial row sums
    dgamma = g.new_empty(blocks, chunks, hv)
    sizes = {
        "HK": dims["HK"],
        "HV": dims["HV"],
        "DK": dims["DK"],
        "DV": dims["DV"],
        "BKS": key_block,
        "BV": max(16, min(32, triton.next_power_of_2(launch.dv))),
        "C": CHUNK,
        "PRECISION": launch.precision,
    }
    bounds = (launch.chunk_starts, launch.chunk_lengths)
    # with T loaded (no doubling chain) at dk 128 and 16-bit inputs: 4 warps, 64 value columns, 255 registers, no
    # spill, 64 KB (two programs an SM); 8 warps otherwise (aligned offline sm_90 builds, 2026-12-07: RESULTS.md)
    two_per_sm = inverse is not None and launch.precision == "tf32" and dims["BK"] == 128
    pairs_bv = min(64, max(16, triton.next_power_of_2(launch.dv))) if two_per_sm else sizes["BV"]
    _pairs_bwd_kernel[(chunks, hv)](
        q,
        k,
        v,
        g,
        beta,
        u,
        dout,
        du,
        dv,
        dru,
        dqh,
        dkh,
        dg,
        dbeta,
        *bounds,
        inverse if inverse is not None else g,
        launch.scale,
        **{**sizes, "BV": pairs_bv},
        SAVED_T=inverse is not None,
        BLOCKS16=inverse_by == "blocks16",
        num_warps=4 if two_per_sm else 8,  # 8 at every dk otherwise: the (C, C) work does not shrink with it
        num_stages=1,
    )
    dq, dk_ = torch.empty_like(q), torch.empty_like(k)
    _states_bwd_kernel[(chunks, hk, blocks)](
        q,
        k,
        g,
        beta,
        u,
        states,
        dstates,
        dout,
        dru,
        dqh,
        dkh,
        dq,
        dk_,
        *sums,
        dgamma,
        *bounds,
        tokens * hv,
        launch.scale,
        **sizes,
        num_warps=8,  # 4 spilled at dk 32 (8 bytes)
        num_stages=1,
    )
    _gate_bwd_kernel[(chunks, hv)](
        g, beta, *sums, dgamma, dg, dbeta, *bounds, tokens * hv, HV=hv, KB=blocks, C=CHUNK, num_warps=4
    )
    return dq, dk_, dv, dg.to(g.dtype).view(g.shape), dbeta.to(beta.dtype).view(beta.shape)
