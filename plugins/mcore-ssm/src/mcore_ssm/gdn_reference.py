"""The gated delta rule in plain PyTorch: the token recurrence (the oracle), the chunked WY form (the CPU path
and the kernels' oracle), and the single-token decode step.

Shape legend: B rows, T tokens per row, N = B * T, S sequences (segments: rows, or documents under
``cu_seqlens``; ``mcore_ssm.packing``), hk query/key heads, hv value heads (a multiple of hk), dk key
dim, dv value dim, C chunk size, M chunks.

Per value head, with the state ``S (dk, dv)`` in fp32 (Yang et al., "Gated Delta Networks"; fla's
``chunk_gated_delta_rule`` names and layout: ``q, k (B, T, h, dk)``, ``v (B, T, hv, dv)``, ``g, beta
(B, T, hv)``, ``g`` the log of the decay)::

    S <- exp(g_t) S;   u_t = beta_t (v_t - S^T k_t);   S <- S + k_t u_t^T;   o_t = S^T (scale q_t)

Value head ``i`` reads query/key head ``i // (hv // hk)`` (Qwen3-Next's grouping). ``scale`` defaults
to ``dk ** -0.5``; q and k are used as given (the block L2-normalises them). Each segment starts from
its ``initial_state`` (zeros without one) and never sees another's tokens; the final state of each
segment is returned on request.

Chunked form, per chunk of ``C`` tokens starting from ``S0``, with ``G`` the in-chunk cumulative sum of
``g``, ``D_ij = exp(G_i - G_j)`` for ``j <= i`` and ``A = tril_{-1}(diag(beta) K K^T * D)``: the
recurrence's ``u`` satisfy ``(I + A) U = diag(beta) V - diag(beta exp(G)) K S0``, so with the WY
factors ``U~ = (I + A)^-1 diag(beta) V`` and ``W = (I + A)^-1 diag(beta exp(G)) K``::

    U = U~ - W S0;   O = (exp(G) Q) S0 + tril(Q K^T * D) U;   S1 = exp(G_C) S0 + (exp(G_C - G) K)^T U

Chunks never straddle segments: each segment is cut into its own chunks, the last one padded with
tokens that have ``k = v = q = 0``, ``beta = 0``, ``g = 0`` (they change nothing, exactly). Only ratios
``exp(G_i - G_j)`` with ``j <= i`` and ``exp(G)`` are formed (never ``exp(-G)``), so a strong decay
underflows to zero instead of overflowing; the exponents ``G_i - G_j`` are sums of the ``g`` between the two
tokens (``mcore_ssm.segsum``), not differences of ``G``, which lose them and ``dg`` to rounding at strong decay.
"""

from __future__ import annotations

import math
from typing import TypedDict

import torch

from mcore_ssm.packing import Segments, check_state_count, from_padded, segments_of, to_padded
from mcore_ssm.segsum import segsum

#: The default chunk size of the chunked form (the Triton kernels' only one).
CHUNK = 64


class ChunkRuleOptions(TypedDict, total=False):
    """``chunk_gated_delta_rule``'s keyword arguments (its signature holds their defaults), as
    ``gdn_triton.gated_delta_rule_triton`` and ``gdn_kernels.gated_delta_rule`` take and pass them on."""

    scale: float | None
    initial_state: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    output_final_state: bool
    chunk_size: int
    segments: Segments | None


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
) -> tuple[int, int, int, int]:
    """``(hk, hv, dk, dv)``; ``ValueError`` naming the shapes when they do not fit together."""
    *lead, hk, dk = q.shape
    *_, hv, dv = v.shape
    ok = (
        k.shape == q.shape
        and v.shape[:-2] == q.shape[:-2]
        and hv % hk == 0
        and g.shape == (*lead, hv)
        and beta.shape == (*lead, hv)
    )
    if not ok:
        raise ValueError(
            f"gated delta rule: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, "
            f"beta {tuple(beta.shape)}; expected q, k (..., hk, dk), v (..., hv, dv) with hk dividing hv, "
            "g and beta (..., hv)"
        )
    return hk, hv, dk, dv


