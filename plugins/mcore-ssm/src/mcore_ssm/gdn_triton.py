"""Triton forward kernels of the chunked gated delta rule (chunk 64, fp32 state); imported only on CUDA.

Shape legend: N flattened tokens, S segments (``mcore_ssm.packing``), M chunks, hk query/key heads, hv value
heads, dk key dim, dv value dim, C = 64 chunk, BK dk padded to a power of two, BV a block of the value dims.

The math is ``mcore_ssm.gdn_reference.chunk_gated_delta_rule`` (its docstring derives it). Chunks never
straddle segments: each segment is cut into its own chunks, and the rows of a chunk past its segment's end
load as zeros (``k = v = q = 0``, ``beta = g = 0``: inert; their ``G`` is the chunk's last, ``G_C``). Every exp
takes a non-positive argument (``G`` falls along a chunk; masked entries are set to ``-inf`` before the exp), so
a strong decay underflows to 0 and never overflows into ``inf * 0 = NaN``. Two kernels:

1. ``_chunk_prepare_kernel``, one program per (chunk, value head), all in parallel: ``G = cumsum(g)``,
   ``A = tril_{-1}(diag(beta) K K^T * exp(G_i - G_j))``, ``T = (I + A)^-1`` by forward substitution row by
   row (exact, as ``solve_triangular``; no power series, which cancels badly when keys repeat), then the WY
   factors ``W = T diag(beta exp(G)) K`` and ``U~ = T diag(beta) V``, stored fp32 per token with ``G``.
2. ``_chunk_state_kernel``, one program per (segment, value head, block of BV value dims): the columns of the
   state ``S (dk, dv)`` evolve independently (``u = beta (v - S^T k)`` is per value column), so a program holds
   ``S[:, block]`` in registers in fp32 and walks its segment's chunks in order: ``U = U~ - W S``;
   ``O = (exp(G) Q) S + tril(Q K^T * exp(G_i - G_j)) U``; ``S = exp(G_C) S + (exp(G_C - G) K)^T U``.

Dots run in fp32 (``ieee``) for fp32 inputs and in tf32 for 16-bit inputs (which carry fewer bits than
tf32 keeps). The WY factors cost ``N * hv * (dk + dv + 1)`` fp32 of scratch during the call. Backward
(``gated_delta_rule_triton`` is an ``autograd.Function``): ``mcore_ssm.gdn_triton_bwd``, which reruns these
kernels with ``STORE_STATES`` (the state entering every chunk, ``M * hv * dk * dv`` fp32) instead of keeping
anything from the forward but its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Unpack

import torch
import triton
import triton.language as tl

from mcore_ssm.gdn_reference import CHUNK, ChunkRuleOptions
from mcore_ssm.packing import Segments, check_state_count, segments_of


@triton.jit
def _chunk_prepare_kernel(
    k_ptr,  # (N, hk, dk)
    v_ptr,  # (N, hv, dv)
    g_ptr,  # (N, hv) fp32
    beta_ptr,  # (N, hv) fp32
    w_ptr,  # (N, hv, dk) fp32 out: W
    u_ptr,  # (N, hv, dv) fp32 out: U~
    cum_ptr,  # (N, hv) fp32 out: G
    chunk_start_ptr,  # (M,) int64 first flat token of each chunk
    chunk_len_ptr,  # (M,) int64 its tokens (1..C)
    HK: tl.constexpr,
    HV: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    PRECISION: tl.constexpr,
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
    lower = rows[:, None] >= rows[None, :]  # (C, C) j <= i
    strict = rows[:, None] > rows[None, :]  # (C, C) j < i

    k_off = (flat[:, None] * HK + qk_head) * DK + dks[None, :]  # (C, BK)
    k_mask = valid[:, None] & (dks < DK)[None, :]
    k = tl.load(k_ptr + k_off, mask=k_mask, other=0.0).to(tl.float32)  # (C, BK)
    g = tl.load(g_ptr + flat * HV + head, mask=valid, other=0.0)  # (C,)
    beta = tl.load(beta_ptr + flat * HV + head, mask=valid, other=0.0)  # (C,)

    cum = tl.cumsum(g, axis=0)  # (C,) G
    # exp(G_i - G_j) for j <= i only (G falls along the chunk: the argument is <= 0); above the diagonal it is
    # -inf before the exp, never exp of the positive difference (overflows to inf at strong decay)
    ratio = tl.exp(tl.where(lower, cum[:, None] - cum[None, :], float("-inf")))  # (C, C)
    kk = tl.dot(k, tl.trans(k), input_precision=PRECISION)  # (C, C)
    a = tl.where(strict, beta[:, None] * kk * ratio, 0.0)  # (C, C) A

    # T = (I + A)^-1 by forward substitution: row i = e_i - sum_{j < i} A[i, j] T[j, :]
    inv = tl.zeros((C, C), dtype=tl.float32)
    for i in range(C):
        a_row = tl.sum(tl.where(rows[:, None] == i, a, 0.0), axis=0)  # (C,) A[i, :]
        row = tl.sum(a_row[:, None] * inv, axis=0)  # (C,) sum_j A[i, j] T[j, :]
        e_i = tl.where(rows == i, 1.0, 0.0)
        inv = tl.where(rows[:, None] == i, (e_i - row)[None, :], inv)

    w = tl.dot(inv, k * (beta * tl.exp(cum))[:, None], input_precision=PRECISION)  # (C, BK) W
    w_off = (flat[:, None] * HV + head) * DK + dks[None, :]  # (C, BK)
    tl.store(w_ptr + w_off, w, mask=k_mask)
    tl.store(cum_ptr + flat * HV + head, cum, mask=valid)
    for v_first in range(0, DV, BV):
        dvs = v_first + tl.arange(0, BV)  # (BV,)
        v_off = (flat[:, None] * HV + head) * DV + dvs[None, :]  # (C, BV)
        v_mask = valid[:, None] & (dvs < DV)[None, :]
        v = tl.load(v_ptr + v_off, mask=v_mask, other=0.0).to(tl.float32)  # (C, BV)
        u = tl.dot(inv, v * beta[:, None], input_precision=PRECISION)  # (C, BV) U~
        tl.store(u_ptr + v_off, u, mask=v_mask)


@triton.jit
def _chunk_state_kernel(
    q_ptr,  # (N, hk, dk)
    k_ptr,  # (N, hk, dk)
    w_ptr,  # (N, hv, dk) fp32: W
    u_ptr,  # (N, hv, dv) fp32: U~
    cum_ptr,  # (N, hv) fp32: G
    out_ptr,  # (N, hv, dv) fp32 out
    h0_ptr,  # (S, hv, dk, dv) fp32 (unused without HAS_H0)
    ht_ptr,  # (S, hv, dk, dv) fp32 out (unused without STORE_HT)
    states_ptr,  # (M, hv, dk, dv) fp32 out: the state entering each chunk (unused without STORE_STATES)
    starts_ptr,  # (S,) int64
    lengths_ptr,  # (S,) int64
    first_chunk_ptr,  # (S,) int64 each segment's first chunk
    scale,
    HK: tl.constexpr,
    HV: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    STORE_STATES: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seg = tl.program_id(0)
    head = tl.program_id(1)
    vblock = tl.program_id(2)
    qk_head = head // (HV // HK)
    start = tl.load(starts_ptr + seg)
    length = tl.load(lengths_ptr + seg)

    rows = tl.arange(0, C)  # (C,)
    dks = tl.arange(0, BK)  # (BK,)
    dvs = vblock * BV + tl.arange(0, BV)  # (BV,) this program's value columns
    kmask = dks < DK
    vmask = dvs < DV
    lower = rows[:, None] >= rows[None, :]  # (C, C) j <= i

    state_off = ((seg * HV + head) * DK + dks[:, None]) * DV + dvs[None, :]  # (BK, BV)
    state_mask = kmask[:, None] & vmask[None, :]
    if HAS_H0:
        state = tl.load(h0_ptr + state_off, mask=state_mask, other=0.0)  # (BK, BV) fp32
    else:
        state = tl.zeros((BK, BV), dtype=tl.float32)

    first_chunk = tl.load(first_chunk_ptr + seg)
    for chunk_first in range(0, length, C):
        if STORE_STATES:  # for the backward: the state this chunk starts from
            chunk_id = first_chunk + chunk_first // C
            tl.store(
                states_ptr + ((chunk_id * HV + head) * DK + dks[:, None]) * DV + dvs[None, :], state, mask=state_mask
            )
        tok = chunk_first + rows  # (C,) position in the segment
        valid = tok < length
        flat = start + tok  # (C,) flat token index
        qk_off = (flat[:, None] * HK + qk_head) * DK + dks[None, :]  # (C, BK)
        qk_mask = valid[:, None] & kmask[None, :]
        q = tl.load(q_ptr + qk_off, mask=qk_mask, other=0.0).to(tl.float32) * scale  # (C, BK)
        k = tl.load(k_ptr + qk_off, mask=qk_mask, other=0.0).to(tl.float32)  # (C, BK)
        w_off = (flat[:, None] * HV + head) * DK + dks[None, :]  # (C, BK)
        w = tl.load(w_ptr + w_off, mask=qk_mask, other=0.0)  # (C, BK)
        v_off = (flat[:, None] * HV + head) * DV + dvs[None, :]  # (C, BV)
        v_mask = valid[:, None] & vmask[None, :]
        u = tl.load(u_ptr + v_off, mask=v_mask, other=0.0)  # (C, BV) U~
        last_tok = start + tl.minimum(chunk_first + C, length) - 1
        last = tl.load(cum_ptr + last_tok * HV + head)  # G_C: G at the chunk's last token
        # rows past the segment's end hold G_C (their g is 0), not 0: with 0 there, exp(G_i - G_j) of a padding
        # row i overflowed at strong decay, and inf * 0 = NaN
        cum = tl.load(cum_ptr + flat * HV + head, mask=valid, other=0.0)
        cum = tl.where(valid, cum, last)  # (C,) G

        u = u - tl.dot(w, state, input_precision=PRECISION)  # (C, BV) U
        ratio = tl.exp(tl.where(lower, cum[:, None] - cum[None, :], float("-inf")))  # (C, C) exp(G_i - G_j), j <= i
        scores = tl.where(lower, tl.dot(q, tl.trans(k), input_precision=PRECISION) * ratio, 0.0)  # (C, C)
        out = tl.dot(q * tl.exp(cum)[:, None], state, input_precision=PRECISION)  # (C, BV)
        out += tl.dot(scores, u, input_precision=PRECISION)
        tl.store(out_ptr + v_off, out, mask=v_mask)
        k_end = tl.where(valid[:, None], k * tl.exp(last - cum)[:, None], 0.0)  # (C, BK)
        state = state * tl.exp(last) + tl.dot(tl.trans(k_end), u, input_precision=PRECISION)  # (BK, BV)

    if STORE_HT:
        tl.store(ht_ptr + state_off, state, mask=state_mask)


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
    launch: Launch, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Kernel 1: ``(W (N, hv, dk), U~ (N, hv, dv), G (N, hv))`` in fp32 (inputs contiguous, g and beta fp32)."""
    tokens = v.shape[0] * v.shape[1]
    w = torch.empty(tokens, launch.hv, launch.dk, device=v.device, dtype=torch.float32)
    u = torch.empty(tokens, launch.hv, launch.dv, device=v.device, dtype=torch.float32)
    cum = torch.empty(tokens, launch.hv, device=v.device, dtype=torch.float32)
    _chunk_prepare_kernel[(launch.chunk_starts.numel(), launch.hv)](
        k,
        v,
        g,
        beta,
        w,
        u,
        cum,
        launch.chunk_starts,
        launch.chunk_lengths,
        **launch.dims,
        PRECISION=launch.precision,
        num_warps=launch.warps,
    )
    return w, u, cum


