"""Triton forward and backward of the chunked SSD scan (Mamba2), beside its torch reference ``mamba2_reference.ssd_chunked``.

Shape legend: c chunks, Q chunk size, h heads, p head dim, g groups, n ``d_state``, S segments,
BP / BN the blocks of p / n a program holds.

The tokens are laid out by the reference's ``to_chunks`` (every segment starts on a chunk boundary, padding
has ``dt = 0``; torch, cheap), then three kernels compute what ``ssd_chunked`` computes with einsums:

1. ``_chunk_state``: per (chunk, head, p block) the within-chunk cumulative log-decay ``cum (c, h, Q)`` and
   the chunk's final state from zero, ``sum_j exp(cum_last - cum_j) dt_j x_j B_j^T`` ``(c, h, p, n)``;
2. ``_state_passing``: per (segment, head, block of p*n) a loop over the segment's chunks from its initial
   state: the state entering each chunk ``(c, h, p, n)`` and the segment's final state ``(S, h, p, n)``;
3. ``_chunk_scan``: per (chunk, head, p block) ``y = ((C B^T) * exp(cum_i - cum_j) [j <= i] * dt_j) x
   + exp(cum_i) C H_entering``.

The backward mirrors them (the forward saves ``cum`` and the entering states):

4. ``_entering_grad``: per (chunk, head, p block) the gradient of the entering state, ``sum_i exp(cum_i) dy_i C_i^T``;
5. ``_state_passing_bwd``: per (segment, head, block of p*n) the chunks in reverse from the final state's gradient:
   the gradient of each chunk's own state, of the initial state, and of each chunk's total log-decay;
6. ``_chunk_bwd``: per (chunk, head, p block) every per-chunk gradient: ``dx``, and this p block's share of
   ``ddt``, ``da`` (the log-decay ``a = dt A`` of each token, summed as sums over the pairs it lies between, not
   as differences of cumulative sums, which cancel), ``dB`` and ``dC`` per head; torch sums the shares, the
   heads of a group, and ``dA = sum da dt``. What lies outside the chunks (``dt`` discretisation, the layout,
   the ``D`` skip) is ``to_chunks``'s torch autograd.

The per-chunk kernels (1, 3, 4, 6) take ``d_state`` a block of BN at a time in a loop (sums over it accumulate
in ``(Q, Q)`` / ``(Q, BP)`` tiles; per-state outputs are stored block by block; ``_chunk_bwd`` loops twice: the
sums, then ``dB``/``dC``), so no register tile spans the whole ``d_state`` (``_blocks`` says why and how big).

All in fp32 (fp64 inputs too): ``tl.dot`` in IEEE fp32 for fp32 inputs, so the result matches the
reference to fp32 rounding, TF32 for bf16/fp16 inputs (which TF32 holds exactly).
``ssd_chunked_triton`` takes the arguments of ``ssd_chunked``; chunk sizes must be powers of two >= 16
(``mamba2_kernels.triton_chunk``). Triton's CPU interpreter (``TRITON_INTERPRET=1`` before import) runs it too.
"""

from __future__ import annotations

from typing import Any, Unpack

import torch
import triton
import triton.language as tl

from mcore_ssm.mamba2_kernels import triton_chunk
from mcore_ssm.mamba2_reference import CHUNK, ChunkLayout, ScanOptions, to_chunks

__all__ = ["ssd_chunked_triton"]


