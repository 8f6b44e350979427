"""The GDN forward's state walk, second version (the default: ``MCORE_SSM_GDN_FWD`` unset or ``v2``, dk <= 128;
``v1`` runs the first; issue 22): the same job and results as ``gdn_triton._chunk_state_kernel`` (``U = U~ - W S``
and the state entering each chunk, walking each segment's chunks in order), shaped for more programs per SM;
imported only on CUDA or under Triton's interpreter.

Why: the walk is the forward's only sequential part. At B 8, T 4096, 32 value heads of dk = dv = 128, bf16, the
first version holds ``S (128, BV)``, a whole chunk's ``K`` and ``W (C, 128)`` and ``K~ = exp(G_C - G) K`` live at
once: 254-255 registers a thread at 8 warps (0-108 bytes spilled), so one program per SM and 512-1024 programs of
64 serial chunk steps in 4-8 waves over 132 SMs. This version

* keeps the state as ``NKB`` row blocks ``S_j (KB, BV)``, ``KB = min(BK, 64)`` (``NKB`` 1 or 2: dk <= 128), and
  loads ``W`` and ``K`` one 64-key block at a time next to the dot that uses it, so fewer tiles are live;
* gates ``U`` rather than ``K``: ``S = exp(G_C) S + K^T (exp(G_C - G) U)``, a ``(C, BV)`` scaling in place of a
  ``(C, dk)`` one, with ``K^T`` loaded transposed ``(KB, C)`` for the dot;
* is autotuned over 4 warps (two or three programs an SM) and 2-3 pipelining stages (the next chunk's loads
  overlap this chunk's dots).

Launch order: by default the grid is ``(segment, value head, value block)``, the value block slowest, so the
``dv / BV`` programs of one (segment, head), which load the same ``W`` and ``K`` rows chunk after chunk, run a wave
apart and each reads them from memory (at the bench shape, BV 32: ``W`` 4 times, 1.07 GB in bf16 and 2.15 GB in the
backward's fp32 rerun, ``K`` 4 times). Opt-in ``MCORE_SSM_GDN_WALK_ORDER=blocks`` (issue 22, not yet run on a GPU)
puts the value blocks of one (segment, head) next to each other (``BLOCKS_FIRST``: grid ``(value block + blocks x
segment, value head)``, as the backward's reverse walks already do): they run at once and walk the same chunks, so
all but the first read of each tile come from L2. Same programs, same results (bit for bit).

Shape legend as in ``gdn_triton``: N tokens, S segments, M chunks, hk / hv heads, dk / dv dims, C = 64, BK dk padded,
BV a block of value dims. Offline sm_90 builds and the configs kept: ``_state_v2_tuned``'s comment.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcore_ssm.gdn_triton import Launch, _interpreted, _prune_wide, _value_configs


@triton.jit
def _walk_block_update(
    state,
    k_head,
    flat,
    valid,
    gated,
    decay,
    first: tl.constexpr,
    HK: tl.constexpr,
    DK: tl.constexpr,
    KB: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``exp(G_C) S_j + K_j^T (exp(G_C - G) U)`` for the key block ``S_j (KB, BV)`` starting at key ``first``."""
    dks = first + tl.arange(0, KB)  # (KB,)
    kt_mask = (dks < DK)[:, None] & valid[None, :]
    kt = tl.load(k_head + flat[None, :] * (HK * DK) + dks[:, None], mask=kt_mask, other=0.0)  # (KB, C) K_j^T
    return state * decay + tl.dot(kt.to(gated.dtype), gated, input_precision=PRECISION)  # (KB, BV)


