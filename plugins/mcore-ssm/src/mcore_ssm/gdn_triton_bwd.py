"""Backward of the Triton chunked gated delta rule: a reverse state kernel plus the per-chunk terms' autograd.

Shape legend: N tokens, S segments, M chunks, hv value heads, dk key dim, dv value dim, C = 64, NVB value blocks.

The forward (``mcore_ssm.gdn_triton``) is per chunk, with the per-chunk terms ``W``, ``U~`` (the WY factors),
``P = tril(scale Q K^T * exp(G_i - G_j))``, ``Qe = scale Q exp(G)``, ``K~ = exp(G_C - G) K`` and
``gamma = exp(G_C)`` (all functions of the chunk's own tokens), and the sequential part, per segment::

    U = U~ - W S;   O = Qe S + P U;   S' = gamma S + K~^T U

Backward, walking each segment's chunks in reverse with ``dS'`` (the final state's gradient, else zero):
``dU = P^T dO + K~ dS'``; ``dS = Qe^T dO + gamma dS' - W^T dU``; and the per-chunk terms' gradients
``dU~ = dU``, ``dW = -dU S^T``, ``dQe = dO S^T``, ``dP = dO U^T``, ``dK~ = U dS'^T``, ``dgamma = <S, dS'>``.
That walk is ``_chunk_state_bwd_kernel`` (one program per segment, value head and block of value dims, like
the forward; it reads the state entering each chunk, which the forward's state kernel stores (rerun here in
fp32), and writes
per value block partial sums that are added here). The per-chunk terms are then recomputed in torch on all
chunks at once (no loop: batched matmuls and a batched triangular solve) and differentiated by autograd with
those gradients, which carries them to ``q, k, v, g, beta``; ``dS`` at each segment's start is the initial
state's gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcore_ssm.gdn_triton import CHUNK, Launch, prepare, run_states
from mcore_ssm.segsum import segsum


@triton.jit
def _chunk_state_bwd_kernel(
    q_ptr,  # (N, hk, dk)
    k_ptr,  # (N, hk, dk)
    w_ptr,  # (N, hv, dk) fp32: W
    u_ptr,  # (N, hv, dv) fp32: U~
    cum_ptr,  # (N, hv) fp32: G
    states_ptr,  # (M, hv, dk, dv) fp32: the state entering each chunk
    dout_ptr,  # (N, hv, dv) fp32
    dht_ptr,  # (S, hv, dk, dv) fp32 (unused without HAS_DHT)
    dh0_ptr,  # (S, hv, dk, dv) fp32 out
    du_ptr,  # (N, hv, dv) fp32 out: dU~
    dw_ptr,  # (NVB, N, hv, dk) fp32 out: partial dW
    dqe_ptr,  # (NVB, N, hv, dk) fp32 out: partial dQe
    dkt_ptr,  # (NVB, N, hv, dk) fp32 out: partial dK~
    dp_ptr,  # (NVB, M, hv, C, C) fp32 out: partial dP
    dgamma_ptr,  # (NVB, M, hv) fp32 out: partial dgamma
    starts_ptr,  # (S,) int64
    lengths_ptr,  # (S,) int64
    first_chunk_ptr,  # (S,) int64
    scale,
    tokens,
    chunks,
    HK: tl.constexpr,
    HV: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    HAS_DHT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seg = tl.program_id(0)
    head = tl.program_id(1)
    vblock = tl.program_id(2)
    qk_head = head // (HV // HK)
    start = tl.load(starts_ptr + seg)
    length = tl.load(lengths_ptr + seg)
    first_chunk = tl.load(first_chunk_ptr + seg)

    rows = tl.arange(0, C)  # (C,)
    dks = tl.arange(0, BK)  # (BK,)
    dvs = vblock * BV + tl.arange(0, BV)  # (BV,)
    kmask = dks < DK
    vmask = dvs < DV
    lower = rows[:, None] >= rows[None, :]  # (C, C) j <= i
    state_mask = kmask[:, None] & vmask[None, :]
    state_cols = dks[:, None] * DV + dvs[None, :]  # (BK, BV) inside one (dk, dv) state
    seg_state = (seg * HV + head) * DK * DV + state_cols
    if HAS_DHT:
        dstate = tl.load(dht_ptr + seg_state, mask=state_mask, other=0.0)  # (BK, BV) dS'
    else:
        dstate = tl.zeros((BK, BV), dtype=tl.float32)

    count = (length + C - 1) // C
    for back in range(0, count):
        j = count - 1 - back  # chunks in reverse
        chunk_id = first_chunk + j
        tok = j * C + rows  # (C,) position in the segment
        valid = tok < length
        flat = start + tok  # (C,)
        qk_off = (flat[:, None] * HK + qk_head) * DK + dks[None, :]  # (C, BK)
        qk_mask = valid[:, None] & kmask[None, :]
        q = tl.load(q_ptr + qk_off, mask=qk_mask, other=0.0).to(tl.float32) * scale  # (C, BK)
        k = tl.load(k_ptr + qk_off, mask=qk_mask, other=0.0).to(tl.float32)  # (C, BK)
        hk_off = (flat[:, None] * HV + head) * DK + dks[None, :]  # (C, BK) per value head
        w = tl.load(w_ptr + hk_off, mask=qk_mask, other=0.0)  # (C, BK)
        v_off = (flat[:, None] * HV + head) * DV + dvs[None, :]  # (C, BV)
        v_mask = valid[:, None] & vmask[None, :]
        u = tl.load(u_ptr + v_off, mask=v_mask, other=0.0)  # (C, BV) U~
        dout = tl.load(dout_ptr + v_off, mask=v_mask, other=0.0)  # (C, BV)
        last_tok = start + tl.minimum(j * C + C, length) - 1
        last = tl.load(cum_ptr + last_tok * HV + head)  # G_C
        cum = tl.load(cum_ptr + flat * HV + head, mask=valid, other=0.0)
        cum = tl.where(valid, cum, last)  # (C,) G: G_C past the segment's end, as in the forward
        state = tl.load(states_ptr + (chunk_id * HV + head) * DK * DV + state_cols, mask=state_mask, other=0.0)

        u = u - tl.dot(w, state, input_precision=PRECISION)  # (C, BV) U
        ratio = tl.exp(tl.where(lower, cum[:, None] - cum[None, :], float("-inf")))  # (C, C) j <= i only
        p = tl.where(lower, tl.dot(q, tl.trans(k), input_precision=PRECISION) * ratio, 0.0)  # (C, C) P
        qe = q * tl.exp(cum)[:, None]  # (C, BK)
        kt = tl.where(valid[:, None], k * tl.exp(last - cum)[:, None], 0.0)  # (C, BK) K~
        gamma = tl.exp(last)

        du = tl.dot(tl.trans(p), dout, input_precision=PRECISION)  # (C, BV)
        du += tl.dot(kt, dstate, input_precision=PRECISION)
        dqe = tl.dot(dout, tl.trans(state), input_precision=PRECISION)  # (C, BK)
        dp = tl.dot(dout, tl.trans(u), input_precision=PRECISION)  # (C, C)
        dkt = tl.dot(u, tl.trans(dstate), input_precision=PRECISION)  # (C, BK)
        dgamma = tl.sum(tl.sum(state * dstate, axis=1), axis=0)
        dw = -tl.dot(du, tl.trans(state), input_precision=PRECISION)  # (C, BK)
        dstate_prev = tl.dot(tl.trans(qe), dout, input_precision=PRECISION) + gamma * dstate  # (BK, BV)
        dstate = dstate_prev - tl.dot(tl.trans(w), du, input_precision=PRECISION)

        tl.store(du_ptr + v_off, du, mask=v_mask)
        part = vblock.to(tl.int64) * tokens * HV * DK + hk_off  # (C, BK) in this value block's partial
        tl.store(dw_ptr + part, dw, mask=qk_mask)
        tl.store(dqe_ptr + part, dqe, mask=qk_mask)
        tl.store(dkt_ptr + part, dkt, mask=qk_mask)
        dp_off = ((vblock * chunks + chunk_id) * HV + head) * C * C + rows[:, None] * C + rows[None, :]
        tl.store(dp_ptr + dp_off, dp)
        tl.store(dgamma_ptr + (vblock * chunks + chunk_id) * HV + head, dgamma)

    tl.store(dh0_ptr + seg_state, dstate, mask=state_mask)


def _chunk_index(launch: Launch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N,)`` chunk and ``(N,)`` row in it of every token (chunks as ``chunk_layout`` numbers them)."""
    segments = launch.segments
    return launch.first_chunk[segments.seg] + segments.pos // CHUNK, segments.pos % CHUNK


