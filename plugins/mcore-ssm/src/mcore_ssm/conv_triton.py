"""The training call of the packed causal depthwise conv1d + SiLU in Triton (forward and backward), optionally with
GDN's per-head L2 normalisation of q and k in its epilogue.

Why it exists: in torch (``conv.py``'s ``_packed_conv``) each of the K taps is a pad, a where, a multiply and an add
over the whole ``(N, C)`` activation, then SiLU, then (GDN's q and k) ``l2_normalize``'s fp32 casts, and as many
again in the backward: at ``hybrid-bench``'s mixer shape most of the ~13 GB a GDN block moves outside its chunked
rule. Here each token tile reads its inputs once and writes its output once.

Shape legend: B rows, T tokens per row, N = B * T flat tokens, C channels, K kernel width (small: a constexpr),
BT tokens and BC channels a program holds, G the channels a program's block spans (a head with the norm).

Only the training call: no ``initial_state``, no final state (``conv.causal_conv1d`` keeps those). ``pos (N,)``,
each token's position in its segment (``packing.Segments.pos``; ``None``: the rows are the segments, ``t % T``),
keeps every window inside its document: token ``t`` reads ``x[t - lag]`` only where ``pos[t] >= lag``. ``x (B, T,
C)`` may be a strided view: one with last-dim stride 1 (a split of one fused projection) is read in place. The math is fp32, the output has
``x``'s dtype. With ``norm_head`` the output of each ``norm_head`` channels is ``s / sqrt(sum(s^2) + eps)``
(``gdn.l2_normalize``'s formula, eps 1e-6) of ``s = silu(conv)``.

The backward recomputes the conv (no activation saved): for output token ``u = t + lag`` it rebuilds ``u``'s
pre-activation and its gradient from ``dy[u]`` (the norm's statistics too: a program holds whole heads), so ``dx``
is written once per tile; ``dweight`` / ``dbias`` are fp32 partial sums per program, added up in torch (no
atomics: deterministic).

Opt-in ``MCORE_SSM_CONV_BWD=two`` (``kernel_choice.conv_bwd``; issue 22, not yet timed on a card): the backward in
two kernels. ``_conv_grad_kernel``, per token tile x channel block (whole heads: the norm's statistics), rebuilds the
pre-activation from K loads of ``x``, takes ``dy`` back through the norm and the SiLU to ``da`` once and stores it
to an fp32 ``(N, C)`` scratch; the same loads of ``x`` (kept: ``_preact_taps``) give the ``dweight`` / ``dbias``
partial sums. ``_conv_dx_kernel`` then gathers ``dx[m] = sum_lag w[:, K-1-lag] da[m + lag]`` over the output tokens
``m + lag`` whose window holds ``m``, reading ``da`` K times (from cache after the first). ``x`` is loaded K times a
tile and ``dy`` once, against K^2 + K and K in the one-kernel backward (which recomputes ``da`` for each lag), for
an fp32 ``da`` written and read once more (~0.94 GB a GDN block's three calls at ``hybrid-bench``'s shape, against
~0.4 GB if the one-kernel version's re-reads all hit cache: the gain, if any, is the K-fold recomputation saved).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from mcore_ssm.kernel_choice import conv_bwd

__all__ = ["conv1d_silu_train"]

#: Target programs along the tokens x channel blocks of the backward (each then walks a few token tiles, so the
#: partial ``dweight`` sums stay small).
_BWD_PROGRAMS = 1024


@triton.jit
def _positions(POS, n, nmask, T, HAS_POS: tl.constexpr):
    """``(BT,)`` the positions of flat tokens ``n`` in their segments (``t % T`` without ``POS``)."""
    if HAS_POS:
        pos = tl.load(POS + n, mask=nmask, other=0)
    else:
        pos = n % T
    return pos


@triton.jit
def _preact(
    X,
    W,
    BIAS,
    n,
    nmask,
    pos,
    c,
    cmask,
    T,
    sx_b,
    sx_t,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
):
    """``(BT, BC)`` fp32: the conv (+ bias) of tokens ``n``, channels ``c``; taps outside a segment read zeros."""
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for j in tl.static_range(K):
        lag = K - 1 - j
        ok = nmask & (pos >= lag)  # token n - lag lies in n's segment (so in its row)
        src = tl.maximum(n - lag, 0)  # (a select here trips Triton 3.6 layout pass; masked lanes read nothing)
        row = (src // T).to(tl.int64) * sx_b + (src % T).to(tl.int64) * sx_t  # (BT,)
        xv = tl.load(X + row[:, None] + c[None, :], mask=ok[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        w = tl.load(W + c * K + j, mask=cmask, other=0.0).to(tl.float32)  # (BC,)
        acc += xv * w[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _conv_fwd_kernel(
    X,
    W,
    BIAS,
    POS,
    Y,
    N,
    T,
    C,
    sx_b,
    sx_t,
    eps,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    NORM: tl.constexpr,
    G: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
):
    """Grid ``(cdiv(N, BT), cdiv(C, G))``: ``y = silu(conv)`` (then L2-normalised over the ``G`` channels with
    ``NORM``) of BT tokens x G channels, stored to ``Y (N, C)`` contiguous."""
    n = tl.program_id(0) * BT + tl.arange(0, BT)  # (BT,)
    lanes = tl.arange(0, BC)
    c = tl.program_id(1) * G + lanes  # (BC,)
    nmask, cmask = n < N, (lanes < G) & (c < C)
    pos = _positions(POS, n, nmask, T, HAS_POS)
    a = _preact(X, W, BIAS, n, nmask, pos, c, cmask, T, sx_b, sx_t, K, HAS_BIAS, BT, BC)  # (BT, BC)
    s = a * tl.sigmoid(a)
    if NORM:
        s = s * tl.rsqrt(tl.sum(s * s, axis=1) + eps)[:, None]
    out = Y + n.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(out, s.to(Y.dtype.element_ty), mask=nmask[:, None] & cmask[None, :])


@triton.jit
def _preact_grad(
    X,
    W,
    BIAS,
    POS,
    DY,
    u,
    T,
    N,
    C,
    c,
    cmask,
    sx_b,
    sx_t,
    eps,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    NORM: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
):
    """``(BT, BC)`` fp32: the gradient of the pre-activation of output tokens ``u`` (zeros past ``N``)."""
    umask = u < N
    pos = _positions(POS, u, umask, T, HAS_POS)
    a = _preact(X, W, BIAS, u, umask, pos, c, cmask, T, sx_b, sx_t, K, HAS_BIAS, BT, BC)
    dy = tl.load(DY + u.to(tl.int64)[:, None] * C + c[None, :], mask=umask[:, None] & cmask[None, :], other=0.0)
    dy = dy.to(tl.float32)
    sig = tl.sigmoid(a)
    s = a * sig
    if NORM:  # y = s r, r = (sum s^2 + eps)^-1/2: ds = r dy - r^3 s sum(dy s)
        r = tl.rsqrt(tl.sum(s * s, axis=1) + eps)  # (BT,)
        dy = r[:, None] * dy - (r * r * r * tl.sum(dy * s, axis=1))[:, None] * s
    return dy * sig * (1.0 + a * (1.0 - sig))


@triton.jit
def _conv_bwd_kernel(
    X,
    W,
    BIAS,
    POS,
    DY,
    DX,
    DW,
    DB,
    N,
    T,
    C,
    sx_b,
    sx_t,
    eps,
    tiles,
    K: tl.constexpr,
    KP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    NORM: tl.constexpr,
    G: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
):
    """Grid ``(P, cdiv(C, G))``: program ``p`` walks ``tiles`` token tiles from ``p * tiles``; per tile ``dx[m] =
    sum_lag w[:, K-1-lag] da[m + lag]`` over the output tokens ``m + lag`` whose window holds ``m`` (``da``
    recomputed), stored to ``DX (N, C)``; the tiles' ``dweight`` and ``dbias`` summed into ``DW (P, C, K)``, ``DB (P,
    C)`` fp32."""
    pid = tl.program_id(0)
    lanes = tl.arange(0, BC)
    c = tl.program_id(1) * G + lanes  # (BC,)
    cmask = (lanes < G) & (c < C)
    taps = tl.arange(0, KP)  # (KP,)
    dw = tl.zeros((BC, KP), dtype=tl.float32)
    db = tl.zeros((BC,), dtype=tl.float32)
    for i in range(tiles):
        m = (pid * tiles + i) * BT + tl.arange(0, BT)  # (BT,)
        mmask = m < N
        pos = _positions(POS, m, mmask, T, HAS_POS)
        dx = tl.zeros((BT, BC), dtype=tl.float32)
        for lag in tl.static_range(K):
            u = m + lag  # output tokens whose tap K-1-lag reads token m
            da = _preact_grad(
                X, W, BIAS, POS, DY, u, T, N, C, c, cmask, sx_b, sx_t, eps, K, HAS_BIAS, HAS_POS, NORM, BT, BC
            )  # (BT, BC)
            upos = _positions(POS, u, u < N, T, HAS_POS)
            inside = (u < N) & (upos >= lag)  # m lies in u's segment
            w = tl.load(W + c * K + (K - 1 - lag), mask=cmask, other=0.0).to(tl.float32)
            dx += tl.where(inside[:, None], da * w[None, :], 0.0)
            if lag == 0:  # da of this tile's own tokens: dweight, dbias
                db += tl.sum(da, axis=0)
                for j in tl.static_range(K):
                    back = K - 1 - j
                    ok = mmask & (pos >= back)
                    src = tl.where(ok, m - back, 0)
                    row = (src // T).to(tl.int64) * sx_b + (src % T).to(tl.int64) * sx_t
                    xv = tl.load(X + row[:, None] + c[None, :], mask=ok[:, None] & cmask[None, :], other=0.0)
                    part = tl.sum(da * xv.to(tl.float32), axis=0)  # (BC,)
                    dw += tl.where(taps[None, :] == j, part[:, None], 0.0)
        out = DX + m.to(tl.int64)[:, None] * C + c[None, :]
        tl.store(out, dx.to(DX.dtype.element_ty), mask=mmask[:, None] & cmask[None, :])
    base = pid.to(tl.int64) * C
    tl.store(DW + (base + c)[:, None] * K + taps[None, :], dw, mask=cmask[:, None] & (taps[None, :] < K))
    if HAS_BIAS:
        tl.store(DB + base + c, db, mask=cmask)


@triton.jit
def _preact_taps(
    X,
    W,
    BIAS,
    n,
    nmask,
    pos,
    c,
    cmask,
    T,
    sx_b,
    sx_t,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
):
    """``_preact`` with the taps kept (the two-pass backward's ``dweight`` reuses them): ``(BT, BC)`` fp32, the conv (+ bias) of tokens ``n``, channels ``c``; and the tuple of its K taps, tap ``j``
    ``x[n - (K-1-j)]`` ``(BT, BC)`` in ``x``'s dtype; taps outside a segment (or a row) read zeros."""
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    xs = ()
    t = n % T  # (BT,) the tokens' places in their rows
    row = (n // T).to(tl.int64) * sx_b + t.to(tl.int64) * sx_t  # (BT,)
    for j in tl.static_range(K):
        lag = K - 1 - j
        ok = nmask & (pos >= lag) & (t >= lag)  # token n - lag lies in n's segment and row: x's row n - lag
        # masks only (no select): a 1-D tl.where feeding the address trips Triton 3.6's layout pass on Hopper
        xv = tl.load(X + (row - lag * sx_t)[:, None] + c[None, :], mask=ok[:, None] & cmask[None, :], other=0.0)
        w = tl.load(W + c * K + j, mask=cmask, other=0.0).to(tl.float32)  # (BC,)
        acc += xv.to(tl.float32) * w[None, :]
        # the taps in x's dtype (for the backward's dweight): Triton has no starred tuples, mypy no growing ones
        xs = xs + (xv,)  # type: ignore[assignment]  # noqa: RUF005
    if HAS_BIAS:
        acc += tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc, xs


@triton.jit
def _conv_grad_kernel(
    X,
    W,
    BIAS,
    POS,
    DY,
    DA,
    DW,
    DB,
    N,
    T,
    C,
    sx_b,
    sx_t,
    eps,
    tiles,
    K: tl.constexpr,
    KP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    NORM: tl.constexpr,
    G: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
):
    """Grid ``(P, cdiv(C, G))``: program ``p`` walks ``tiles`` token tiles from ``p * tiles``; per tile it recomputes
    the pre-activation ``a`` (K loads of ``x``, as the forward), takes ``dy`` back through the norm (a program holds
    whole heads) and the SiLU to ``da``, stored to ``DA (N, C)`` fp32, and adds ``sum_t da[t] x[t - lag]`` (the
    same loads of ``x``) and ``sum_t da[t]`` to its ``dweight`` / ``dbias`` sums, stored to ``DW (P, C, K)``, ``DB
    (P, C)`` fp32."""
    pid = tl.program_id(0)
    lanes = tl.arange(0, BC)
    c = tl.program_id(1) * G + lanes  # (BC,)
    cmask = (lanes < G) & (c < C)
    taps = tl.arange(0, KP)  # (KP,)
    dw = tl.zeros((KP, BC), dtype=tl.float32)  # taps first: a tap's (BC,) sum over tokens broadcasts back in place
    db = tl.zeros((BC,), dtype=tl.float32)
    for i in range(tiles):
        n = (pid * tiles + i) * BT + tl.arange(0, BT)  # (BT,)
        nmask = n < N
        mask = nmask[:, None] & cmask[None, :]
        pos = _positions(POS, n, nmask, T, HAS_POS)
        a, xs = _preact_taps(X, W, BIAS, n, nmask, pos, c, cmask, T, sx_b, sx_t, K, HAS_BIAS, BT, BC)  # (BT, BC)
        rows = n.to(tl.int64)[:, None] * C + c[None, :]  # (BT, BC)
        dy = tl.load(DY + rows, mask=mask, other=0.0).to(tl.float32)  # zeros past N and outside the block: da 0
        sig = tl.sigmoid(a)
        if NORM:  # y = s r, s = a sig, r = (sum s^2 + eps)^-1/2: ds = r dy - r^3 s sum(dy s)
            s = a * sig
            r = tl.rsqrt(tl.sum(s * s, axis=1) + eps)  # (BT,)
            dy = r[:, None] * dy - (r * r * r * tl.sum(dy * s, axis=1))[:, None] * s
        da = dy * sig * (1.0 + a * (1.0 - sig))  # (BT, BC)
        tl.store(DA + rows, da, mask=mask)
        db += tl.sum(da, axis=0)
        for j in tl.static_range(K):
            part = tl.sum(da * xs[j].to(tl.float32), axis=0)  # (BC,) tap j read x[n - (K-1-j)]
            dw += tl.where(taps[:, None] == j, part[None, :], 0.0)
    base = pid.to(tl.int64) * C
    tl.store(DW + (base + c)[None, :] * K + taps[:, None], dw, mask=(taps[:, None] < K) & cmask[None, :])
    if HAS_BIAS:
        tl.store(DB + base + c, db, mask=cmask)


@triton.jit
def _conv_dx_kernel(
    DA,
    W,
    POS,
    DX,
    N,
    T,
    C,
    K: tl.constexpr,
    HAS_POS: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
):
    """Grid ``(cdiv(N, BT), cdiv(C, BC))``: ``dx[m] = sum_lag w[:, K-1-lag] da[m + lag]`` over the output tokens ``u
    = m + lag`` whose window holds ``m`` (``u < N``, ``pos[u] >= lag``: ``m`` lies in ``u``'s segment), ``da`` read
    from ``DA (N, C)`` fp32, stored to ``DX (N, C)`` in its dtype."""
    m = tl.program_id(0) * BT + tl.arange(0, BT)  # (BT,)
    c = tl.program_id(1) * BC + tl.arange(0, BC)  # (BC,)
    cmask = c < C
    dx = tl.zeros((BT, BC), dtype=tl.float32)
    for lag in tl.static_range(K):
        u = m + lag  # output tokens whose tap K-1-lag reads token m
        umask = u < N
        inside = umask & (_positions(POS, u, umask, T, HAS_POS) >= lag)  # (BT,) m lies in u's segment
        da = tl.load(DA + u.to(tl.int64)[:, None] * C + c[None, :], mask=inside[:, None] & cmask[None, :], other=0.0)
        w = tl.load(W + c * K + (K - 1 - lag), mask=cmask, other=0.0).to(tl.float32)  # (BC,)
        dx += da * w[None, :]
    out = DX + m.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(out, dx.to(DX.dtype.element_ty), mask=(m < N)[:, None] & cmask[None, :])


def _blocks(channels: int, norm_head: int | None) -> tuple[int, int]:
    """``(G, BC)``: the channels a program's block spans (a whole head with the norm) and its power-of-two width."""
    group = norm_head if norm_head is not None else min(128, triton.next_power_of_2(channels))
    return group, triton.next_power_of_2(group)


def _fwd_launch(block_c: int) -> tuple[int, int]:
    """``(BT, warps)`` of the forward: (64, 128) tiles at 8 warps (offline sm_90 builds, bf16: 88 registers with the
    norm, 105 without, no spill), smaller tiles at 4."""
    block_t = max(1, min(64, 8192 // block_c))
    return block_t, 8 if block_t * block_c >= 4096 else 4


def _bwd_launch(block_c: int) -> tuple[int, int]:
    """``(BT, warps)`` of the backward: (16, 128) tiles at 8 warps (offline sm_90 builds, bf16: 175 registers with
    the norm, 128 without, no spill; (32, 128) tiles took 255 and 209: each tile is recomputed K times)."""
    block_t = max(1, min(32, 2048 // block_c))
    return block_t, 8 if block_t * block_c >= 2048 else 4


def _grad_launch(block_c: int) -> tuple[int, int]:
    """``(BT, warps)`` of the backward's ``da`` kernel: (16, 128) tiles at 8 warps, a thread one token x 8 channels
    (offline sm_90 builds, bf16: Triton 3.6 128 registers with the norm, 125 without, no spill: two programs an SM;
    3.9 108 / 98), smaller tiles at 4. (32, 128) took 220 / 180 with 3.6: the K taps stay live until ``da`` for
    ``dweight``, whose sums over the tile's tokens cross the warps."""
    block_t = max(1, min(32, 2048 // block_c))
    return block_t, 8 if block_t * block_c >= 2048 else 4


def _dx_launch(channels: int) -> tuple[int, int, int]:
    """``(BT, BC, warps)`` of the backward's ``dx`` kernel (any channel blocks: no norm here): (32, 128) tiles at 8
    warps, a thread 4 tokens x 4 channels of each of the K ``da`` tiles (offline sm_90 builds, bf16: Triton 3.6 72
    registers, 3.9 80, no spill: three programs an SM), smaller tiles at 4. (64, 128) took 93 / 172."""
    block_c = min(128, triton.next_power_of_2(channels))
    block_t = max(1, min(32, 4096 // block_c))
    return block_t, block_c, 8 if block_t * block_c >= 4096 else 4


def _launch_args(x: torch.Tensor) -> tuple[int, int, int, int]:
    """``(N, T, sx_b, sx_t)`` of ``x (B, T, C)``."""
    batch, seq, _ = x.shape
    return batch * seq, seq, x.stride(0), x.stride(1)


class _ConvSilu(torch.autograd.Function):
    """``conv1d_silu_train`` as an autograd function (the backward runs ``_conv_bwd_kernel``, or with
    ``MCORE_SSM_CONV_BWD=two`` ``_conv_grad_kernel`` then ``_conv_dx_kernel``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        pos: torch.Tensor | None,
        norm_head: int | None,
        eps: float,
    ) -> torch.Tensor:
        batch, seq, channels = x.shape
        width = weight.shape[1]
        w = weight.contiguous()
        tokens, _, sx_b, sx_t = _launch_args(x)
        y = torch.empty(batch, seq, channels, device=x.device, dtype=x.dtype)  # (B, T, C)
        group, block_c = _blocks(channels, norm_head)
        block_t, warps = _fwd_launch(block_c)
        grid = (triton.cdiv(tokens, block_t), triton.cdiv(channels, group))
        _conv_fwd_kernel[grid](
            x, w, bias if bias is not None else w, pos if pos is not None else w, y,
            tokens, seq, channels, sx_b, sx_t, eps,
            K=width, HAS_BIAS=bias is not None, HAS_POS=pos is not None, NORM=norm_head is not None,
            G=group, BT=block_t, BC=block_c, num_warps=warps,
        )  # fmt: skip
        ctx.save_for_backward(x, w, bias, pos)
        ctx.norm_head, ctx.eps, ctx.weight_dtype = norm_head, eps, weight.dtype
        return y

    @staticmethod
    @once_differentiable  # no double backward: a clear error instead of "does not require grad"
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, w, bias, pos = ctx.saved_tensors
        batch, seq, channels = x.shape
        width = w.shape[1]
        if x.numel() == 0:  # no tokens (or no channels): no programs to launch
            return (torch.zeros_like(x), torch.zeros_like(w), None if bias is None else torch.zeros_like(bias),
                    None, None, None)  # fmt: skip
        tokens, _, sx_b, sx_t = _launch_args(x)
        dy = dy.contiguous()
        two_pass = conv_bwd() == "two"
        group, block_c = _blocks(channels, ctx.norm_head)
        block_t, warps = _grad_launch(block_c) if two_pass else _bwd_launch(block_c)
        blocks = triton.cdiv(channels, group)
        all_tiles = triton.cdiv(tokens, block_t)
        programs = min(all_tiles, max(1, triton.cdiv(_BWD_PROGRAMS, blocks)))
        tiles = triton.cdiv(all_tiles, programs)
        programs = triton.cdiv(all_tiles, tiles)
        dx = torch.empty(batch, seq, channels, device=x.device, dtype=x.dtype)  # (B, T, C)
        dw = torch.empty(programs, channels, width, device=x.device, dtype=torch.float32)  # (P, C, K) partial sums
        db = torch.empty(programs, channels, device=x.device, dtype=torch.float32) if bias is not None else dw
        pos_arg = pos if pos is not None else w
        flags = dict(K=width, KP=triton.next_power_of_2(width), HAS_BIAS=bias is not None, HAS_POS=pos is not None,
                     NORM=ctx.norm_head is not None, G=group, BT=block_t, BC=block_c, num_warps=warps)  # fmt: skip
        if not two_pass:
            _conv_bwd_kernel[(programs, blocks)](
                x, w, bias if bias is not None else w, pos_arg, dy, dx, dw, db,
                tokens, seq, channels, sx_b, sx_t, ctx.eps, tiles, **flags,
            )  # fmt: skip
        else:
            da = torch.empty(tokens, channels, device=x.device, dtype=torch.float32)  # (N, C) pre-activation grad
            _conv_grad_kernel[(programs, blocks)](
                x, w, bias if bias is not None else w, pos_arg, dy, da, dw, db,
                tokens, seq, channels, sx_b, sx_t, ctx.eps, tiles, **flags,
            )  # fmt: skip
            block_t, block_c, warps = _dx_launch(channels)
            grid = (triton.cdiv(tokens, block_t), triton.cdiv(channels, block_c))
            _conv_dx_kernel[grid](
                da, w, pos_arg, dx, tokens, seq, channels,
                K=width, HAS_POS=pos is not None, BT=block_t, BC=block_c, num_warps=warps,
            )  # fmt: skip
        dweight = dw.sum(0).to(ctx.weight_dtype)  # (C, K)
        dbias = db.sum(0).to(bias.dtype) if bias is not None else None  # (C,)
        return dx, dweight, dbias, None, None, None


def conv1d_silu_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    pos: torch.Tensor | None = None,
    norm_head: int | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``silu(causal depthwise conv1d)`` of ``x (B, T, C)`` (any strides; read in place when the last is 1, as in a
    split of a fused projection, else copied once) with ``weight (C, K)``, ``bias (C,)``, no window crossing a
    segment: ``pos (B * T,)`` each token's position in its segment (``None``: rows).
    ``norm_head``: then L2-normalise each run of that many channels (``gdn.l2_normalize``, ``eps``). Returns ``(B,
    T, C)`` in ``x``'s dtype (fp32 math); differentiable in ``x``, ``weight`` and ``bias``."""
    batch, seq, channels = x.shape
    if weight.dim() != 2 or weight.shape[0] != channels or (norm_head is not None and channels % norm_head):
        raise ValueError(
            f"conv1d_silu_train: x {tuple(x.shape)}, weight {tuple(weight.shape)}, norm_head {norm_head}: "
            "weight must be (C, K), norm_head divide C"
        )
    if x.stride(2) != 1:
        x = x.contiguous()  # the kernels read channels with stride 1
    if pos is not None and pos.shape != (batch * seq,):
        raise ValueError(f"conv1d_silu_train: pos of shape {tuple(pos.shape)}; expected ({batch * seq},)")
    pos = pos.contiguous() if pos is not None else None  # the kernels index both with stride 1
    bias = bias.contiguous() if bias is not None else None
    return _ConvSilu.apply(x, weight, bias, pos, norm_head, eps)