@triton.jit
def _tile_ids(heads_per_group, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """A per-chunk program's ids: chunk ``c`` (int64), head ``h``, its group ``g``, and the index vectors of
    the chunk's rows ``q (Q,)``, this program's head-dim block ``p (BP,)`` and the state dims ``n (BN,)``."""
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    p = tl.program_id(2) * BP + tl.arange(0, BP)
    return c, h, h // heads_per_group, tl.arange(0, Q), p, tl.arange(0, BN)


@triton.jit
def _token_tile(c, q, h, p, H, P, Q: tl.constexpr):
    """Offsets and mask of the ``(Q, BP)`` tile of a ``(c, Q, h, p)`` tensor (x, y and their gradients)."""
    return ((c * Q + q[:, None]) * H + h) * P + p[None, :], p[None, :] < P


@triton.jit
def _group_tile(c, q, g, n, G, N, Q: tl.constexpr):
    """Offsets and mask of the ``(Q, BN)`` tile of a ``(c, Q, g, n)`` tensor (B, C)."""
    return ((c * Q + q[:, None]) * G + g) * N + n[None, :], n[None, :] < N


@triton.jit
def _state_tile(c, h, p, n, H, P, N):
    """Offsets and mask of the ``(BP, BN)`` tile of a ``(c, h, p, n)`` state tensor."""
    return ((c * H + h) * P + p[:, None]) * N + n[None, :], (p[:, None] < P) & (n[None, :] < N)


@triton.jit
def _times_group_blocks(lhs, src_ptr, dst_ptr, c, q, g, h, p, n, H, G, P, N, Q: tl.constexpr, BN: tl.constexpr,
                        PRECISION: tl.constexpr):  # fmt: skip
    """``lhs (BP, Q)`` times the chunk's ``(Q, N)`` rows of a group tensor (B or C) at ``src_ptr``, stored as the
    ``(BP, N)`` tile of a ``(c, h, p, n)`` state tensor at ``dst_ptr``, one ``(Q, BN)`` block of ``d_state`` at a
    time (the blocks keep the register tiles small)."""
    for n_first in range(0, N, BN):
        rows, nmask = _group_tile(c, q, g, n_first + n, G, N, Q)
        rhs = tl.load(src_ptr + rows, mask=nmask, other=0.0)  # (Q, BN)
        out = tl.dot(lhs, rhs, input_precision=PRECISION)  # (BP, BN)
        square, smask = _state_tile(c, h, p, n_first + n, H, P, N)
        tl.store(dst_ptr + square, out, mask=smask)


@triton.jit
def _chunk_state(
    x_ptr,
    dt_ptr,
    a_ptr,
    b_ptr,
    states_ptr,
    cum_ptr,
    H,
    G,
    P,
    N,
    heads_per_group,
    Q: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    c, h, g, q, p, n = _tile_ids(heads_per_group, Q, BP, BN)
    dt = tl.load(dt_ptr + (c * Q + q) * H + h)  # (Q,)
    cum = tl.cumsum(dt * tl.load(a_ptr + h), axis=0)  # (Q,) inclusive log-decay
    if tl.program_id(2) == 0:
        tl.store(cum_ptr + (c * H + h) * Q + q, cum)
    last = tl.sum(tl.where(q == Q - 1, cum, 0.0), axis=0)
    w = tl.exp(last - cum) * dt  # (Q,)
    tokens, pmask = _token_tile(c, q, h, p, H, P, Q)
    xw = tl.trans(tl.load(x_ptr + tokens, mask=pmask, other=0.0) * w[:, None])  # (BP, Q)
    _times_group_blocks(xw, b_ptr, states_ptr, c, q, g, h, p, n, H, G, P, N, Q, BN, PRECISION)  # the chunk's state


@triton.jit
def _state_passing(
    states_ptr,
    cum_ptr,
    init_ptr,
    entering_ptr,
    final_ptr,
    first_ptr,
    nchunks_ptr,
    H,
    PN,
    Q: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_INIT: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    off = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = off < PN
    first = tl.load(first_ptr + s)
    count = tl.load(nchunks_ptr + s)
    if HAS_INIT:
        state = tl.load(init_ptr + (s * H + h) * PN + off, mask=mask, other=0.0)
    else:
        state = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, count):
        c = first + i
        tl.store(entering_ptr + (c * H + h) * PN + off, state, mask=mask)
        decay = tl.exp(tl.load(cum_ptr + (c * H + h) * Q + Q - 1))
        state = decay * state + tl.load(states_ptr + (c * H + h) * PN + off, mask=mask, other=0.0)
    tl.store(final_ptr + (s * H + h) * PN + off, state, mask=mask)


@triton.jit
def _chunk_scan(
    x_ptr,
    dt_ptr,
    b_ptr,
    c_ptr,
    cum_ptr,
    entering_ptr,
    y_ptr,
    H,
    G,
    P,
    N,
    heads_per_group,
    Q: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    c, h, g, q, p, n = _tile_ids(heads_per_group, Q, BP, BN)
    cum = tl.load(cum_ptr + (c * H + h) * Q + q)  # (Q,)
    dt = tl.load(dt_ptr + (c * Q + q) * H + h)  # (Q,)
    scores = tl.zeros((Q, Q), dtype=tl.float32)  # C_i . B_j
    read = tl.zeros((Q, BP), dtype=tl.float32)  # C_i H^T: the entering state read by C
    for n_first in range(0, N, BN):  # sums over d_state, a block at a time
        rows, nmask = _group_tile(c, q, g, n_first + n, G, N, Q)
        cm = tl.load(c_ptr + rows, mask=nmask, other=0.0)  # (Q, BN)
        bm = tl.load(b_ptr + rows, mask=nmask, other=0.0)  # (Q, BN)
        scores += tl.dot(cm, tl.trans(bm), input_precision=PRECISION)
        square, smask = _state_tile(c, h, p, n_first + n, H, P, N)
        entering = tl.load(entering_ptr + square, mask=smask, other=0.0)  # (BP, BN): the state entering the chunk
        read += tl.dot(cm, tl.trans(entering), input_precision=PRECISION)
    causal = q[:, None] >= q[None, :]
    decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], 0.0))  # (Q, Q)
    weights = tl.where(causal, scores * decay * dt[None, :], 0.0)
    tokens, pmask = _token_tile(c, q, h, p, H, P, Q)
    x = tl.load(x_ptr + tokens, mask=pmask, other=0.0)  # (Q, BP)
    y = tl.dot(weights, x, input_precision=PRECISION)  # (Q, BP)
    y += tl.exp(cum)[:, None] * read
    tl.store(y_ptr + tokens, y, mask=pmask)


