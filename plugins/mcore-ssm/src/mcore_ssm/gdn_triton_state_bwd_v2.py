"""The GDN backward's reverse state walk, second version (the default since 2026-12-07; ``MCORE_SSM_GDN_STATE_BWD=v1``
picks the first; dk <= 128; issue
22): the same job and results as ``gdn_triton_bwd._chunk_state_bwd_kernel`` (``dU = P^T dO + K~ dS'`` and the state
gradient carried back, ``dS = gamma dS' + Qe^T dO - W^T dU``, walking each segment's chunks in reverse), shaped for
more programs per SM; imported only on CUDA or under Triton's interpreter. GPU tests passed on an H100 (2026-12-07).

Why: the first version holds ``dS' (BK, BV)`` and whole ``(C, BK)`` tiles of ``Qe``, ``K~`` and ``W`` at once: 255
registers and ~450 bytes spilled a thread at 8 warps in offline sm_90 builds (dk = dv = 128, bf16), one program an
SM, 1024 programs of 64 serial chunk steps at the bench shape (4.6 ms of a 24 ms forward + backward on an H100,
2026-12-06 profile). As the forward's ``gdn_triton_state_v2`` (and fla's ``chunk_delta_h`` backward) this version

* keeps ``dS'`` as ``NKB`` row blocks ``dS'_j (KB, BV)``, ``KB = min(BK, 64)``, and loads ``K``, ``Q`` and ``W`` one
  64-key block at a time next to the dot that uses it (``K_j (C, KB)``; ``Q_j^T``, ``W_j^T (KB, C)`` transposed);
* scales the ``(C,)`` gate vectors into the ``(C, BV)`` side where it is smaller: ``K~_j dS'_j`` as ``e^{G_C - G}
  (K_j dS'_j)`` and ``Qe_j^T dO`` as ``Q_j^T (scale e^G dO)``, so no ``(C, KB)`` tile is rescaled;
* is autotuned over 4 warps (two programs an SM) and 1-2 pipelining stages (``CONFIGS``).

The same operands and dot precision as the first version: ``Q``, ``K`` in their dtype converted to fp32 at the
dot, ``W``, ``dU`` fp32, ``tf32`` dots for 16-bit inputs, ``ieee`` for fp32; with ``MCORE_SSM_GDN_BWD_SCRATCH=
inputs`` (16-bit inputs) ``W`` and the stored ``dS'`` in the inputs' dtype, but the dots' operands still fp32 (16-bit
operands here hit an illegal memory access on an H100 with Triton 3.6, 2026-12-07; ``dS'`` carried in fp32).

Shape legend as in ``gdn_triton``: N tokens, S segments, M chunks, hk / hv heads, dk / dv dims, C = 64, BK dk
padded, BV a block of value dims.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcore_ssm.gdn_triton import Launch, _interpreted, _prune_wide, _value_configs


@triton.jit
def _block_du(
    dstate,
    k_chunk,
    rows,
    valid,
    first: tl.constexpr,
    HK: tl.constexpr,
    DK: tl.constexpr,
    KB: tl.constexpr,
    PRECISION: tl.constexpr,
    SCRATCH: tl.constexpr,
):
    """``K_j dS'_j (C, BV)`` for the key block starting at key ``first`` (ungated); ``k_chunk`` points at the
    chunk's first key row (tile offsets in int32 from it); operands in ``SCRATCH`` (fp32, or 16-bit)."""
    dks = first + tl.arange(0, KB)  # (KB,)
    mask = valid[:, None] & (dks < DK)[None, :]
    k = tl.load(k_chunk + rows[:, None] * (HK * DK) + dks[None, :], mask=mask, other=0.0)  # (C, KB) K_j
    return tl.dot(k.to(SCRATCH), dstate.to(SCRATCH), input_precision=PRECISION)


