"""Backward of the per-chunk terms of the Triton gated delta rule: one kernel, all chunks in parallel.

Shape legend: N tokens, M chunks, hk query/key heads, hv value heads (a group of ``hv / hk`` per q/k head), dk key
dim, dv value dim, C = 64, BV a block of value dims.

The reverse walk (``mcore_ssm.gdn_triton_bwd``) leaves ``dU`` and the gradient ``dS'`` of the state leaving each
chunk; with the state ``S`` entering it and ``U = U~ - W S`` (the forward's, rerun in fp32) this kernel forms the
per-chunk terms' gradients ``dU~ = dU``, ``dW = -dU S^T``, ``dQe = dO S^T``, ``dK~ = U dS'^T``, ``dP = dO U^T``,
``dgamma = <S, dS'>`` and carries them to ``q, k, v, g, beta`` in token layout. Per chunk and value head, with
``G = cumsum(g)`` (rows past a segment's end: ``g = 0``, ``G = G_C``), ``Gamma_ij = exp(G_i - G_j)`` (j <= i),
``Qs = scale Q``::

    A = tril_{-1}(diag(beta) K K^T * Gamma);  T = (I + A)^-1;  [U~, W] = T [diag(beta) V, diag(beta e^G) K]
    P = tril(Qs K^T * Gamma);  Qe = e^G Qs;  K~ = e^{G_C - G} K;  gamma = e^{G_C}

Backward (the tests check it against autograd of the torch terms in float64):

- WY: ``dR = T^T [dU~, dW]``, ``dA = -tril_{-1}(dR_u U~^T + dR_w W^T)``. With ``dW = -dU S^T``: ``dR_w = -dR_u
  S^T`` and ``dA = -tril_{-1}(dR_u U^T)`` (``U = U~ - W S``): neither ``W`` nor a ``(C, dk)`` ``dR_w`` is formed.
  ``dv = beta dR_u``; ``dbeta = rowsum(dR_u V) + e^G rowsum(dR_w K) + rowsum(dA * KK^T * Gamma)``;
  ``B = diag(beta) (dA * Gamma)`` gives ``dK += (B + B^T) K``; ``dK += beta e^G dR_w``.
- ``P``: ``dS = tril(dP * Gamma)``: ``dQs += dS K``, ``dK += dS^T Qs``. ``Qe``: ``dQs += e^G dQe``. ``K~``:
  ``dK += e^{G_C - G} dK~``. The row sums ``rowsum(dR_w K)``, ``rowsum(dQe Qs)``, ``rowsum(dK~ K)`` come from
  ``(C, BV)`` products (``-dR_u * (K S)`` etc., summed over value blocks), the ``(C, dk)`` terms go straight into
  the ``dq, dk`` accumulators.
- The gate. Every exp's gradient lands on ``G``, and ``dg_m = sum_{i >= m} dG_i``. The pairwise terms
  (``E = dA * A + dP * P``, their exps ``Gamma_ij``) give ``+E_ij`` to ``G_i`` and ``-E_ij`` to ``G_j``: summed
  over ``i >= m`` they cancel except on the pairs straddling ``m``, so the kernel sums exactly those,
  ``dg_m = sum_{j < m} sum_{i >= m} E_ij`` (a reverse cumsum down the columns, then the strictly lower part of
  row m), never a difference of large sums: at gates of -30 a token the straddling pairs are ~e^-30 of the
  diagonal ones. Alike, ``K~``'s ``z_i = e^{G_C - G_i} <dK~_i, K_i>`` (``+z`` to ``G_C``, ``-z`` to ``G_i``) gives
  ``sum_{i < m} z_i`` (a masked sum, not a cumsum minus its term); the per-token ``e^G`` terms (``Qe``, ``W``'s
  right side) a masked sum over ``i >= m``; ``gamma`` adds ``dgamma e^{G_C}`` to every token. Every exp takes a
  non-positive argument, masked before the exp, and ``G_i - G_j`` is the sum of the gates between (a ``(C, C)``
  cumsum), not a difference of two ``G``, which at gates of -30 would cost ``Gamma`` ~1e-4 relative.

One program per (chunk, q/k head), looping over its group's value heads: ``dq, dk`` of the q/k head are summed in
registers (deterministic, no atomics, no per-value-head buffers). ``T`` is recomputed as the forward does
(``gdn_triton._double``). Dots are ``ieee`` fp32 for fp32 inputs; for 16-bit inputs ``K K^T`` and ``Q K^T`` take
the inputs (exact products, fp32 accumulate) and the rest tf32. Registers, offline sm_90 builds (Triton 3.9,
2026-12-06, dk = dv = 128, bf16, BV 32, 8 warps): 255 and ~1.3 KB spilled a thread, 96 KB of shared memory (4
warps: 2.6 KB spilled). The spills come mostly from the ``(C, C)`` work around the value loop (``T``, ``dA``,
``dP``, ``Gamma`` live together; the inverse alone already takes 255 registers), not from the ``(C, dk)``
accumulators (at dk = 64 it still spills ~1 KB).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcore_ssm.gdn_triton import CHUNK, Launch, _double


@triton.jit
def _straddling(pairs, strict):
    """``(C,)`` ``sum_{j < m <= i} pairs_ij`` for each m: the gate gradient of pairwise terms ``exp(G_i - G_j)``
    (``+pairs_ij`` on ``G_i``, ``-pairs_ij`` on ``G_j``, summed over ``i >= m``) without their cancelling parts."""
    below = tl.cumsum(pairs, axis=0, reverse=True)  # (C, C) [m, j]: sum_{i >= m} pairs_ij
    return tl.sum(tl.where(strict, below, 0.0), axis=1)  # (C,) over j < m


@triton.jit
def _chunk_terms_bwd_kernel(
    q_ptr,  # (N, hk, dk)
    k_ptr,  # (N, hk, dk)
    v_ptr,  # (N, hv, dv)
    g_ptr,  # (N, hv) fp32
    beta_ptr,  # (N, hv) fp32
    u_ptr,  # (N, hv, dv) fp32: U = U~ - W S
    states_ptr,  # (M, hv, dk, dv) fp32: S, the state entering each chunk
    dstates_ptr,  # (M, hv, dk, dv) fp32: dS', the gradient of the state leaving it
    dout_ptr,  # (N, hv, dv) the output's dtype: dO
    du_ptr,  # (N, hv, dv) fp32: dU
    dq_ptr,  # (N, hk, dk) out
    dk_ptr,  # (N, hk, dk) out
    dv_ptr,  # (N, hv, dv) out
    dg_ptr,  # (N, hv) out
    dbeta_ptr,  # (N, hv) out
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
    qk_head = tl.program_id(1)
    start = tl.load(chunk_start_ptr + chunk)
    count = tl.load(chunk_len_ptr + chunk)

    rows = tl.arange(0, C)  # (C,)
    dks = tl.arange(0, BK)  # (BK,)
    kmask = dks < DK
    valid = rows < count
    flat = start + rows  # (C,) flat token index
    k_mask = valid[:, None] & kmask[None, :]  # (C, BK)
    qk_off = (flat[:, None] * HK + qk_head) * DK + dks[None, :]  # (C, BK)
    strict = rows[:, None] > rows[None, :]  # (C, C) j < i
    lower = rows[:, None] >= rows[None, :]  # (C, C) j <= i
    dq = tl.zeros((C, BK), dtype=tl.float32)  # dQs, summed over the group
    dk = tl.zeros((C, BK), dtype=tl.float32)

    for member in range(0, HV // HK):
        head = qk_head * (HV // HK) + member
        tok_head = flat * HV + head  # (C,)
        g = tl.load(g_ptr + tok_head, mask=valid, other=0.0)  # (C,)
        beta = tl.load(beta_ptr + tok_head, mask=valid, other=0.0)  # (C,)
        cum = tl.cumsum(g, axis=0)  # (C,) G; rows past the end hold G_C
        last = tl.sum(tl.where(rows == C - 1, cum, 0.0), axis=0)  # G_C
        # G_i - G_j as the sum of the g between (not a difference of two G: at gates of -30 a token G reaches
        # -2000 in a chunk, and its rounding, ~1e-4 absolute, would be Gamma's relative error near the diagonal)
        between = tl.cumsum(tl.where(strict, g[:, None], 0.0), axis=0)  # (C, C) [i, j]: sum_{j < l <= i} g_l
        gamma_lower = tl.exp(tl.where(lower, between, float("-inf")))  # (C, C) Gamma, j <= i
        decay = tl.exp(cum)  # (C,) e^G
        # e^{G_C - G_i}: row C - 1 of Gamma (1 on the last row), 0 past the segment's end
        to_end = tl.where(valid, tl.sum(tl.where(rows[:, None] == C - 1, gamma_lower, 0.0), axis=0), 0.0)
        scaled = beta * decay  # (C,) beta e^G

        k_in = tl.load(k_ptr + qk_off, mask=k_mask, other=0.0)  # (C, BK) inputs' dtype: exact products
        kk = tl.dot(k_in, tl.trans(k_in), input_precision=PRECISION)  # (C, C) K K^T
        a = beta[:, None] * kk * tl.where(strict, gamma_lower, 0.0)  # (C, C) A
        pair = (rows // 2)[:, None] == (rows // 2)[None, :]
        inv = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0) - tl.where(pair, a, 0.0)  # (C, C)
        inv = _double(inv, a, rows, 2, PRECISION)
        inv = _double(inv, a, rows, 4, PRECISION)
        inv = _double(inv, a, rows, 8, PRECISION)
        inv = _double(inv, a, rows, 16, PRECISION)
        inv = _double(inv, a, rows, 32, PRECISION)  # (C, C) T
        inv_t = tl.trans(inv)  # (C, C) T^T

        da = tl.zeros((C, C), dtype=tl.float32)  # -dR_u U^T (masked below)
        dp = tl.zeros((C, C), dtype=tl.float32)  # dO U^T
        dbeta = tl.zeros((C,), dtype=tl.float32)
        drw_k = tl.zeros((C,), dtype=tl.float32)  # rowsum(dR_w * K)
        dqe_q = tl.zeros((C,), dtype=tl.float32)  # rowsum(dQe * Qs)
        dkt_k = tl.zeros((C,), dtype=tl.float32)  # rowsum(dK~ * K)
        dgamma = 0.0
        state_base = (chunk * HV + head) * DK * DV
        for v_first in range(0, DV, BV):
            dvs = v_first + tl.arange(0, BV)  # (BV,)
            vmask = dvs < DV
            v_off = (flat[:, None] * HV + head) * DV + dvs[None, :]  # (C, BV)
            v_mask = valid[:, None] & vmask[None, :]
            s_off = state_base + dks[:, None] * DV + dvs[None, :]  # (BK, BV)
            s_mask = kmask[:, None] & vmask[None, :]
            du = tl.load(du_ptr + v_off, mask=v_mask, other=0.0)  # (C, BV) dU = dU~
            dru = tl.dot(inv_t, du, input_precision=PRECISION)  # (C, BV) dR_u = T^T dU~
            tl.store(dv_ptr + v_off, (beta[:, None] * dru).to(dv_ptr.dtype.element_ty), mask=v_mask)
            vals = tl.load(v_ptr + v_off, mask=v_mask, other=0.0).to(tl.float32)  # (C, BV)
            dbeta += tl.sum(dru * vals, axis=1)
            u = tl.load(u_ptr + v_off, mask=v_mask, other=0.0)  # (C, BV) U
            da -= tl.dot(dru, tl.trans(u), input_precision=PRECISION)
            dout = tl.load(dout_ptr + v_off, mask=v_mask, other=0.0).to(tl.float32)  # (C, BV) dO
            dp += tl.dot(dout, tl.trans(u), input_precision=PRECISION)
            state = tl.load(states_ptr + s_off, mask=s_mask, other=0.0)  # (BK, BV) S
            dstate = tl.load(dstates_ptr + s_off, mask=s_mask, other=0.0)  # (BK, BV) dS'
            dgamma += tl.sum(tl.sum(state * dstate, axis=1), axis=0)
            k = tl.load(k_ptr + qk_off, mask=k_mask, other=0.0).to(tl.float32)  # (C, BK)
            # dR_w = -dR_u S^T, dQe = dO S^T, dK~ = U dS'^T: their row sums against K, Qs through (C, BV) products
            drw_k -= tl.sum(dru * tl.dot(k, state, input_precision=PRECISION), axis=1)
            dkt_k += tl.sum(u * tl.dot(k, dstate, input_precision=PRECISION), axis=1)
            q = tl.load(q_ptr + qk_off, mask=k_mask, other=0.0).to(tl.float32) * scale  # (C, BK) Qs
            dqe_q += tl.sum(dout * tl.dot(q, state, input_precision=PRECISION), axis=1)
            # dK += beta e^G dR_w + e^{G_C - G} dK~; dQs += e^G dQe
            dk -= tl.dot(scaled[:, None] * dru, tl.trans(state), input_precision=PRECISION)
            dk += tl.dot(to_end[:, None] * u, tl.trans(dstate), input_precision=PRECISION)
            dq += tl.dot(decay[:, None] * dout, tl.trans(state), input_precision=PRECISION)

        # dA = -tril_{-1}(dR_u U~^T + dR_w W^T) = -tril_{-1}(dR_u U^T) (U = U~ - W S, dR_w = -dR_u S^T).
        # The (C, C) matrices below are used and dropped one after another (register pressure, see the top).
        # dg_m = sum_{i >= m} (per-token terms) + sum_{i < m} z_i + dgamma e^{G_C} + the straddling pairs
        token_dG = scaled * drw_k + decay * dqe_q  # (C,)
        z = to_end * dkt_k  # (C,)
        dg = tl.sum(tl.where(lower, token_dG[:, None], 0.0), axis=0)  # (C,) sum over i >= m (column m)
        dg += tl.sum(tl.where(strict, z[None, :], 0.0), axis=1)  # sum over i < m (row m)
        dg += dgamma * tl.exp(last)
        da_gamma = tl.where(strict, da * gamma_lower, 0.0)  # (C, C) dA * Gamma
        k_in = tl.load(k_ptr + qk_off, mask=k_mask, other=0.0)  # (C, BK)
        kk = tl.dot(k_in, tl.trans(k_in), input_precision=PRECISION)  # (C, C)
        k = k_in.to(tl.float32)  # (C, BK)
        dbeta += tl.sum(da_gamma * kk, axis=1) + decay * drw_k
        b = beta[:, None] * da_gamma  # (C, C) B: dK += (B + B^T) K
        dg += _straddling(b * kk, strict)  # dA * A
        dk += tl.dot(b, k, input_precision=PRECISION) + tl.dot(tl.trans(b), k, input_precision=PRECISION)
        q_in = tl.load(q_ptr + qk_off, mask=k_mask, other=0.0)  # (C, BK)
        qk = tl.dot(q_in, tl.trans(k_in), input_precision=PRECISION) * scale  # (C, C) Qs K^T
        ds = tl.where(lower, dp * gamma_lower, 0.0)  # (C, C) dS = tril(dP * Gamma)
        dg += _straddling(ds * qk, strict)  # dP * P
        q = q_in.to(tl.float32) * scale  # (C, BK) Qs
        dk += tl.dot(tl.trans(ds), q, input_precision=PRECISION)
        dq += tl.dot(ds, k, input_precision=PRECISION)
        tl.store(dg_ptr + tok_head, dg.to(dg_ptr.dtype.element_ty), mask=valid)
        tl.store(dbeta_ptr + tok_head, dbeta.to(dbeta_ptr.dtype.element_ty), mask=valid)

    tl.store(dq_ptr + qk_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=k_mask)
    tl.store(dk_ptr + qk_off, dk.to(dk_ptr.dtype.element_ty), mask=k_mask)


def chunk_terms_bwd(
    launch: Launch,
    inputs: tuple[torch.Tensor, ...],
    saved: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    grads: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv, dg, dbeta)`` in the inputs' dtypes and shapes from ``inputs = (q, k, v, g, beta)`` (q, k, v
    contiguous, g and beta fp32 contiguous), ``saved = (U (N, hv, dv), S, dS' (M, hv, dk, dv))`` and ``grads =
    (dO, dU (N, hv, dv))``, all contiguous and fp32 but ``dO`` (the output's dtype)."""
    q, k, v, g, beta = inputs
    u, states, dstates = saved
    dout, du = grads
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dv = torch.empty_like(v)
    dg, dbeta = torch.empty_like(g), torch.empty_like(beta)
    dims = launch.dims
    _chunk_terms_bwd_kernel[(launch.chunk_starts.numel(), launch.hk)](
        q,
        k,
        v,
        g,
        beta,
        u,
        states,
        dstates,
        dout,
        du,
        dq,
        dk,
        dv,
        dg,
        dbeta,
        launch.chunk_starts,
        launch.chunk_lengths,
        launch.scale,
        HK=dims["HK"],
        HV=dims["HV"],
        DK=dims["DK"],
        DV=dims["DV"],
        BK=dims["BK"],
        BV=max(16, min(32, triton.next_power_of_2(launch.dv))),  # 64 spilled ~1.7 KB at dk 64 (32: 0.9)
        C=CHUNK,
        PRECISION=launch.precision,
        num_warps=8,
        num_stages=1,
    )
    return dq, dk, dv, dg, dbeta
