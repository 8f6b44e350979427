"""Fused RoPE in Triton: one program per token rotates all heads of Q and K (see ``rope`` for the math).

Inputs may be strided views (e.g. slices of a fused projection); outputs are written
straight into the ``(B, heads, T, hd)`` layout attention kernels want, returned as
``(B, T, heads, hd)`` views. The backward is the same kernel rotating by ``-angle``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    X,
    OUT,
    b,
    t,
    sxb,
    sxt,
    sxh,
    sob,
    sot,
    soh,
    c,
    s,
    NH: tl.constexpr,
    HALF: tl.constexpr,
    REST: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NH) & (d < HALF)
    src = X + b * sxb + t * sxt + h * sxh + d
    dst = OUT + b * sob + t * sot + h * soh + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (x1 * c - x2 * s).to(OUT.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(OUT.dtype.element_ty), mask=mask)
    if REST > 0:
        r = tl.arange(0, BLOCK_R)[None, :]
        rmask = (h < NH) & (r < REST)
        rest = tl.load(X + b * sxb + t * sxt + h * sxh + 2 * HALF + r, mask=rmask, other=0.0)
        tl.store(OUT + b * sob + t * sot + h * soh + 2 * HALF + r, rest, mask=rmask)


@triton.jit
def _rope_kernel(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    T,
    sign,
    sqb,
    sqt,
    sqh,
    skb,
    skt,
    skh,
    soqb,
    soqt,
    soqh,
    sokb,
    sokt,
    sokh,
    NQ: tl.constexpr,
    NK: tl.constexpr,
    HALF: tl.constexpr,
    REST: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    d = tl.arange(0, BLOCK_D)[None, :]
    c = tl.load(COS + pid * HALF + d, mask=d < HALF, other=0.0)
    s = tl.load(SIN + pid * HALF + d, mask=d < HALF, other=0.0) * sign
    _rotate_heads(Q, QO, b, t, sqb, sqt, sqh, soqb, soqt, soqh, c, s, NQ, HALF, REST, BLOCK_HQ, BLOCK_D, BLOCK_R)
    _rotate_heads(K, KO, b, t, skb, skt, skh, sokb, sokt, sokh, c, s, NK, HALF, REST, BLOCK_HK, BLOCK_D, BLOCK_R)


def _rotate(q, k, cos, sin, sign: float, head_major: bool):  # type: ignore[no-untyped-def]
    batch, seq, nq, hd = q.shape
    nk = k.shape[2]
    half = cos.shape[-1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1, "RoPE kernel needs unit stride on the head dim"

    def output(heads: int) -> torch.Tensor:
        if head_major:  # (B, heads, T, hd) storage, seen as (B, T, heads, hd)
            return torch.empty((batch, heads, seq, hd), dtype=q.dtype, device=q.device).transpose(1, 2)
        return torch.empty((batch, seq, heads, hd), dtype=q.dtype, device=q.device)

    qo, ko = output(nq), output(nk)
    cos, sin = cos.contiguous().float(), sin.contiguous().float()
    rest = hd - 2 * half
    _rope_kernel[(batch * seq,)](
        q,
        k,
        qo,
        ko,
        cos,
        sin,
        seq,
        sign,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        qo.stride(0),
        qo.stride(1),
        qo.stride(2),
        ko.stride(0),
        ko.stride(1),
        ko.stride(2),
        NQ=nq,
        NK=nk,
        HALF=half,
        REST=rest,
        BLOCK_HQ=triton.next_power_of_2(nq),
        BLOCK_HK=triton.next_power_of_2(nk),
        BLOCK_D=triton.next_power_of_2(half),
        BLOCK_R=triton.next_power_of_2(max(rest, 1)),
        num_warps=4,
    )
    return qo, ko


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        return _rotate(q, k, cos, sin, 1.0, head_major=True)

    @staticmethod
    def backward(ctx, dq, dk):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        dq = dq if dq.stride(-1) == 1 else dq.contiguous()
        dk = dk if dk.stride(-1) == 1 else dk.contiguous()
        gq, gk = _rotate(dq, dk, cos, sin, -1.0, head_major=False)
        return gq, gk, None, None


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q (B, T, nh, hd)``, ``k (B, T, nkv, hd)`` -> rotated, same shapes (head-major storage)."""
    return _Rope.apply(q, k, cos, sin)