@triton.jit
def _block_ds(
    dstate,
    gamma,
    q_chunk,
    w_chunk,
    rows,
    valid,
    dout_scaled,
    minus_du,
    first: tl.constexpr,
    HK: tl.constexpr,
    HV: tl.constexpr,
    DK: tl.constexpr,
    KB: tl.constexpr,
    PRECISION: tl.constexpr,
    SCRATCH: tl.constexpr,
):
    """``gamma dS'_j + Q_j^T (scale e^G dO) + W_j^T (-dU) (KB, BV)``, two dots into one accumulator: block j of the
    state gradient entering the chunk (``q_chunk``, ``w_chunk``: the chunk's first rows; ``dout_scaled`` and
    ``minus_du`` already in ``SCRATCH``, the operands' dtype; fp32 accumulate)."""
    dks = first + tl.arange(0, KB)  # (KB,)
    mask = (dks < DK)[:, None] & valid[None, :]  # (KB, C)
    qt = tl.load(q_chunk + rows[None, :] * (HK * DK) + dks[:, None], mask=mask, other=0.0)  # (KB, C) Q_j^T
    wt = tl.load(w_chunk + rows[None, :] * (HV * DK) + dks[:, None], mask=mask, other=0.0)  # (KB, C) W_j^T
    acc = tl.dot(qt.to(SCRATCH), dout_scaled, acc=gamma * dstate, input_precision=PRECISION)  # (KB, BV)
    return tl.dot(wt.to(SCRATCH), minus_du, acc=acc, input_precision=PRECISION)