def _to_chunks(x: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor], chunks: int) -> torch.Tensor:
    """``(N, hv, ...)`` -> ``(M, hv, C, ...)``, zeros past each segment's end (differentiable)."""
    out = x.new_zeros(chunks, CHUNK, *x.shape[1:]).index_put(index, x)  # (M, C, hv, ...)
    return out.transpose(1, 2)


def _chunk_terms(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, launch: Launch
) -> tuple[torch.Tensor, ...]:
    """The per-chunk terms ``(W, U~, P, Qe, K~, gamma)`` of every chunk in torch, as the kernels compute them:
    ``(M, hv, C, dk)``, ``(M, hv, C, dv)``, ``(M, hv, C, C)``, ``(M, hv, C, dk)``, ``(M, hv, C, dk)``, ``(M, hv)``."""
    group = launch.hv // launch.hk
    index = _chunk_index(launch)
    chunks = launch.chunk_starts.numel()
    flat = [t.flatten(0, 1) for t in (q, k, v, g, beta)]  # (N, h, ...)
    qc = _to_chunks(flat[0].float().repeat_interleave(group, dim=1) * launch.scale, index, chunks)
    kc = _to_chunks(flat[1].float().repeat_interleave(group, dim=1), index, chunks)
    vc = _to_chunks(flat[2].float(), index, chunks)
    gc, bc = (_to_chunks(t.float(), index, chunks) for t in flat[3:])  # (M, hv, C)
    cum = gc.cumsum(-1)  # (M, hv, C)
    # exponents as sums of the g between two tokens (no difference of G): autograd then gives dg without the
    # cancellation that cost it ~3e-5 relative at gates of -30 per token
    between = segsum(gc)  # (M, hv, C, C) G_i - G_j, -inf for j > i
    ratio = between.exp()  # (M, hv, C, C)
    strict = (kc * bc[..., None]) @ kc.transpose(-1, -2) * ratio.tril(-1)
    eye = torch.eye(CHUNK, device=v.device)
    rhs = torch.cat([vc * bc[..., None], kc * (bc * cum.exp())[..., None]], dim=-1)
    u_tilde, w = torch.linalg.solve_triangular(eye + strict, rhs, upper=False, unitriangular=True).split(
        [launch.dv, launch.dk], dim=-1
    )
    p = qc @ kc.transpose(-1, -2) * ratio
    qe = qc * cum.exp()[..., None]
    last = cum[..., -1]  # (M, hv) G_C (padding adds 0)
    kt = kc * between[..., -1, :].exp()[..., None]  # exp(G_C - G) K
    return w, u_tilde, p, qe, kt, last.exp()