def run_states(
    launch: Launch,
    q: torch.Tensor,
    k: torch.Tensor,
    prepared: tuple[torch.Tensor, ...],
    initial_state: torch.Tensor | None,
    *,
    final: bool,
    store_states: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Kernel 2: ``(out (N, hv, dv) fp32, final state (S, hv, dk, dv) or None, entering state of every chunk
    (M, hv, dk, dv) or None)``."""
    w, u, cum = prepared
    tokens = q.shape[0] * q.shape[1]
    count, chunks = launch.segments.count, launch.chunk_starts.numel()
    out = torch.empty(tokens, launch.hv, launch.dv, device=q.device, dtype=torch.float32)
    h0 = initial_state.float().contiguous() if initial_state is not None else out.new_empty(1)
    ht = out.new_empty(count, launch.hv, launch.dk, launch.dv) if final else out.new_empty(1)
    states = out.new_empty(chunks, launch.hv, launch.dk, launch.dv) if store_states else out.new_empty(1)
    _chunk_state_kernel[(count, launch.hv, launch.value_blocks)](
        q,
        k,
        w,
        u,
        cum,
        out,
        h0,
        ht,
        states,
        launch.segments.starts,
        launch.segments.lengths,
        launch.first_chunk,
        launch.scale,
        **launch.dims,
        HAS_H0=initial_state is not None,
        STORE_HT=final,
        STORE_STATES=store_states,
        PRECISION=launch.precision,
        num_warps=launch.warps,
        num_stages=launch.stages,
    )
    return out, ht if final else None, states if store_states else None


class _ChunkGatedDeltaRule(torch.autograd.Function):
    """Forward: the two kernels. Backward: ``mcore_ssm.gdn_triton_bwd`` (recomputes the forward's factors and
    chunk states, walks the chunks in reverse in Triton, differentiates the per-chunk terms in torch)."""

    @staticmethod
    def forward(ctx: Any, q, k, v, g, beta, initial_state, cu_seqlens, scale, output_final_state, segments):  # type: ignore[override]
        launch = launch_for(q, k, v, g, beta, scale, initial_state, cu_seqlens, segments)
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
        prepared = prepare(launch, kc, vc, g.float().contiguous(), beta.float().contiguous())
        out, final, _ = run_states(
            launch, qc, kc, prepared, initial_state, final=output_final_state, store_states=False
        )
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        ctx.launch, ctx.output_final_state = launch, output_final_state
        return out.view(*v.shape[:2], launch.hv, launch.dv).to(v.dtype), final

    @staticmethod
    def backward(ctx: Any, grad_out, grad_final):  # type: ignore[override]
        from mcore_ssm.gdn_triton_bwd import chunk_gated_delta_rule_bwd

        q, k, v, g, beta, initial_state = ctx.saved_tensors
        grads = chunk_gated_delta_rule_bwd(
            ctx.launch, q, k, v, g, beta, initial_state, grad_out, grad_final if ctx.output_final_state else None
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