@triton.jit
def _state_bwd_v2_kernel(
    q_ptr,  # (N, hk, dk)
    k_ptr,  # (N, hk, dk)
    w_ptr,  # (N, hv, dk) scratch dtype (fp32, or 16-bit with MCORE_SSM_GDN_BWD_SCRATCH=inputs): W
    g_ptr,  # (N, hv) fp32: the gates
    dout_ptr,  # (N, hv, dv) the output's dtype: dO
    dht_ptr,  # (S, hv, dk, dv) fp32 (unused without HAS_DHT)
    dh0_ptr,  # (S, hv, dk, dv) fp32 out
    du_ptr,  # (N, hv, dv) fp32 in: P^T dO (``_local_du_kernel``), out: dU (= dU~)
    dstates_ptr,  # (M, hv, dk, dv) scratch dtype out: dS', the gradient of the state leaving each chunk
    starts_ptr,  # (S,) int64
    lengths_ptr,  # (S,) int64
    first_chunk_ptr,  # (S,) int64
    scale,
    HK: tl.constexpr,
    HV: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    KB: tl.constexpr,  # rows of one state block: min(BK, 64)
    NKB: tl.constexpr,  # state blocks: 1 or 2
    BV: tl.constexpr,
    C: tl.constexpr,
    HAS_DHT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # the value blocks of one (segment, head) are neighbours in the launch order (their q, k, W, g loads share L2)
    vblock = tl.program_id(0) % tl.cdiv(DV, BV)
    seg = (tl.program_id(0) // tl.cdiv(DV, BV)).to(tl.int64)  # int64: seg * hv * dk * dv passes 2^31
    head = tl.program_id(1)
    qk_head = head // (HV // HK)
    start = tl.load(starts_ptr + seg)
    length = tl.load(lengths_ptr + seg)
    first_chunk = tl.load(first_chunk_ptr + seg)
    scratch: tl.constexpr = dstates_ptr.dtype.element_ty  # dS' as stored: fp32, or 16-bit
    # the dots' operands stay fp32 (tf32 / ieee) whatever the scratch: W and Q, K converted at the load, as in the
    # fp32 build that ran clean on an H100; 16-bit operands here hit an illegal memory access there (Triton 3.6)
    operands: tl.constexpr = tl.float32
    q_head = q_ptr + qk_head * DK  # token t's query at q_head + t * hk * dk
    k_head = k_ptr + qk_head * DK
    w_head = w_ptr + head * DK  # token t's W row at w_head + t * hv * dk

    rows = tl.arange(0, C)  # (C,)
    dk0 = tl.arange(0, KB)  # (KB,) keys of block 0
    dk1 = KB + dk0  # (KB,) keys of block 1 (NKB == 2)
    dvs = vblock * BV + tl.arange(0, BV)  # (BV,) this program's value columns
    vmask = dvs < DV
    cols0 = dk0[:, None] * DV + dvs[None, :]  # (KB, BV) inside one (dk, dv) state
    cols1 = dk1[:, None] * DV + dvs[None, :]
    mask0 = (dk0 < DK)[:, None] & vmask[None, :]
    mask1 = (dk1 < DK)[:, None] & vmask[None, :]
    ds0 = tl.zeros((KB, BV), dtype=tl.float32)  # (KB, BV) dS' rows 0 .. KB
    ds1 = tl.zeros((KB, BV), dtype=tl.float32)  # (KB, BV) rows KB .. 2 KB (NKB == 2)
    seg_state = (seg * HV + head) * DK * DV
    if HAS_DHT:
        ds0 = tl.load(dht_ptr + seg_state + cols0, mask=mask0, other=0.0)
        if NKB == 2:
            ds1 = tl.load(dht_ptr + seg_state + cols1, mask=mask1, other=0.0)

    count = (length + C - 1) // C
    for back in range(0, count):
        j = count - 1 - back  # chunks in reverse
        dstates = dstates_ptr + ((first_chunk + j) * HV + head).to(tl.int64) * DK * DV
        tl.store(dstates + cols0, ds0.to(scratch), mask=mask0)
        if NKB == 2:
            tl.store(dstates + cols1, ds1.to(scratch), mask=mask1)
        tok = j * C + rows  # (C,) position in the segment
        valid = tok < length
        flat = start + tok  # (C,)
        g = tl.load(g_ptr + flat * HV + head, mask=valid, other=0.0)  # (C,)
        cum = tl.cumsum(g, axis=0)  # (C,) G (rows past the end: G_C)
        # G_C - G_i = sum_{l > i} g_l: a reverse cumsum of the next token's gate (no difference of two G)
        after = (rows < C - 1) & (tok + 1 < length)
        to_end = tl.cumsum(tl.load(g_ptr + (flat + 1) * HV + head, mask=after, other=0.0), axis=0, reverse=True)
        gamma = tl.exp(tl.sum(tl.where(rows == C - 1, cum, 0.0), axis=0))  # e^{G_C}
        # scalar int64 pointers to the chunk's first row, int32 tile offsets from them (fewer registers than
        # int64 offset tiles)
        first_tok = start + j * C
        q_chunk = q_head + first_tok * (HK * DK)
        k_chunk = k_head + first_tok * (HK * DK)
        w_chunk = w_head + first_tok * (HV * DK)
        v_off = rows[:, None] * (HV * DV) + dvs[None, :]  # (C, BV) int32, from the chunk's first value row
        v_chunk = first_tok * (HV * DV) + head * DV  # int64: the chunk's first value row of this head
        v_mask = valid[:, None] & vmask[None, :]

        # dU = P^T dO + e^{G_C - G} (K dS'): K~ dS' with the gate on the (C, BV) product
        kds = _block_du(ds0, k_chunk, rows, valid, 0, HK, DK, KB, PRECISION, operands)  # (C, BV)
        if NKB == 2:
            kds += _block_du(ds1, k_chunk, rows, valid, KB, HK, DK, KB, PRECISION, operands)
        du = tl.load(du_ptr + v_chunk + v_off, mask=v_mask, other=0.0) + tl.exp(to_end)[:, None] * kds  # (C, BV)
        tl.store(du_ptr + v_chunk + v_off, du, mask=v_mask)
        dout = tl.load(dout_ptr + v_chunk + v_off, mask=v_mask, other=0.0).to(tl.float32)  # (C, BV) dO
        dout_scaled = (dout * (scale * tl.exp(cum))[:, None]).to(operands)  # (C, BV) scale e^G dO: Qe^T dO = Q^T this
        minus_du = (-du).to(operands)  # (C, BV)
        ds0 = _block_ds(
            ds0, gamma, q_chunk, w_chunk, rows, valid, dout_scaled, minus_du, 0, HK, HV, DK, KB, PRECISION, operands
        )
        if NKB == 2:
            ds1 = _block_ds(
                ds1,
                gamma,
                q_chunk,
                w_chunk,
                rows,
                valid,
                dout_scaled,
                minus_du,
                KB,
                HK,
                HV,
                DK,
                KB,
                PRECISION,
                operands,
            )

    tl.store(dh0_ptr + seg_state + cols0, ds0, mask=mask0)
    if NKB == 2:
        tl.store(dh0_ptr + seg_state + cols1, ds1, mask=mask1)


# (BV, warps, stages). Offline sm_90 builds (Triton 3.9, ptxas 13.4, 2026-12-07, pointers marked 16-byte aligned as
# the launcher marks torch's tensors) at dk = dv = 128, bf16 inputs (tf32 dots), without / with dS' of the final
# state: (32, 4, 1) 255 / 246 registers, 8 / 0 bytes spilled, 32 KB shared (two programs an SM); (32, 4, 2) 8 / 0 bytes,
# 132 KB; (16, 4, 2) 203 registers, none, 114 KB; (32, 8, 1) 32 bytes, 36 KB (one an SM, the first version's shape:
# 255 registers, 136 bytes, 60 KB). Left out: 64 columns (200-380 bytes), 2 warps (no wgmma, 1.3 KB).
# benchmarks/RESULTS.md, "GDN backward, offline"; benchmarks/offline_gdn_bwd.py prints them.
CONFIGS = _value_configs(((32, 4, 1), (32, 4, 2), (16, 4, 2), (32, 8, 1)))
# The walk adds to ``du`` in place: the autotuner's timing runs restore it
_state_bwd_v2_tuned = triton.autotune(
    configs=CONFIGS,
    key=["HV", "DK", "DV", "HAS_DHT", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_wide},
    restore_value=["du_ptr"],
)(_state_bwd_v2_kernel)


def run_state_bwd_v2(
    launch: Launch,
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    dout: torch.Tensor,
    dht: torch.Tensor | None,
    du: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_chunk_state_bwd_kernel``'s job: ``du (N, hv, dv)`` fp32 (in: ``P^T dO``, out: ``dU``) updated in place;
    returns ``(dS' (M, hv, dk, dv)`` in ``w``'s dtype (fp32, or 16-bit with ``MCORE_SSM_GDN_BWD_SCRATCH=inputs``),
    ``d initial state (S, hv, dk, dv)`` fp32). q, k contiguous, ``w (N, hv, dk)`` fp32 or 16-bit, ``g (N, hv)`` fp32,
    ``dout (N, hv, dv)`` in the output's dtype, ``dht`` fp32 or None."""
    assert launch.dims["BK"] <= 128, launch.dims  # at most two blocks of 64 keys
    count, chunks = launch.segments.count, launch.chunk_starts.numel()
    hv, dk, dv = launch.hv, launch.dk, launch.dv
    dh0 = g.new_empty(count, hv, dk, dv)  # fp32
    dstates = w.new_empty(chunks, hv, dk, dv)
    bounds = (launch.segments.starts, launch.segments.lengths, launch.first_chunk)
    args = (q, k, w, g, dout, dht if dht is not None else g.new_empty(1), dh0, du, dstates, *bounds, launch.scale)
    block_k = launch.dims["BK"]
    sizes = {
        "HK": launch.hk,
        "HV": hv,
        "DK": dk,
        "DV": dv,
        "KB": min(block_k, 64),
        "NKB": max(1, block_k // 64),
        "C": launch.dims["C"],
        "HAS_DHT": dht is not None,
        "PRECISION": launch.precision,
    }
    if _interpreted():
        block_v = max(16, min(32, triton.next_power_of_2(dv)))
        grid = (triton.cdiv(dv, block_v) * count, hv)
        _state_bwd_v2_kernel[grid](*args, **sizes, BV=block_v, num_warps=4, num_stages=1)
    else:
        _state_bwd_v2_tuned[lambda meta: (triton.cdiv(dv, meta["BV"]) * count, hv)](*args, **sizes)
    return dstates, dh0