@triton.jit
def _entering_grad(
    dy_ptr,
    c_ptr,
    cum_ptr,
    dentering_ptr,
    H,
    G,
    P,
    N,
    heads_per_group,
    Q: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Per (chunk, head, p block): the gradient of the state entering the chunk, ``sum_i exp(cum_i) dy_i C_i^T``."""
    c, h, g, q, p, n = _tile_ids(heads_per_group, Q, BP, BN)
    cum = tl.load(cum_ptr + (c * H + h) * Q + q)  # (Q,)
    tokens, pmask = _token_tile(c, q, h, p, H, P, Q)
    dy = tl.trans(tl.load(dy_ptr + tokens, mask=pmask, other=0.0) * tl.exp(cum)[:, None])  # (BP, Q)
    _times_group_blocks(dy, c_ptr, dentering_ptr, c, q, g, h, p, n, H, G, P, N, Q, BN, PRECISION)


@triton.jit
def _state_passing_bwd(
    dentering_ptr,
    cum_ptr,
    entering_ptr,
    dfinal_ptr,
    dstates_ptr,
    dinit_ptr,
    dlast_ptr,
    first_ptr,
    nchunks_ptr,
    H,
    PN,
    total,
    Q: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    HAS_INIT: tl.constexpr,
):
    """``_state_passing`` in reverse, per (segment, head, block of p*n): from the final state's gradient back over
    the segment's chunks, the gradient of each chunk's own state ``(c, h, p, n)``, of the initial state, and this
    block's share of the gradient of each chunk's total log-decay ``(blocks, c, h)``."""
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    blk = tl.program_id(2)
    off = blk * BLOCK + tl.arange(0, BLOCK)
    mask = off < PN
    first = tl.load(first_ptr + s)
    count = tl.load(nchunks_ptr + s)
    if HAS_DFINAL:
        grad = tl.load(dfinal_ptr + (s * H + h) * PN + off, mask=mask, other=0.0)
    else:
        grad = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, count):
        c = first + count - 1 - i
        tl.store(dstates_ptr + (c * H + h) * PN + off, grad, mask=mask)  # the state after chunk c: its own + decayed
        decay = tl.exp(tl.load(cum_ptr + (c * H + h) * Q + Q - 1))
        entering = tl.load(entering_ptr + (c * H + h) * PN + off, mask=mask, other=0.0)
        tl.store(dlast_ptr + (blk * total + c) * H + h, decay * tl.sum(grad * entering, axis=0))
        grad = tl.load(dentering_ptr + (c * H + h) * PN + off, mask=mask, other=0.0) + decay * grad
    if HAS_INIT:
        tl.store(dinit_ptr + (s * H + h) * PN + off, grad, mask=mask)


@triton.jit
def _chunk_bwd(
    x_ptr,
    dt_ptr,
    b_ptr,
    c_ptr,
    cum_ptr,
    entering_ptr,
    dy_ptr,
    dstates_ptr,
    dx_ptr,
    ddt_ptr,
    da_ptr,
    db_ptr,
    dc_ptr,
    total,
    H,
    G,
    P,
    N,
    heads_per_group,
    Q: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Per (chunk, head, p block): the gradients of ``_chunk_scan``'s output and ``_chunk_state``'s state through
    one chunk. ``dx`` is whole; ``ddt``, ``da`` (of the log-decay ``a = dt A`` of each token, but for the chunk's
    total decay, whose gradient ``_state_passing_bwd`` gives), ``dB`` and ``dC`` (per head) are this p block's share, written to the block's slice ``(blocks, ...)`` and summed by the caller."""
    c, h, g, q, p, n = _tile_ids(heads_per_group, Q, BP, BN)
    cum = tl.load(cum_ptr + (c * H + h) * Q + q)  # (Q,)
    dt = tl.load(dt_ptr + (c * Q + q) * H + h)  # (Q,)
    last = tl.sum(tl.where(q == Q - 1, cum, 0.0), axis=0)
    tokens, pmask = _token_tile(c, q, h, p, H, P, Q)
    x = tl.load(x_ptr + tokens, mask=pmask, other=0.0)  # (Q, BP)
    dy = tl.load(dy_ptr + tokens, mask=pmask, other=0.0)  # (Q, BP)

    # the sums over d_state, a block of it at a time
    scores = tl.zeros((Q, Q), dtype=tl.float32)  # C_i . B_j
    read = tl.zeros((Q, BP), dtype=tl.float32)  # C_i H^T: the entering state read by C
    bds = tl.zeros((Q, BP), dtype=tl.float32)  # dS B_j
    for n_first in range(0, N, BN):
        rows, nmask = _group_tile(c, q, g, n_first + n, G, N, Q)
        cm = tl.load(c_ptr + rows, mask=nmask, other=0.0)  # (Q, BN)
        bm = tl.load(b_ptr + rows, mask=nmask, other=0.0)  # (Q, BN)
        square, smask = _state_tile(c, h, p, n_first + n, H, P, N)
        entering = tl.load(entering_ptr + square, mask=smask, other=0.0)  # (BP, BN)
        dstate = tl.load(dstates_ptr + square, mask=smask, other=0.0)  # (BP, BN): d(this chunk's own state)
        scores += tl.dot(cm, tl.trans(bm), input_precision=PRECISION)
        read += tl.dot(cm, tl.trans(entering), input_precision=PRECISION)
        bds += tl.dot(bm, tl.trans(dstate), input_precision=PRECISION)

    # intra-chunk: y_i = sum_{j <= i} scores_ij decay_ij dt_j x_j
    causal = q[:, None] >= q[None, :]
    decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], 0.0))  # (Q, Q)
    mixed = tl.where(causal, scores * decay, 0.0)  # (Q, Q)
    dyx = tl.dot(dy, tl.trans(x), input_precision=PRECISION)  # (Q, Q): dy_i . x_j (this p block)
    dscores = tl.where(causal, dyx * dt[None, :] * decay, 0.0)  # (Q, Q); the last use of decay: at Q = 128 each
    # (Q, Q) tile is 64 registers a thread (8 warps), so the order keeps at most three of them live
    dx = tl.dot(tl.trans(mixed), dy, input_precision=PRECISION) * dt[:, None]  # (Q, BP)
    ddt = tl.sum(mixed * dyx, axis=0)  # (Q,)
    # d/d(cum_i - cum_j), and cum_i - cum_j = sum_{j < k <= i} a_k: da_k = sum_{i >= k, j < k} (no cancelling
    # differences: a reverse cumsum over i, then a masked sum over j)
    weighted = mixed * dyx * dt[None, :]  # (Q, Q)
    below = tl.cumsum(weighted, axis=0, reverse=True)  # (Q, Q): [k, j] = sum_{i >= k} weighted_ij
    da = tl.sum(tl.where(q[None, :] < q[:, None], below, 0.0), axis=1)  # (Q,)

    # inter-chunk: y_i += exp(cum_i) C_i H^T
    grow = tl.exp(cum)  # (Q,)
    da += tl.cumsum(tl.sum(dy * read * grow[:, None], axis=1), axis=0, reverse=True)  # cum_i = sum_{k <= i} a_k

    # the chunk's own state: sum_j exp(last - cum_j) dt_j x_j B_j^T
    to_end = tl.exp(last - cum)  # (Q,)
    w = to_end * dt  # (Q,)
    dx += w[:, None] * bds
    sb = tl.sum(x * bds, axis=1)  # (Q,): x_j . dS B_j
    ddt += to_end * sb
    ws = w * sb  # (Q,): d/d(last - cum_j), and last - cum_j = sum_{j < k} a_k
    da += tl.sum(tl.where(q[None, :] < q[:, None], ws[None, :], 0.0), axis=1)

    tl.store(dx_ptr + tokens, dx, mask=pmask)
    part = tl.program_id(2) * total + c  # this p block's share
    tl.store(ddt_ptr + (part * Q + q) * H + h, ddt)
    tl.store(da_ptr + (part * Q + q) * H + h, da)

    # dB and dC per head, a block of d_state at a time
    for n_first in range(0, N, BN):
        rows, nmask = _group_tile(c, q, g, n_first + n, G, N, Q)
        cm = tl.load(c_ptr + rows, mask=nmask, other=0.0)  # (Q, BN)
        bm = tl.load(b_ptr + rows, mask=nmask, other=0.0)  # (Q, BN)
        square, smask = _state_tile(c, h, p, n_first + n, H, P, N)
        entering = tl.load(entering_ptr + square, mask=smask, other=0.0)  # (BP, BN)
        dstate = tl.load(dstates_ptr + square, mask=smask, other=0.0)  # (BP, BN)
        dc = tl.dot(dscores, bm, input_precision=PRECISION)  # (Q, BN)
        dc += grow[:, None] * tl.dot(dy, entering, input_precision=PRECISION)
        db = tl.dot(tl.trans(dscores), cm, input_precision=PRECISION)  # (Q, BN)
        db += w[:, None] * tl.dot(x, dstate, input_precision=PRECISION)
        per_head = ((part * Q + q[:, None]) * H + h) * N + n_first + n[None, :]
        tl.store(db_ptr + per_head, db, mask=nmask)
        tl.store(dc_ptr + per_head, dc, mask=nmask)


