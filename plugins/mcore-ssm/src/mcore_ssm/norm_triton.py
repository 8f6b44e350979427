"""``norm.gated_rms_norm`` in Triton, forward and backward: one read of ``x`` and the gate, one write of the output.

Why it exists: in torch the gated norm is ~10 full-size elementwise ops (fp32 casts of ``x`` and the gate, SiLU, the
mean square, the scale, the products, the cast back) and about twice that in its backward: with the conv, most of
the bytes a GDN block moves outside its chunked rule at ``hybrid-bench``'s shape.

Shape legend: M tokens (the leading dims flattened), F features per token, G features per normalisation group, R = F
/ G groups per token, BT tokens and BG (G padded to a power of two) features a program holds, P token programs.

Both forms of ``norm.py``: ``norm_before_gate`` (GDN: ``rmsnorm(x) * w * silu(z)`` per value head, called with ``x
(..., hv, dv)`` and one ``(dv,)`` weight that every head shares) and not (Mamba2: ``rmsnorm(x * silu(z)) * w`` in
groups of ``group_size``, a weight ``(F,)``). fp32 statistics; the output, ``dx`` and ``dgate`` in their inputs'
dtypes; ``dweight`` as fp32 partial sums per token program, added up in torch (deterministic). ``x`` and the gate
may be strided views whose tokens are rows (last-dim stride 1: the gate is a split of the fused projection).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

__all__ = ["gated_rms_norm_triton"]

#: Target programs (token programs x groups) of the backward; each walks a few token tiles.
_BWD_PROGRAMS = 1024


@triton.jit
def _tile(X, GATE, W, t, r, cols, M, sx, sg, G: tl.constexpr, W_SHARED: tl.constexpr):
    """The fp32 tiles ``x``, ``gate`` ``(BT, BG)`` of tokens ``t``, group ``r``, and the weight ``(BG,)``."""
    tmask, cmask = t < M, cols < G
    mask = tmask[:, None] & cmask[None, :]
    t64 = t.to(tl.int64)
    x = tl.load(X + t64[:, None] * sx + r * G + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + t64[:, None] * sg + r * G + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if W_SHARED:  # one (G,) weight for every group
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.load(W + r * G + cols, mask=cmask, other=0.0).to(tl.float32)
    return x, g, w, mask


@triton.jit
def _norm_fwd_kernel(
    X,
    GATE,
    W,
    Y,
    M,
    F,
    sx,
    sg,
    eps,
    G: tl.constexpr,
    BEFORE: tl.constexpr,
    W_SHARED: tl.constexpr,
    BT: tl.constexpr,
    BG: tl.constexpr,
):
    """Grid ``(cdiv(M, BT), R)``: the gated norm of BT tokens' group ``r``, stored to ``Y (M, F)`` contiguous."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)  # (BT,)
    r = tl.program_id(1)
    cols = tl.arange(0, BG)
    x, g, w, mask = _tile(X, GATE, W, t, r, cols, M, sx, sg, G, W_SHARED)
    sg_ = g * tl.sigmoid(g)  # silu(gate)
    u = x if BEFORE else x * sg_
    n = u * tl.rsqrt(tl.sum(u * u, axis=1) / G + eps)[:, None]
    out = n * w[None, :]
    if BEFORE:
        out = out * sg_
    tl.store(Y + t.to(tl.int64)[:, None] * F + r * G + cols[None, :], out.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    X,
    GATE,
    W,
    DY,
    DX,
    DG,
    DW,
    M,
    F,
    sx,
    sg,
    eps,
    tiles,
    G: tl.constexpr,
    BEFORE: tl.constexpr,
    W_SHARED: tl.constexpr,
    BT: tl.constexpr,
    BG: tl.constexpr,
):
    """Grid ``(P, R)``: program ``p`` walks ``tiles`` token tiles of group ``r`` from ``p * tiles``: ``dx``, ``dgate``
    to ``DX``, ``DG (M, F)``; the weight gradient of its tokens to ``DW (P, F)`` fp32."""
    pid = tl.program_id(0)
    r = tl.program_id(1)
    cols = tl.arange(0, BG)
    dw = tl.zeros((BG,), dtype=tl.float32)
    for i in range(tiles):
        t = (pid * tiles + i) * BT + tl.arange(0, BT)  # (BT,)
        x, g, w, mask = _tile(X, GATE, W, t, r, cols, M, sx, sg, G, W_SHARED)
        out_off = t.to(tl.int64)[:, None] * F + r * G + cols[None, :]
        dy = tl.load(DY + out_off, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        sg_ = g * sig
        dsilu = sig * (1.0 + g * (1.0 - sig))
        u = x if BEFORE else x * sg_
        rs = tl.rsqrt(tl.sum(u * u, axis=1) / G + eps)  # (BT,)
        n = u * rs[:, None]
        if BEFORE:  # out = n w silu(g)
            dn = dy * w[None, :] * sg_
            dw += tl.sum(dy * n * sg_, axis=0)
            dgate = dy * n * w[None, :] * dsilu
        else:  # out = n w
            dn = dy * w[None, :]
            dw += tl.sum(dy * n, axis=0)
        du = rs[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / G)[:, None])  # the rms norm's backward
        if BEFORE:
            dx = du
        else:  # u = x silu(g)
            dx = du * sg_
            dgate = du * x * dsilu
        tl.store(DX + out_off, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DG + out_off, dgate.to(DG.dtype.element_ty), mask=mask)
    tl.store(DW + pid.to(tl.int64) * F + r * G + cols, dw, mask=cols < G)


