"""Triton forward of the chunked SSD scan (Mamba2) and its autograd wiring, beside the torch reference
``mamba2_reference.ssd_chunked``; the backward kernels are ``mamba2_triton_bwd``.

Shape legend: c chunks, Q chunk size, h heads, p head dim, g groups, n ``d_state``, S segments,
BP / BN the blocks of p / n a program holds.

The tokens are laid out as the reference's ``to_chunks`` lays them out (every segment starts on a chunk
boundary, padding has ``dt = 0``; torch, cheap) but in the kernel dtype: ``x``, ``B``, ``C`` stay bf16/fp16
when they come so (fp32 otherwise), only ``dt`` is fp32. Then three kernels:

1. ``_chunk_state``: per (chunk, head, p block) the within-chunk cumulative log-decay ``cum (c, h, Q)`` and
   the chunk's final state from zero, ``sum_j exp(cum_last - cum_j) dt_j x_j B_j^T`` ``(c, h, p, n)`` fp32;
2. ``_state_passing``: per (segment, head, block of p*n) a loop over the segment's chunks from its initial
   state: the state entering each chunk ``(c, h, p, n)`` (kept in the kernel dtype: it is only ever a matrix
   operand) and the segment's final state ``(S, h, p, n)`` fp32;
3. ``_chunk_scan``: per (chunk, head, p block) ``y = ((C B^T) * exp(cum_i - cum_j) [j <= i] * dt_j) x
   + exp(cum_i) C H_entering + D x`` (the ``D`` skip in the epilogue).

Matrix products take 16-bit operands with fp32 accumulation for bf16/fp16 inputs (tensor cores; fp32 tiles
such as the decay-weighted scores are rounded to the input dtype right before the product) and IEEE fp32
for fp32 inputs (fp64 inputs compute in fp32), so fp32 matches the reference to fp32 rounding. Sums over
``d_state`` take it a block of BN at a time (``_blocks`` says why and how big).
``ssd_chunked_triton`` takes the arguments of ``ssd_chunked``; chunk sizes must be powers of two >= 16
(``mamba2_kernels.triton_chunk``). Triton's CPU interpreter (``TRITON_INTERPRET=1`` before import) runs it too.
"""

from __future__ import annotations

import math
from typing import Any, Unpack

import torch
import triton
import triton.language as tl

from mcore_ssm.mamba2_kernels import triton_chunk
from mcore_ssm.mamba2_reference import (
    CHUNK,
    ChunkLayout,
    ScanOptions,
    _check_shapes,
    chunk_layout,
    discretize_dt,
)

__all__ = ["ssd_chunked_triton"]