def _blocks(chunk: int, head_dim: int, d_state: int, precision: str) -> tuple[int, int, int]:
    """``(BP, BN, num_warps)`` of the per-chunk kernels: the p block a program holds, the block of ``d_state`` its
    loops take at a time, and its warps.

    A program holds a few ``(Q, Q)`` tiles (``_chunk_bwd``: scores, decay and their products) besides ``(Q, BP)``,
    ``(Q, BN)`` and ``(BP, BN)`` ones, all fp32 in registers (IEEE fp32 dots run on FMA units with their operands
    in registers too). Holding the whole ``d_state`` (BN = 128) at Q = BP = 64 with IEEE dots and 4 warps made
    ptxas spill 117 KB and take 95 s to compile ``_chunk_bwd`` (sm_90, offline compile, 2026-12-06; the GPU test
    never finished), and its TF32 build asked for 320 KB of shared memory. With BP = 32, BN = 32 (IEEE) / 64
    (TF32) and 8 warps it spills < 100 bytes; Q = 128 stays heavy (each ``(Q, Q)`` tile is 64 registers a thread
    at 8 warps; IEEE takes 16 warps, 128 registers a thread, ~2.5 KB spilled)."""
    fp32 = precision == "ieee"
    bp = max(16, min(32, triton.next_power_of_2(head_dim)))
    bn = max(16, min(32 if fp32 or chunk >= 128 else 64, triton.next_power_of_2(d_state)))
    warps = 4 if chunk <= 32 else 16 if fp32 and chunk >= 128 else 8
    return bp, bn, warps


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"  # bf16/fp16 inputs: tf32


