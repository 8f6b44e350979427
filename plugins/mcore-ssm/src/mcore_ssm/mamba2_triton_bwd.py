"""Triton backward of the chunked SSD scan (Mamba2): the kernels behind ``mamba2_triton``'s autograd function,
split from the forward to keep each module one job. Shape legend and dtypes as ``mamba2_triton``.

The forward saves ``cum`` and the entering states; the backward runs four kernels and no full-size torch:

1. ``_entering_grad``: per (chunk, head, p block) the gradient of the entering state,
   ``sum_i exp(cum_i) dy_i C_i^T`` (fp32);
2. ``_state_passing_bwd``: per (segment, head, block of p*n) the chunks in reverse from the final state's
   gradient: the gradient of each chunk's own state (kernel dtype: only ever a matrix operand), of the initial
   state, and each state block's share of the gradient of each chunk's total log-decay;
3. ``_chunk_bwd_dx``: per (chunk, head), the whole head dim: ``dx`` (with the ``D`` skip's ``D dy``), ``ddt``
   whole (``da``, the gradient of the log-decay ``a = dt A`` of each token, summed over the pairs it lies
   between, not as differences of cumulative sums, which cancel; plus the chunk's total decay), and per chunk
   ``sum da dt`` (``dA``'s share) and ``sum dy x`` (``dD``'s share);
4. ``_chunk_bwd_bc``: per (chunk, group, block of n), looping over the group's heads: ``dB`` and ``dC`` of the
   group, whole. The intra-chunk part sums the heads' score gradients ``dS_ij = (dy_i . x_j) dt_j decay_ij``
   first (``B``, ``C`` are shared by the group), so it costs two ``(Q, Q) x (Q, BN)`` products per group.

Torch only sums the ``(c, h)`` shares of ``dA`` and ``dD``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcore_ssm.mamba2_reference import ChunkLayout
from mcore_ssm.mamba2_triton import (
    _blocks,
    _group_tile,
    _precision,
    _state_tile,
    _tile_ids,
    _times_group_blocks,
    _token_tile,
)

__all__ = ["scan_bwd"]


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
    c, h, g, q, p, n = _tile_ids(H, heads_per_group, Q, BP, BN)
    cum = tl.load(cum_ptr + (c * H + h) * Q + q)  # (Q,)
    tokens, pmask = _token_tile(c, q, h, p, H, P, Q)
    dy = tl.load(dy_ptr + tokens, mask=pmask, other=0.0) * tl.exp(cum)[:, None]  # (Q, BP) fp32
    lhs = tl.trans(dy.to(dy_ptr.dtype.element_ty))  # (BP, Q)
    _times_group_blocks(lhs, c_ptr, dentering_ptr, c, q, g, h, p, n, H, G, P, N, Q, BN, PRECISION)


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
        entering = tl.load(entering_ptr + (c * H + h) * PN + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(dlast_ptr + (blk * total + c) * H + h, decay * tl.sum(grad * entering, axis=0))
        grad = tl.load(dentering_ptr + (c * H + h) * PN + off, mask=mask, other=0.0) + decay * grad
    if HAS_INIT:
        tl.store(dinit_ptr + (s * H + h) * PN + off, grad, mask=mask)


@triton.jit
def _chunk_bwd_dx(
    x_ptr,
    dt_ptr,
    a_ptr,
    b_ptr,
    c_ptr,
    d_ptr,
    cum_ptr,
    entering_ptr,
    dy_ptr,
    dstates_ptr,
    dlast_ptr,
    dx_ptr,
    ddt_ptr,
    da_ptr,
    dd_ptr,
    total,
    dlast_blocks,
    H,
    G,
    P,
    N,
    heads_per_group,
    Q: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_D: tl.constexpr,
):
    """Per (chunk, head), all of p (BP >= P): the gradients of ``_chunk_scan``'s output and ``_chunk_state``'s state
    through one chunk with respect to ``x`` and ``dt`` (whole, with the chunk's total decay from
    ``_state_passing_bwd``), and the chunk's shares ``(c, h)`` of ``dA = sum da dt`` and ``dD = sum dy x``."""
    c, h, g, q, p, n = _tile_ids(H, heads_per_group, Q, BP, BN)
    op = x_ptr.dtype.element_ty
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

    # the (Q, BP) sums first, so that they die before the (Q, Q) tiles are made (register pressure)
    dyf = dy.to(tl.float32)
    xf = x.to(tl.float32)
    # inter-chunk: y_i += exp(cum_i) C_i H^T, and cum_i = sum_{k <= i} a_k
    da = tl.cumsum(tl.sum(dyf * read, axis=1) * tl.exp(cum), axis=0, reverse=True)  # (Q,)
    # the chunk's own state: sum_j exp(last - cum_j) dt_j x_j B_j^T
    to_end = tl.exp(last - cum)  # (Q,)
    w = to_end * dt  # (Q,)
    dx = w[:, None] * bds  # (Q, BP)
    if HAS_D:
        dx += tl.load(d_ptr + h) * dyf
        tl.store(dd_ptr + c * H + h, tl.sum(tl.sum(dyf * xf, axis=1), axis=0))
    sb = tl.sum(xf * bds, axis=1)  # (Q,): x_j . dS B_j
    ddt = to_end * sb  # (Q,)
    ws = w * sb  # (Q,): d/d(last - cum_j), and last - cum_j = sum_{j < k} a_k
    da += tl.sum(tl.where(q[None, :] < q[:, None], ws[None, :], 0.0), axis=1)

    # intra-chunk: y_i = sum_{j <= i} scores_ij decay_ij dt_j x_j
    causal = q[:, None] >= q[None, :]
    mixed = tl.where(causal, scores * tl.exp(tl.where(causal, cum[:, None] - cum[None, :], 0.0)), 0.0)  # (Q, Q)
    dx += tl.dot(tl.trans(mixed.to(op)), dy, input_precision=PRECISION) * dt[:, None]
    dmixed = mixed * tl.dot(dy, tl.trans(x), input_precision=PRECISION)  # (Q, Q): mixed_ij (dy_i . x_j)
    ddt += tl.sum(dmixed, axis=0)
    # d/d(cum_i - cum_j), and cum_i - cum_j = sum_{j < k <= i} a_k: da_k = sum_{i >= k, j < k} (no cancelling
    # differences: a reverse cumsum over i, then a masked sum over j)
    below = tl.cumsum(dmixed * dt[None, :], axis=0, reverse=True)  # (Q, Q): [k, j] = sum_{i >= k} [i, j]
    da += tl.sum(tl.where(q[None, :] < q[:, None], below, 0.0), axis=1)

    # the chunk's total decay (state passing) sums every token's a_k: its gradient, summed over the state blocks
    total_decay = tl.load(dlast_ptr + c * H + h)
    for blk in range(1, dlast_blocks):
        total_decay += tl.load(dlast_ptr + (blk * total + c) * H + h)
    da += total_decay

    tl.store(dx_ptr + tokens, dx, mask=pmask)
    tl.store(ddt_ptr + (c * Q + q) * H + h, ddt + da * tl.load(a_ptr + h))  # a = dt A
    tl.store(da_ptr + c * H + h, tl.sum(da * dt, axis=0))