def _rows(t: torch.Tensor, features: int) -> torch.Tensor:
    """``t (..., F)`` as ``(M, F)`` with last stride 1 (a view where the strides allow, else a copy)."""
    flat = t.reshape(-1, features)
    return flat if flat.stride(1) == 1 else flat.contiguous()


def _tile_tokens(block_g: int) -> int:
    """Tokens of a program's tile: ``4096 / BG`` (a (32, 128) fp32 tile; the backward's ~9 such tiles live at 8
    warps, ~16 registers each a thread), at most 64."""
    return max(1, min(64, 4096 // block_g))


class _GatedRmsNorm(torch.autograd.Function):
    """``gated_rms_norm_triton`` as an autograd function (the backward runs ``_norm_bwd_kernel``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, before: bool, group: int
    ) -> torch.Tensor:
        features = x.shape[-1]
        xr, gr, w = _rows(x, features), _rows(gate, features), weight.contiguous()
        tokens = xr.shape[0]
        block_g = triton.next_power_of_2(group)
        block_t = _tile_tokens(block_g)
        y = torch.empty(tokens, features, device=x.device, dtype=x.dtype)  # (M, F)
        _norm_fwd_kernel[(triton.cdiv(tokens, block_t), features // group)](
            xr, gr, w, y, tokens, features, xr.stride(0), gr.stride(0), eps,
            G=group, BEFORE=before, W_SHARED=w.shape[0] != features, BT=block_t, BG=block_g,
        )  # fmt: skip
        ctx.save_for_backward(xr, gr, w)
        ctx.meta = (eps, before, group, tuple(x.shape), tuple(gate.shape), gate.dtype, weight.dtype)
        return y.view(x.shape)

    @staticmethod
    @once_differentiable  # no double backward: a clear error instead of "does not require grad"
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        xr, gr, w = ctx.saved_tensors
        eps, before, group, x_shape, gate_shape, gate_dtype, weight_dtype = ctx.meta
        tokens, features = xr.shape
        if tokens == 0:  # no tokens: nothing to launch
            return (xr.new_zeros(x_shape), gr.new_zeros(gate_shape).to(gate_dtype), torch.zeros_like(w).to(weight_dtype),
                    None, None, None)  # fmt: skip
        groups = features // group
        block_g = triton.next_power_of_2(group)
        block_t = _tile_tokens(block_g)
        all_tiles = triton.cdiv(tokens, block_t)
        programs = min(all_tiles, max(1, triton.cdiv(_BWD_PROGRAMS, groups)))
        tiles = triton.cdiv(all_tiles, programs)
        programs = triton.cdiv(all_tiles, tiles)
        dyr = dy.reshape(tokens, features).contiguous()
        dx = torch.empty(tokens, features, device=xr.device, dtype=xr.dtype)  # (M, F)
        dgate = torch.empty(tokens, features, device=xr.device, dtype=gate_dtype)  # (M, F)
        dw = torch.empty(programs, features, device=xr.device, dtype=torch.float32)  # (P, F) partial sums
        shared = w.shape[0] != features
        _norm_bwd_kernel[(programs, groups)](
            xr, gr, w, dyr, dx, dgate, dw, tokens, features, xr.stride(0), gr.stride(0), eps, tiles,
            G=group, BEFORE=before, W_SHARED=shared, BT=block_t, BG=block_g, num_warps=8 if block_t * block_g >= 4096 else 4,
        )  # fmt: skip
        dweight = dw.view(programs, groups, group).sum((0, 1)) if shared else dw.sum(0)  # (G,) or (F,)
        return dx.view(x_shape), dgate.view(gate_shape), dweight.to(weight_dtype), None, None, None


def gated_rms_norm_triton(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    norm_before_gate: bool = True,
    group_size: int | None = None,
) -> torch.Tensor:
    """``norm.gated_rms_norm`` (same arguments and result) by the Triton kernels; also a ``weight (G,)`` shared by
    every group when ``group_size = G`` is less than the features (GDN's heads: call it on ``(..., hv * dv)`` with
    ``group_size = dv``, or on ``(..., hv, dv)`` with the whole last dim). Differentiable in ``x``, ``gate`` and
    ``weight``."""
    features = x.shape[-1]
    group = group_size or features
    if features % group or gate.shape != x.shape or weight.shape not in ((features,), (group,)):
        raise ValueError(
            f"gated_rms_norm_triton: x {tuple(x.shape)}, gate {tuple(gate.shape)}, weight {tuple(weight.shape)}, "
            f"group_size {group_size}: gate must match x, weight be ({features},) or ({group},), group_size divide "
            f"{features}"
        )
    return _GatedRmsNorm.apply(x, gate, weight, eps, norm_before_gate, group)