def _scan(
    layout: ChunkLayout,
    xc: torch.Tensor,
    dtc: torch.Tensor,
    A: torch.Tensor,
    bc: torch.Tensor,
    cc: torch.Tensor,
    init: torch.Tensor | None,
    precision: str,
) -> tuple[torch.Tensor, ...]:
    """The forward kernels on the chunks (fp32, contiguous): ``xc (c, Q, h, p)``, ``dtc (c, Q, h)``, ``A (h,)``,
    ``bc, cc (c, Q, g, n)``, ``init (S, h, p, n)`` -> ``y (c, Q, h, p)``, ``final (S, h, p, n)``, ``cum (c, h, Q)``,
    ``entering (c, h, p, n)``."""
    total, Q, heads, head_dim = xc.shape
    groups, d_state = bc.shape[2], bc.shape[3]
    count, rep = layout.count, heads // groups
    BP, BN, warps = _blocks(Q, head_dim, d_state, precision)
    states = xc.new_empty(total, heads, head_dim, d_state)
    cum = xc.new_empty(total, heads, Q)
    entering = xc.new_empty(total, heads, head_dim, d_state)
    final = xc.new_empty(count, heads, head_dim, d_state)
    y = xc.new_empty(total, Q, heads, head_dim)
    grid = (total, heads, triton.cdiv(head_dim, BP))
    if total:
        _chunk_state[grid](
            xc, dtc, A, bc, states, cum, heads, groups, head_dim, d_state, rep, Q, BP, BN, precision,
            num_warps=warps, num_stages=2,
        )  # fmt: skip
    block = min(1024, triton.next_power_of_2(head_dim * d_state))
    pass_grid = (count, heads, triton.cdiv(head_dim * d_state, block))
    first, nchunks = layout.first.contiguous(), layout.nchunks.contiguous()
    init_arg = init if init is not None else final  # unread without HAS_INIT
    _state_passing[pass_grid](
        states, cum, init_arg, entering, final, first, nchunks, heads, head_dim * d_state, Q, block, init is not None
    )
    if total:
        _chunk_scan[grid](
            xc, dtc, bc, cc, cum, entering, y, heads, groups, head_dim, d_state, rep, Q, BP, BN, precision,
            num_warps=warps, num_stages=2,
        )  # fmt: skip
    return y, final, cum, entering