@triton.jit
def _chunk_state_v2_kernel(
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
    KB: tl.constexpr,  # rows of one state block: min(BK, 64)
    NKB: tl.constexpr,  # state blocks: 1 or 2
    BV: tl.constexpr,
    C: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCKS_FIRST: tl.constexpr,  # the value blocks of one (segment, head) neighbours in the launch (WALK_ORDER)
):
    if BLOCKS_FIRST:  # grid (value blocks x segments, hv)
        vblock = tl.program_id(0) % tl.cdiv(DV, BV)
        seg = tl.program_id(0) // tl.cdiv(DV, BV)
    else:  # grid (segments, hv, value blocks)
        seg = tl.program_id(0)
        vblock = tl.program_id(2)
    head = tl.program_id(1)
    qk_head = head // (HV // HK)
    start = tl.load(starts_ptr + seg)
    length = tl.load(lengths_ptr + seg)
    first_chunk = tl.load(first_chunk_ptr + seg)
    scratch = w_ptr.dtype.element_ty
    k_head = k_ptr + qk_head * DK  # token t's key at k_head + t * hk * dk
    w_head = w_ptr + head * DK
    u_head = u_ptr + head * DV
    vnew_head = vnew_ptr + head * DV

    rows = tl.arange(0, C)  # (C,)
    dk0 = tl.arange(0, KB)  # (KB,) keys of block 0
    dk1 = KB + dk0  # (KB,) keys of block 1 (NKB == 2)
    dvs = vblock * BV + tl.arange(0, BV)  # (BV,) this program's value columns
    vmask = dvs < DV
    cols0 = dk0[:, None] * DV + dvs[None, :]  # (KB, BV) inside one (dk, dv) state
    cols1 = dk1[:, None] * DV + dvs[None, :]
    mask0 = (dk0 < DK)[:, None] & vmask[None, :]
    mask1 = (dk1 < DK)[:, None] & vmask[None, :]
    s0 = tl.zeros((KB, BV), dtype=tl.float32)  # (KB, BV) state rows 0 .. KB
    s1 = tl.zeros((KB, BV), dtype=tl.float32)  # (KB, BV) state rows KB .. 2 KB (NKB == 2)
    if HAS_H0:
        h0 = h0_ptr + (seg * HV + head).to(tl.int64) * DK * DV
        s0 = tl.load(h0 + cols0, mask=mask0, other=0.0).to(tl.float32)
        if NKB == 2:
            s1 = tl.load(h0 + cols1, mask=mask1, other=0.0).to(tl.float32)

    for chunk_first in range(0, length, C):
        states = states_ptr + ((first_chunk + chunk_first // C) * HV + head).to(tl.int64) * DK * DV
        tl.store(states + cols0, s0.to(states_ptr.dtype.element_ty), mask=mask0)
        if NKB == 2:
            tl.store(states + cols1, s1.to(states_ptr.dtype.element_ty), mask=mask1)
        tok = chunk_first + rows  # (C,) position in the segment
        valid = tok < length
        flat = start + tok  # (C,) flat token index
        w_rows = w_head + flat[:, None] * (HV * DK)  # (C, 1)
        w0 = tl.load(w_rows + dk0[None, :], mask=valid[:, None] & (dk0 < DK)[None, :], other=0.0)  # (C, KB)
        wst = tl.dot(w0, s0.to(scratch), input_precision=PRECISION)  # (C, BV) W S
        if NKB == 2:
            w1 = tl.load(w_rows + dk1[None, :], mask=valid[:, None] & (dk1 < DK)[None, :], other=0.0)  # (C, KB)
            wst += tl.dot(w1, s1.to(scratch), input_precision=PRECISION)
        v_off = flat[:, None] * (HV * DV) + dvs[None, :]  # (C, BV)
        v_mask = valid[:, None] & vmask[None, :]
        u = tl.load(u_head + v_off, mask=v_mask, other=0.0)  # (C, BV) U~
        vnew = (u.to(tl.float32) - wst).to(scratch)  # (C, BV) U
        tl.store(vnew_head + v_off, vnew, mask=v_mask)

        last = tl.load(cum_ptr + (start + tl.minimum(chunk_first + C, length) - 1) * HV + head)  # G_C
        cum = tl.load(cum_ptr + flat * HV + head, mask=valid, other=0.0)  # (C,) G
        # rows past the segment's end: gate 0 (their U is 0 too); valid rows have G >= G_C, so exp(G_C - G) <= 1
        gate = tl.where(valid, tl.exp(tl.where(valid, last - cum, 0.0)), 0.0)  # (C,)
        gated = (vnew.to(tl.float32) * gate[:, None]).to(scratch)  # (C, BV) exp(G_C - G) U
        decay = tl.exp(last)
        s0 = _walk_block_update(s0, k_head, flat, valid, gated, decay, 0, HK, DK, KB, PRECISION)
        if NKB == 2:
            s1 = _walk_block_update(s1, k_head, flat, valid, gated, decay, KB, HK, DK, KB, PRECISION)

    if STORE_HT:
        ht = ht_ptr + (seg * HV + head).to(tl.int64) * DK * DV
        tl.store(ht + cols0, s0, mask=mask0)
        if NKB == 2:
            tl.store(ht + cols1, s1, mask=mask1)


# Aligned offline builds (the launcher's 16-byte pointer marks, 2026-12-07): (32, 4, 2) 95 registers, no spill, 80 KB;
# (32, 4, 3) 110, 117 KB; (64, 8, 2) 156, 96 KB; fp32 factors (the backward's rerun) 131 / 142 / 211, no spill.
# Unaligned (as every build before; inflated): offline sm_90 builds (Triton 3.9, ptxas 13.4, 2026-12-06) at dk = dv =
# 128, bf16, (BV, warps, stages), without / with initial and final states: (32, 4, 2) 254-255 registers, 8 / 0 bytes
# spilled, 16 KB shared (two programs an SM); (32, 4, 3) 24 / 8 bytes, 17 KB; (64, 8, 2) 48 / 72 bytes, 24 KB (one an
# SM, the first version's shape). Left out: 64 columns at 4 warps (212-452 bytes), 2 warps (no wgmma, ~1.1 KB).
# benchmarks/RESULTS.md, "GDN forward v2".
_state_v2_tuned = triton.autotune(
    configs=_value_configs(((32, 4, 2), (32, 4, 3), (64, 8, 2))),
    key=["HV", "DK", "DV", "HAS_H0", "STORE_HT", "PRECISION", "BLOCKS_FIRST"],
    prune_configs_by={"early_config_prune": _prune_wide},
)(_chunk_state_v2_kernel)


def run_states_v2(
    launch: Launch,
    k: torch.Tensor,
    prepared: tuple[torch.Tensor, ...],
    initial_state: torch.Tensor | None,
    *,
    final: bool,
    states_dtype: torch.dtype,
    blocks_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``gdn_triton.run_states``'s arguments and results (``U``, the chunk states, the final state or None);
    ``blocks_first``: the value blocks of one (segment, head) launched next to each other
    (``MCORE_SSM_GDN_WALK_ORDER=blocks``), same results."""
    assert launch.dims["BK"] <= 128, launch.dims  # at most two blocks of 64 keys
    w, u, cum = prepared
    count, chunks = launch.segments.count, launch.chunk_starts.numel()
    vnew = torch.empty_like(u)
    h0 = initial_state.contiguous() if initial_state is not None else cum.new_empty(1)
    ht = cum.new_empty(count, launch.hv, launch.dk, launch.dv) if final else cum.new_empty(1)
    states = torch.empty(chunks, launch.hv, launch.dk, launch.dv, device=u.device, dtype=states_dtype)
    args = (k, w, u, cum, vnew, h0, ht, states, launch.segments.starts, launch.segments.lengths, launch.first_chunk)
    block_k = launch.dims["BK"]
    sizes = {
        "HK": launch.hk,
        "HV": launch.hv,
        "DK": launch.dk,
        "DV": launch.dv,
        "KB": min(block_k, 64),
        "NKB": max(1, block_k // 64),
        "C": launch.dims["C"],
        "HAS_H0": initial_state is not None,
        "STORE_HT": final,
        "PRECISION": launch.precision,
        "BLOCKS_FIRST": blocks_first,
    }

    def grid(meta: dict[str, int]) -> tuple[int, int, int]:
        blocks = triton.cdiv(launch.dv, meta["BV"])
        return (blocks * count, launch.hv, 1) if blocks_first else (count, launch.hv, blocks)

    if _interpreted():
        block_v = launch.dims["BV"]
        _chunk_state_v2_kernel[grid({"BV": block_v})](*args, **sizes, BV=block_v, num_warps=4, num_stages=1)
    else:
        _state_v2_tuned[grid](*args, **sizes)
    return vnew, states, ht if final else None