def chunk_gated_delta_rule_bwd(
    launch: Launch,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    grad_out: torch.Tensor,
    grad_final: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dq, dk, dv, dg, dbeta, d initial_state)`` (each in its input's dtype; the last ``None``
    without an initial state) of the forward's ``out`` (``grad_out (B, T, hv, dv)``) and final state."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    gf, bf = g.float().contiguous(), beta.float().contiguous()
    prepared = prepare(launch, k, v, gf, bf, torch.float32)  # fp32 factors and states, whatever the inputs
    _, states, _ = run_states(launch, k, prepared, initial_state, final=False, states_dtype=torch.float32)
    w, u, cum = prepared
    tokens, chunks, blocks = v.shape[0] * v.shape[1], launch.chunk_starts.numel(), launch.value_blocks
    hv, dk, dv = launch.hv, launch.dk, launch.dv
    dout = grad_out.float().contiguous()
    dht = grad_final.float().contiguous() if grad_final is not None else dout.new_empty(1)
    dh0 = dout.new_empty(launch.segments.count, hv, dk, dv)
    du = dout.new_zeros(tokens, hv, dv)
    dw, dqe, dkt = (dout.new_zeros(blocks, tokens, hv, dk) for _ in range(3))
    dp = dout.new_zeros(blocks, chunks, hv, CHUNK, CHUNK)
    dgamma = dout.new_zeros(blocks, chunks, hv)
    _chunk_state_bwd_kernel[(launch.segments.count, hv, blocks)](
        q,
        k,
        w,
        u,
        cum,
        states,
        dout,
        dht,
        dh0,
        du,
        dw,
        dqe,
        dkt,
        dp,
        dgamma,
        launch.segments.starts,
        launch.segments.lengths,
        launch.first_chunk,
        launch.scale,
        tokens,
        chunks,
        **launch.dims,
        HAS_DHT=grad_final is not None,
        PRECISION=launch.precision,
        num_warps=launch.warps,
        num_stages=launch.stages,
    )
    index = _chunk_index(launch)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v, g, beta)]
        terms = _chunk_terms(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], launch)
        grads = (
            _to_chunks(dw.sum(0), index, chunks),
            _to_chunks(du, index, chunks),
            dp.sum(0),
            _to_chunks(dqe.sum(0), index, chunks),
            _to_chunks(dkt.sum(0), index, chunks),
            dgamma.sum(0),
        )
        dq, dk_, dv_, dg, dbeta = torch.autograd.grad(terms, leaves, grads)
    d_initial = dh0.to(initial_state.dtype) if initial_state is not None else None
    return dq, dk_, dv_, dg, dbeta, d_initial