def _scan_bwd(
    layout: ChunkLayout,
    saved: tuple[torch.Tensor, ...],
    dy: torch.Tensor,
    dfinal: torch.Tensor | None,
    has_init: bool,
    precision: str,
) -> tuple[torch.Tensor | None, ...]:
    """The backward kernels, then the reductions in torch: ``(dxc, ddtc, dA, dbc, dcc, dinit or None)``, fp32."""
    xc, dtc, A, bc, cc, cum, entering = saved
    total, Q, heads, head_dim = xc.shape
    groups, d_state = bc.shape[2], bc.shape[3]
    count, rep = layout.count, heads // groups
    BP, BN, warps = _blocks(Q, head_dim, d_state, precision)
    pblocks = triton.cdiv(head_dim, BP)
    grid = (total, heads, pblocks)
    dentering = torch.empty_like(entering)
    if total:
        _entering_grad[grid](
            dy, cc, cum, dentering, heads, groups, head_dim, d_state, rep, Q, BP, BN, precision,
            num_warps=warps, num_stages=2,
        )  # fmt: skip
    block = min(1024, triton.next_power_of_2(head_dim * d_state))
    nblocks = triton.cdiv(head_dim * d_state, block)
    dstates = torch.empty_like(entering)
    dinit = xc.new_empty(count, heads, head_dim, d_state) if has_init else None
    dlast = xc.new_zeros(nblocks, total, heads)
    _state_passing_bwd[(count, heads, nblocks)](
        dentering,
        cum,
        entering,
        dfinal if dfinal is not None else dentering,  # unread without HAS_DFINAL
        dstates,
        dinit if dinit is not None else dstates,  # unwritten without HAS_INIT
        dlast,
        layout.first.contiguous(),
        layout.nchunks.contiguous(),
        heads,
        head_dim * d_state,
        total,
        Q,
        block,
        dfinal is not None,
        has_init,
    )
    dxc = torch.empty_like(xc)
    ddt = xc.new_empty(pblocks, total, Q, heads)
    da = xc.new_empty(pblocks, total, Q, heads)
    db = xc.new_empty(pblocks, total, Q, heads, d_state)
    dc = xc.new_empty(pblocks, total, Q, heads, d_state)
    if total:
        _chunk_bwd[grid](
            xc, dtc, bc, cc, cum, entering, dy, dstates, dxc, ddt, da, db, dc,
            total, heads, groups, head_dim, d_state, rep, Q, BP, BN, precision, num_warps=warps, num_stages=1,
        )  # fmt: skip
    da = da.sum(0) + dlast.sum(0)[:, None, :]  # (c, Q, h): the chunk's total decay sums every token's a_k
    ddtc = ddt.sum(0) + da * A  # (c, Q, h)
    dA = (da * dtc).sum((0, 1))  # (h,)
    dbc = db.sum(0).view(total, Q, groups, rep, d_state).sum(3)  # (c, Q, g, n): the group's heads summed
    dcc = dc.sum(0).view(total, Q, groups, rep, d_state).sum(3)
    return dxc, ddtc, dA, dbc, dcc, dinit