def _prepare(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, scale: float | None
) -> tuple[torch.Tensor, ...]:
    """Everything in the compute dtype (fp32, or fp64 for fp64 inputs), q/k repeated to the value heads
    (``(..., hv, dk)``) and q scaled."""
    hk, hv, dk, _ = _check(q, k, v, g, beta)
    compute = torch.promote_types(v.dtype, torch.float32)
    scale = dk**-0.5 if scale is None else scale
    if not math.isfinite(scale):
        raise ValueError(f"gated delta rule: scale = {scale!r}; allowed: a finite number")
    group = hv // hk
    qx = q.to(compute).repeat_interleave(group, dim=-2) * scale  # (..., hv, dk)
    kx = k.to(compute).repeat_interleave(group, dim=-2)  # (..., hv, dk)
    return qx, kx, v.to(compute), g.to(compute), beta.to(compute)


def _initial(
    initial_state: torch.Tensor | None,
    segments: Segments,
    cu_seqlens: torch.Tensor | None,
    shape: tuple[int, ...],
    like: torch.Tensor,
) -> torch.Tensor:
    """``(S, hv, dk, dv)`` in the compute dtype: the given states (checked) or zeros."""
    if initial_state is None:
        return like.new_zeros(segments.count, *shape)
    check_state_count(segments, initial_state.shape[0], cu_seqlens, "gated delta rule initial_state")
    if tuple(initial_state.shape[1:]) != shape:
        raise ValueError(
            f"gated delta rule: initial_state of shape {tuple(initial_state.shape)}; expected (S, hv, dk, dv) = "
            f"({segments.count}, {', '.join(map(str, shape))})"
        )
    return initial_state.to(like.dtype)


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence token by token (all segments at once): ``q, k (B, T, hk, dk)``, ``v (B, T, hv, dv)``,
    ``g, beta (B, T, hv)``, ``initial_state (S, hv, dk, dv)`` -> ``(o (B, T, hv, dv)`` in ``v``'s dtype,
    ``final_state (S, hv, dk, dv)`` fp32 (fp64 for fp64 inputs) or ``None)``."""
    batch, seq = v.shape[:2]
    qx, kx, vx, gx, bx = _prepare(q, k, v, g, beta, scale)
    segments = segments_of(batch, seq, cu_seqlens, v.device, None)
    hv, dk, dv = vx.shape[2], kx.shape[3], vx.shape[3]
    state = _initial(initial_state, segments, cu_seqlens, (hv, dk, dv), vx)  # (S, hv, dk, dv)
    pad = [to_padded(t.flatten(0, 1), segments) for t in (qx, kx, vx, gx, bx)]  # (S, L, ...), padding inert
    qp, kp, vp, gp, bp = pad
    outs = []
    for t in range(segments.max_len):
        state = state * gp[:, t, :, None, None].exp()  # (S, hv, dk, dv)
        seen = torch.einsum("shk,shkv->shv", kp[:, t], state)  # (S, hv, dv) S^T k
        u = bp[:, t, :, None] * (vp[:, t] - seen)  # (S, hv, dv)
        state = state + kp[:, t, :, :, None] * u[:, :, None, :]
        outs.append(torch.einsum("shk,shkv->shv", qp[:, t], state))  # (S, hv, dv)
    out = from_padded(torch.stack(outs, dim=1), segments).view(batch, seq, hv, dv)
    return out.to(v.dtype), state if output_final_state else None


def gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per sequence (decode): ``q, k (S, hk, dk)``, ``v (S, hv, dv)``, ``g, beta (S, hv)``,
    ``state (S, hv, dk, dv)`` -> ``(o (S, hv, dv)`` in ``v``'s dtype, ``new_state`` in ``state``'s dtype)``."""
    qx, kx, vx, gx, bx = _prepare(q, k, v, g, beta, scale)
    if state.shape != (v.shape[0], v.shape[1], k.shape[-1], v.shape[-1]):
        raise ValueError(f"gated delta rule step: state of shape {tuple(state.shape)}; expected (S, hv, dk, dv)")
    s = state.to(vx.dtype) * gx.exp()[:, :, None, None]  # (S, hv, dk, dv)
    u = bx[:, :, None] * (vx - torch.einsum("shk,shkv->shv", kx, s))  # (S, hv, dv)
    s = s + kx[:, :, :, None] * u[:, :, None, :]
    out = torch.einsum("shk,shkv->shv", qx, s)  # (S, hv, dv)
    return out.to(v.dtype), s.to(state.dtype)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = CHUNK,
    segments: Segments | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked WY form of ``recurrent_gated_delta_rule`` (same arguments and results; ``chunk_size`` C;
    ``segments``: ``documents(B, T, cu_seqlens)`` when the caller has it already).

    Segments are cut into chunks ``[0, C), [C, 2C), ...`` of their own tokens; chunk ``j`` of every segment
    that has one is processed in one batched step (segments sorted longest first, so each step's chunks
    are a contiguous block and the work is proportional to the tokens, not to ``S * L``).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size = {chunk_size!r}; allowed: a positive int")
    batch, seq = v.shape[:2]
    qx, kx, vx, gx, bx = _prepare(q, k, v, g, beta, scale)
    segments = segments_of(batch, seq, cu_seqlens, v.device, segments)
    hv, dk, dv = vx.shape[2], kx.shape[3], vx.shape[3]
    size = chunk_size

    # chunk layout: chunk j of the r-th longest segment is chunk base[j] + r
    chunks = (segments.lengths + size - 1) // size  # (S,)
    order = torch.argsort(chunks, descending=True, stable=True)  # (S,) segments, most chunks first
    rank = torch.empty_like(order)
    rank[order] = torch.arange(segments.count, device=order.device)
    sorted_chunks = chunks[order].tolist()
    active = [sum(1 for c in sorted_chunks if c > j) for j in range(sorted_chunks[0])]  # segments with a chunk j
    base = [0]
    for count in active:
        base.append(base[-1] + count)
    chunk_of = torch.tensor(base[:-1], device=v.device)[segments.pos // size] + rank[segments.seg]  # (N,)
    slot = segments.pos % size  # (N,)

    def chunked(x: torch.Tensor) -> torch.Tensor:  # (B, T, hv, ...) -> (M, hv, C, ...), padding inert
        flat = x.flatten(0, 1)  # (N, hv, ...)
        out = flat.new_zeros(base[-1], size, *flat.shape[1:]).index_put((chunk_of, slot), flat)  # (M, C, hv, ...)
        return out.transpose(1, 2)

    qc, kc, vc, gc, bc = (chunked(t) for t in (qx, kx, vx, gx, bx))  # (M, hv, C, dk | dv | -)
    cum = gc.cumsum(-1)  # (M, hv, C) G
    between = segsum(gc)  # (M, hv, C, C) G_i - G_j as the sum of the g between them (-inf for j > i)
    ratio = between.exp()  # (M, hv, C, C) D
    strict = (kc * bc[..., None]) @ kc.transpose(-1, -2) * ratio.tril(-1)  # (M, hv, C, C) A
    eye = torch.eye(size, dtype=vx.dtype, device=v.device)
    rhs = torch.cat([vc * bc[..., None], kc * (bc * cum.exp())[..., None]], dim=-1)  # (M, hv, C, dv + dk)
    solved = torch.linalg.solve_triangular(eye + strict, rhs, upper=False, unitriangular=True)
    u_tilde, w = solved.split([dv, dk], dim=-1)  # (M, hv, C, dv), (M, hv, C, dk)
    scores = qc @ kc.transpose(-1, -2) * ratio  # (M, hv, C, C) tril(Q K^T * D)
    q_decayed = qc * cum.exp()[..., None]  # (M, hv, C, dk)
    last = cum[..., -1]  # (M, hv) G_C
    k_to_end = kc * between[..., -1, :].exp()[..., None]  # (M, hv, C, dk) exp(G_C - G) K

    state = _initial(initial_state, segments, cu_seqlens, (hv, dk, dv), vx)[order]  # (S, hv, dk, dv) sorted
    outs = []
    for j, count in enumerate(active):  # chunk j of the `count` segments that have one
        part = slice(base[j], base[j + 1])
        s0 = state[:count]  # (count, hv, dk, dv)
        u = u_tilde[part] - w[part] @ s0  # (count, hv, C, dv)
        outs.append(q_decayed[part] @ s0 + scores[part] @ u)  # (count, hv, C, dv)
        s1 = last[part].exp()[..., None, None] * s0 + k_to_end[part].transpose(-1, -2) @ u
        state = torch.cat([s1, state[count:]])
    out = torch.cat(outs).transpose(1, 2)[chunk_of, slot]  # (N, hv, dv)
    final = state[rank] if output_final_state else None  # (S, hv, dk, dv) in segment order
    return out.view(batch, seq, hv, dv).to(v.dtype), final