@triton.jit
def _chunk_bwd_bc(
    x_ptr,
    dt_ptr,
    b_ptr,
    c_ptr,
    cum_ptr,
    entering_ptr,
    dy_ptr,
    dstates_ptr,
    db_ptr,
    dc_ptr,
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
    """Per (chunk, group, block of n), all of p: ``dB`` and ``dC`` of the group (whole), looping over its heads:
    ``dC_i = sum_j dS_ij B_j + sum_h exp(cum_i) dy_i H_h`` and ``dB_j = sum_i dS_ij C_i + sum_h exp(last - cum_j)
    dt_j x_j dState_h``, with ``dS`` the score gradient summed over the group's heads."""
    pid = tl.program_id(0).to(tl.int64)  # (c * G + g) * NB + n block: a chunk's blocks of n run together (L2)
    NB = tl.cdiv(N, BN)
    c = pid // (G * NB)
    g = ((pid // NB) % G).to(tl.int32)
    n = (pid % NB).to(tl.int32) * BN + tl.arange(0, BN)
    q = tl.arange(0, Q)
    p = tl.arange(0, BP)
    op = x_ptr.dtype.element_ty
    causal = q[:, None] >= q[None, :]
    dscores = tl.zeros((Q, Q), dtype=tl.float32)  # d(C_i . B_j), the group's heads summed
    dc = tl.zeros((Q, BN), dtype=tl.float32)
    db = tl.zeros((Q, BN), dtype=tl.float32)
    for r in range(0, heads_per_group):
        h = g * heads_per_group + r
        cum = tl.load(cum_ptr + (c * H + h) * Q + q)  # (Q,)
        dt = tl.load(dt_ptr + (c * Q + q) * H + h)  # (Q,)
        last = tl.sum(tl.where(q == Q - 1, cum, 0.0), axis=0)
        tokens, pmask = _token_tile(c, q, h, p, H, P, Q)
        x = tl.load(x_ptr + tokens, mask=pmask, other=0.0)  # (Q, BP)
        dy = tl.load(dy_ptr + tokens, mask=pmask, other=0.0)  # (Q, BP)
        square, smask = _state_tile(c, h, p, n, H, P, N)
        entering = tl.load(entering_ptr + square, mask=smask, other=0.0)  # (BP, BN)
        dstate = tl.load(dstates_ptr + square, mask=smask, other=0.0)  # (BP, BN)
        dyx = tl.dot(dy, tl.trans(x), input_precision=PRECISION)  # (Q, Q): dy_i . x_j
        decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], 0.0))  # (Q, Q)
        dscores += tl.where(causal, dyx * decay * dt[None, :], 0.0)
        dc += tl.exp(cum)[:, None] * tl.dot(dy, entering, input_precision=PRECISION)
        db += (tl.exp(last - cum) * dt)[:, None] * tl.dot(x, dstate, input_precision=PRECISION)
    rows, nmask = _group_tile(c, q, g, n, G, N, Q)
    cm = tl.load(c_ptr + rows, mask=nmask, other=0.0)  # (Q, BN)
    bm = tl.load(b_ptr + rows, mask=nmask, other=0.0)  # (Q, BN)
    dc += tl.dot(dscores.to(op), bm, input_precision=PRECISION)
    db += tl.dot(tl.trans(dscores).to(op), cm, input_precision=PRECISION)
    tl.store(dc_ptr + rows, dc, mask=nmask)
    tl.store(db_ptr + rows, db, mask=nmask)