class _ChunkedScan(torch.autograd.Function):
    """The scan on ``to_chunks``'s layout: forward and backward by the kernels; what lies outside the chunks
    (discretisation, layout, ``D`` skip, group broadcast of ``B``/``C`` stays per group) is torch's autograd."""

    @staticmethod
    def forward(
        ctx: Any, layout: ChunkLayout, precision: str, *tensors: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        xc, dtc, A, bc, cc, init = tensors
        assert xc is not None and dtc is not None and A is not None and bc is not None and cc is not None
        fp32 = [t.float().contiguous() for t in (xc, dtc, A, bc, cc)]
        init32 = init.float().contiguous() if init is not None else None
        xf, dtf, af, bf, cf = fp32
        y, final, cum, entering = _scan(layout, xf, dtf, af, bf, cf, init32, precision)
        ctx.layout, ctx.precision, ctx.has_init = layout, precision, init is not None
        ctx.dtypes = [None if t is None else t.dtype for t in tensors]
        ctx.save_for_backward(*fp32, cum, entering)
        return y.to(xc.dtype), final.to(xc.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor | None, dfinal: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        dy32 = saved[0].new_zeros(saved[0].shape) if dy is None else dy.float().contiguous()
        dfinal32 = None if dfinal is None else dfinal.float().contiguous()
        grads = _scan_bwd(ctx.layout, saved, dy32, dfinal32, ctx.has_init, ctx.precision)
        out = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)]
        return (None, None, *out)


def ssd_chunked_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    **options: Unpack[ScanOptions],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mamba2_reference.ssd_chunked`` with the chunked scan in Triton, forward and backward (module docstring);
    same arguments and results."""
    chunk_size = options.get("chunk_size", CHUNK)
    if not triton_chunk(chunk_size):
        raise ValueError(f"ssd (triton): chunk_size = {chunk_size!r}; allowed: a power of two >= 16")
    chunks = to_chunks(x, dt, A, B, C, D, **options)  # torch, differentiable: discretisation, layout, D skip
    y, final = _ChunkedScan.apply(
        chunks.layout,
        _precision(chunks.dtype),
        chunks.x,
        chunks.dt,
        A.to(chunks.x.dtype),
        chunks.B,
        chunks.C,
        chunks.initial_state,
    )  # (c, Q, h, p), (S, h, p, n) in the compute dtype
    return chunks.output(y), final