@triton.jit
def _tile_ids(H, heads_per_group, Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """A per-chunk program's ids on the grid ``(c * H, p blocks)``: chunk ``c`` (int64), head ``h``, its group
    ``g``, and the index vectors of the chunk's rows ``q (Q,)``, this program's head-dim block ``p (BP,)`` and the
    state dims ``n (BN,)``. The heads of a chunk run next to each other: they share its ``B``/``C`` rows (L2)."""
    pid = tl.program_id(0).to(tl.int64)
    c = pid // H
    h = (pid % H).to(tl.int32)
    p = tl.program_id(1) * BP + tl.arange(0, BP)
    return c, h, h // heads_per_group, tl.arange(0, Q), p, tl.arange(0, BN)


@triton.jit
def _token_tile(c, q, h, p, H, P, Q: tl.constexpr):
    """Offsets and mask of the ``(Q, BP)`` tile of a ``(c, Q, h, p)`` tensor (x, y and their gradients)."""
    return ((c * Q + q[:, None]) * H + h) * P + p[None, :], p[None, :] < P


@triton.jit
def _group_tile(c, q, g, n, G, N, Q: tl.constexpr):
    """Offsets and mask of the ``(Q, BN)`` tile of a ``(c, Q, g, n)`` tensor (B, C and their gradients)."""
    return ((c * Q + q[:, None]) * G + g) * N + n[None, :], n[None, :] < N


@triton.jit
def _state_tile(c, h, p, n, H, P, N):
    """Offsets and mask of the ``(BP, BN)`` tile of a ``(c, h, p, n)`` state tensor."""
    return ((c * H + h) * P + p[:, None]) * N + n[None, :], (p[:, None] < P) & (n[None, :] < N)


@triton.jit
def _times_group_blocks(lhs, src_ptr, dst_ptr, c, q, g, h, p, n, H, G, P, N, Q: tl.constexpr, BN: tl.constexpr,
                        PRECISION: tl.constexpr):  # fmt: skip
    """``lhs (BP, Q)`` (the kernel dtype) times the chunk's ``(Q, N)`` rows of a group tensor (B or C) at
    ``src_ptr``, stored as the ``(BP, N)`` tile of a ``(c, h, p, n)`` fp32 state tensor at ``dst_ptr``, one
    ``(Q, BN)`` block of ``d_state`` at a time (the blocks keep the register tiles small)."""
    for n_first in range(0, N, BN):
        rows, nmask = _group_tile(c, q, g, n_first + n, G, N, Q)
        rhs = tl.load(src_ptr + rows, mask=nmask, other=0.0)  # (Q, BN)
        out = tl.dot(lhs, rhs, input_precision=PRECISION)  # (BP, BN) fp32
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
    c, h, g, q, p, n = _tile_ids(H, heads_per_group, Q, BP, BN)
    dt = tl.load(dt_ptr + (c * Q + q) * H + h)  # (Q,)
    cum = tl.cumsum(dt * tl.load(a_ptr + h), axis=0)  # (Q,) inclusive log-decay
    if tl.program_id(1) == 0:
        tl.store(cum_ptr + (c * H + h) * Q + q, cum)
    last = tl.sum(tl.where(q == Q - 1, cum, 0.0), axis=0)
    w = tl.exp(last - cum) * dt  # (Q,)
    tokens, pmask = _token_tile(c, q, h, p, H, P, Q)
    x = tl.load(x_ptr + tokens, mask=pmask, other=0.0)  # (Q, BP)
    xw = tl.trans((x * w[:, None]).to(x_ptr.dtype.element_ty))  # (BP, Q)
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
        tl.store(entering_ptr + (c * H + h) * PN + off, state, mask=mask)  # in the entering tensor's dtype
        decay = tl.exp(tl.load(cum_ptr + (c * H + h) * Q + Q - 1))
        state = decay * state + tl.load(states_ptr + (c * H + h) * PN + off, mask=mask, other=0.0)
    tl.store(final_ptr + (s * H + h) * PN + off, state, mask=mask)


@triton.jit
def _chunk_scan(
    x_ptr,
    dt_ptr,
    b_ptr,
    c_ptr,
    d_ptr,
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
    HAS_D: tl.constexpr,
):
    c, h, g, q, p, n = _tile_ids(H, heads_per_group, Q, BP, BN)
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
    weights = tl.where(causal, scores * decay * dt[None, :], 0.0).to(x_ptr.dtype.element_ty)
    tokens, pmask = _token_tile(c, q, h, p, H, P, Q)
    x = tl.load(x_ptr + tokens, mask=pmask, other=0.0)  # (Q, BP)
    y = tl.dot(weights, x, input_precision=PRECISION)  # (Q, BP) fp32
    y += tl.exp(cum)[:, None] * read
    if HAS_D:
        y += tl.load(d_ptr + h) * x.to(tl.float32)
    tl.store(y_ptr + tokens, y, mask=pmask)


def _blocks(chunk: int, head_dim: int, d_state: int, precision: str, *, whole_p: bool = False) -> tuple[int, int, int]:
    """``(BP, BN, num_warps)`` of the per-chunk kernels: the p block a program holds (all of p with ``whole_p``,
    for ``mamba2_triton_bwd``'s ``_chunk_bwd_dx`` / ``_chunk_bwd_bc``, which sum over it), the block of
    ``d_state`` its loops take at a time, and its warps.

    A program holds a few ``(Q, Q)`` fp32 tiles (scores, decay and their products) besides ``(Q, BP)``, ``(Q, BN)``
    and ``(BP, BN)`` ones in registers. Offline sm_90 builds (Triton 3.9, ``cuobjdump -res-usage``, 2026-12-06)
    at Q = 64, p = 64, n = 128 with 16-bit operands (wgmma): BN = 64 spilled 200+ bytes in the backward kernels
    at 8 warps and ran the forward ones at 255 registers; BN = 32 spills nothing: the forward kernels (BP = 64,
    8 warps) take 96-128 registers, the whole-p backward ones (16 warps) 128. IEEE fp32 dots run on FMA units
    with their operands in registers: BP <= 32 for the forward kernels; the whole-p backward ones spill (2-3 KB
    at Q = 64: the fp32 path is the exact one, not the fast one), as do all at Q = 128 (16 warps there)."""
    fp32 = precision == "ieee"
    whole = max(16, triton.next_power_of_2(head_dim))
    bp = whole if whole_p else min(whole, 32 if fp32 else 64)
    bn = max(16, min(32, triton.next_power_of_2(d_state)))
    if whole_p:
        warps = 4 if chunk <= 16 else 8 if chunk <= 32 else 16
    else:
        warps = 4 if chunk <= 32 else 16 if fp32 and chunk >= 128 else 8
    return bp, bn, warps


def _precision(dtype: torch.dtype) -> str:
    """IEEE products for fp32 operands; 16-bit operands ignore it (tensor cores, fp32 accumulation)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ``x``, ``B``, ``C`` (and the entering states) take in the kernels: bf16/fp16 as they come, else
    fp32 (fp64 inputs compute in fp32)."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _scan(
    layout: ChunkLayout,
    xc: torch.Tensor,
    dtc: torch.Tensor,
    A: torch.Tensor,
    bc: torch.Tensor,
    cc: torch.Tensor,
    D: torch.Tensor | None,
    init: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """The forward kernels on the chunks (contiguous): ``xc (c, Q, h, p)``, ``bc, cc (c, Q, g, n)`` in the kernel
    dtype; ``dtc (c, Q, h)``, ``A (h,)``, ``D (h,)``, ``init (S, h, p, n)`` fp32 -> ``y (c, Q, h, p)`` (kernel
    dtype, with the ``D`` skip), ``final (S, h, p, n)`` fp32, ``cum (c, h, Q)`` fp32, ``entering (c, h, p, n)``
    (kernel dtype)."""
    total, Q, heads, head_dim = xc.shape
    groups, d_state = bc.shape[2], bc.shape[3]
    count, rep = layout.count, heads // groups
    precision = _precision(xc.dtype)
    BP, BN, warps = _blocks(Q, head_dim, d_state, precision)
    states = xc.new_empty(total, heads, head_dim, d_state, dtype=torch.float32)
    cum = xc.new_empty(total, heads, Q, dtype=torch.float32)
    entering = xc.new_empty(total, heads, head_dim, d_state)
    final = xc.new_empty(count, heads, head_dim, d_state, dtype=torch.float32)
    y = torch.empty_like(xc)
    grid = (total * heads, triton.cdiv(head_dim, BP))
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
            xc, dtc, bc, cc, D if D is not None else A, cum, entering, y,
            heads, groups, head_dim, d_state, rep, Q, BP, BN, precision, D is not None,
            num_warps=warps, num_stages=2,
        )  # fmt: skip
    return y, final, cum, entering


class _ChunkedScan(torch.autograd.Function):
    """The scan on the chunk layout: forward by ``_scan``, backward by ``mamba2_triton_bwd.scan_bwd``; what lies
    outside the chunks (discretisation, layout, dtype casts) is torch's autograd."""

    @staticmethod
    def forward(ctx: Any, layout: ChunkLayout, *tensors: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        xc, dtc, A, bc, cc, D, init = tensors
        assert xc is not None and dtc is not None and A is not None and bc is not None and cc is not None
        xc, dtc, A, bc, cc = (t.contiguous() for t in (xc, dtc, A, bc, cc))
        D = None if D is None else D.contiguous()
        y, final, cum, entering = _scan(layout, xc, dtc, A, bc, cc, D, None if init is None else init.contiguous())
        ctx.layout, ctx.has_init, ctx.has_d = layout, init is not None, D is not None
        ctx.save_for_backward(xc, dtc, A, bc, cc, D, cum, entering)
        return y, final

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor | None, dfinal: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        from mcore_ssm.mamba2_triton_bwd import scan_bwd  # it imports this module's tile helpers

        saved = ctx.saved_tensors
        dy = torch.zeros_like(saved[0]) if dy is None else dy.to(saved[0].dtype).contiguous()
        dfinal = None if dfinal is None else dfinal.float().contiguous()
        grads = scan_bwd(ctx.layout, saved, dy, dfinal, ctx.has_init)
        return (None, *grads)


def _layout(
    x: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[ChunkLayout, torch.Tensor | None]:
    """``to_chunks``'s layout (the same rules) and the initial state in fp32; the tensors are not laid out."""
    return chunk_layout(x, cu_seqlens, initial_state, chunk_size, torch.float32)


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
    same arguments and results (the output in x's dtype, the final state in fp32, fp64 for fp64 x)."""
    chunk_size = options.get("chunk_size", CHUNK)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not triton_chunk(chunk_size):
        raise ValueError(f"ssd (triton): chunk_size = {chunk_size!r}; allowed: a power of two >= 16")
    heads, groups = _check_shapes(x, dt, A, B, C, D)
    layout, state0 = _layout(x, options.get("cu_seqlens"), options.get("initial_state"), chunk_size)
    step = discretize_dt(
        dt,
        options.get("dt_bias"),
        softplus=options.get("dt_softplus", True),
        limit=options.get("dt_limit", (0.0, math.inf)),
        dtype=torch.float32,
    )  # (B, T, h)
    tokens, kernel_dtype = x.shape[0] * x.shape[1], _kernel_dtype(x.dtype)
    y, final = _ChunkedScan.apply(
        layout,
        layout.chunked(x.reshape(tokens, heads, x.shape[3]).to(kernel_dtype)),
        layout.chunked(step.reshape(tokens, heads)),
        A.float(),
        layout.chunked(B.reshape(tokens, groups, -1).to(kernel_dtype)),
        layout.chunked(C.reshape(tokens, groups, -1).to(kernel_dtype)),
        None if D is None else D.float(),
        state0,
    )  # (c, Q, h, p) in the kernel dtype with the D skip, (S, h, p, n) fp32
    out = layout.tokens(y).reshape(x.shape).to(x.dtype)
    return out, final.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