def scan_bwd(
    layout: ChunkLayout,
    saved: tuple[torch.Tensor, ...],
    dy: torch.Tensor,
    dfinal: torch.Tensor | None,
    has_init: bool,
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ``mamba2_triton._scan`` from ``dy (c, Q, h, p)`` (kernel dtype) and ``dfinal (S, h, p, n)``
    (fp32): ``(dxc, ddtc, dA, dbc, dcc, dD or None, dinit or None)``, each in its input's dtype (``saved``: the
    forward's inputs, ``cum`` and the entering states)."""
    xc, dtc, A, bc, cc, D, cum, entering = saved
    total, Q, heads, head_dim = xc.shape
    groups, d_state = bc.shape[2], bc.shape[3]
    count, rep = layout.count, heads // groups
    precision = _precision(xc.dtype)
    BP, BN, warps = _blocks(Q, head_dim, d_state, precision)
    dentering = entering.new_empty(entering.shape, dtype=torch.float32)
    if total:
        _entering_grad[(total * heads, triton.cdiv(head_dim, BP))](
            dy, cc, cum, dentering, heads, groups, head_dim, d_state, rep, Q, BP, BN, precision,
            num_warps=warps, num_stages=2,
        )  # fmt: skip
    block = min(1024, triton.next_power_of_2(head_dim * d_state))
    nblocks = triton.cdiv(head_dim * d_state, block)
    dstates = torch.empty_like(entering)  # kernel dtype: a matrix operand only
    dinit = xc.new_empty(count, heads, head_dim, d_state, dtype=torch.float32) if has_init else None
    dlast = xc.new_zeros(nblocks, total, heads, dtype=torch.float32)
    _state_passing_bwd[(count, heads, nblocks)](
        dentering,
        cum,
        entering,
        dfinal if dfinal is not None else dentering,  # unread without HAS_DFINAL
        dstates,
        dinit if dinit is not None else dentering,  # unwritten without HAS_INIT
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
    ddtc = torch.empty_like(dtc)
    da = xc.new_zeros(total, heads, dtype=torch.float32)  # (c, h): sum_q da dt, dA's share
    dd = xc.new_zeros(total, heads, dtype=torch.float32)  # (c, h): sum dy x, dD's share
    dbc, dcc = torch.empty_like(bc), torch.empty_like(cc)
    if total:
        WP, WN, wide = _blocks(Q, head_dim, d_state, precision, whole_p=True)
        _chunk_bwd_dx[(total * heads, 1)](
            xc, dtc, A, bc, cc, D if D is not None else A, cum, entering, dy, dstates, dlast, dxc, ddtc, da, dd,
            total, nblocks, heads, groups, head_dim, d_state, rep, Q, WP, WN, precision, D is not None,
            num_warps=wide, num_stages=2,
        )  # fmt: skip
        _chunk_bwd_bc[(total * groups * triton.cdiv(d_state, WN),)](
            xc, dtc, bc, cc, cum, entering, dy, dstates, dbc, dcc,
            heads, groups, head_dim, d_state, rep, Q, WP, WN, precision,
            num_warps=wide, num_stages=2,
        )  # fmt: skip
    dD = dd.sum(0) if D is not None else None
    return dxc, ddtc, da.sum(0), dbc, dcc, dD, dinit
