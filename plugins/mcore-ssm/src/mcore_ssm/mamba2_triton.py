"""Triton forward of the chunked SSD scan (Mamba2), beside its torch reference ``mamba2_reference.ssd_chunked``.

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

All in fp32 (fp64 inputs too): ``tl.dot`` in IEEE fp32 for fp32 inputs, so the result matches the
reference to fp32 rounding, TF32 for bf16/fp16 inputs (which TF32 holds exactly). The backward is the
reference's (recomputed under autograd from the saved inputs): a Triton backward is not written yet.
``ssd_chunked_triton`` takes the arguments of ``ssd_chunked``; chunk sizes must be powers of two >= 16
(``mamba2_kernels.triton_chunk``). Triton's CPU interpreter (``TRITON_INTERPRET=1`` before import) runs it too.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from mcore_ssm.mamba2_kernels import triton_chunk
from mcore_ssm.mamba2_reference import ssd_chunked, to_chunks

__all__ = ["ssd_chunked_triton"]

_NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")


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
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pb = tl.program_id(2)
    g = h // heads_per_group
    q = tl.arange(0, Q)
    p = pb * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    dt = tl.load(dt_ptr + (c * Q + q) * H + h)  # (Q,)
    cum = tl.cumsum(dt * tl.load(a_ptr + h), axis=0)  # (Q,) inclusive log-decay
    if pb == 0:
        tl.store(cum_ptr + (c * H + h) * Q + q, cum)
    last = tl.sum(tl.where(q == Q - 1, cum, 0.0), axis=0)
    w = tl.exp(last - cum) * dt  # (Q,)
    x = tl.load(x_ptr + ((c * Q + q[:, None]) * H + h) * P + p[None, :], mask=p[None, :] < P, other=0.0)  # (Q, BP)
    b = tl.load(b_ptr + ((c * Q + q[:, None]) * G + g) * N + n[None, :], mask=n[None, :] < N, other=0.0)  # (Q, BN)
    state = tl.dot(tl.trans(x * w[:, None]), b, input_precision=PRECISION)  # (BP, BN)
    mask = (p[:, None] < P) & (n[None, :] < N)
    tl.store(states_ptr + ((c * H + h) * P + p[:, None]) * N + n[None, :], state, mask=mask)


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
    c = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pb = tl.program_id(2)
    g = h // heads_per_group
    q = tl.arange(0, Q)
    p = pb * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    cum = tl.load(cum_ptr + (c * H + h) * Q + q)  # (Q,)
    dt = tl.load(dt_ptr + (c * Q + q) * H + h)  # (Q,)
    rows = ((c * Q + q[:, None]) * G + g) * N + n[None, :]
    cm = tl.load(c_ptr + rows, mask=n[None, :] < N, other=0.0)  # (Q, BN)
    bm = tl.load(b_ptr + rows, mask=n[None, :] < N, other=0.0)  # (Q, BN)
    scores = tl.dot(cm, tl.trans(bm), input_precision=PRECISION)  # (Q, Q): C_i . B_j
    causal = q[:, None] >= q[None, :]
    decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], 0.0))  # (Q, Q)
    weights = tl.where(causal, scores * decay * dt[None, :], 0.0)
    x = tl.load(x_ptr + ((c * Q + q[:, None]) * H + h) * P + p[None, :], mask=p[None, :] < P, other=0.0)  # (Q, BP)
    y = tl.dot(weights, x, input_precision=PRECISION)  # (Q, BP)
    entering = tl.load(
        entering_ptr + ((c * H + h) * P + p[None, :]) * N + n[:, None],
        mask=(n[:, None] < N) & (p[None, :] < P),
        other=0.0,
    )  # (BN, BP): the state entering the chunk, transposed
    y += tl.exp(cum)[:, None] * tl.dot(cm, entering, input_precision=PRECISION)
    tl.store(y_ptr + ((c * Q + q[:, None]) * H + h) * P + p[None, :], y, mask=p[None, :] < P)


def _forward(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    options: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels on ``to_chunks``'s layout (fp32); results as ``ssd_chunked``'s."""
    chunks = to_chunks(x, dt, A, B, C, D, dt_bias=dt_bias, initial_state=initial_state, **options)
    layout = chunks.layout
    xc, dtc = chunks.x.float().contiguous(), chunks.dt.float().contiguous()  # (c, Q, h, p), (c, Q, h)
    bc, cc = chunks.B.float().contiguous(), chunks.C.float().contiguous()  # (c, Q, g, n)
    total, Q, heads, head_dim = xc.shape
    groups, d_state = bc.shape[2], bc.shape[3]
    count = layout.count
    a = A.float().contiguous()
    BP = max(16, min(64, triton.next_power_of_2(head_dim)))
    BN = max(16, triton.next_power_of_2(d_state))
    precision = "ieee" if chunks.dtype in (torch.float32, torch.float64) else "tf32"  # bf16/fp16 inputs: tf32
    states = xc.new_empty(total, heads, head_dim, d_state)
    cum = xc.new_empty(total, heads, Q)
    entering = xc.new_empty(total, heads, head_dim, d_state)
    final = xc.new_empty(count, heads, head_dim, d_state)
    y = xc.new_empty(total, Q, heads, head_dim)
    if total:
        grid = (total, heads, triton.cdiv(head_dim, BP))
        rep = heads // groups
        _chunk_state[grid](xc, dtc, a, bc, states, cum, heads, groups, head_dim, d_state, rep, Q, BP, BN, precision)
    init = chunks.initial_state
    init_arg = init.float().contiguous() if init is not None else final  # unread without HAS_INIT
    block = min(1024, triton.next_power_of_2(head_dim * d_state))
    pass_grid = (count, heads, triton.cdiv(head_dim * d_state, block))
    _state_passing[pass_grid](
        states,
        cum,
        init_arg,
        entering,
        final,
        layout.first.contiguous(),
        layout.nchunks.contiguous(),
        heads,
        head_dim * d_state,
        Q,
        block,
        init is not None,
    )
    if total:
        _chunk_scan[grid](
            xc, dtc, bc, cc, cum, entering, y, heads, groups, head_dim, d_state, rep, Q, BP, BN, precision
        )
    out = chunks.output(y.to(chunks.x.dtype))
    return out, final.to(chunks.x.dtype)


class _TritonScan(torch.autograd.Function):
    """Forward: the kernels; backward: the reference's gradients, recomputed from the saved inputs."""

    @staticmethod
    def forward(ctx: Any, options: dict[str, Any], *tensors: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        ctx.options = options
        ctx.save_for_backward(*tensors)
        return _forward(*tensors, options)  # type: ignore[arg-type,call-arg]

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor | None, dfinal: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        with torch.enable_grad():
            leaves = [
                None if t is None else t.detach().requires_grad_(bool(need))
                for t, need in zip(saved, needs, strict=True)
            ]
            y, final = ssd_chunked(**dict(zip(_NAMES, leaves, strict=True)), **ctx.options)  # type: ignore[arg-type]
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            outputs, grads_out = [], []
            for out, grad in ((y, dy), (final, dfinal)):
                if grad is not None:
                    outputs.append(out)
                    grads_out.append(grad)
            grads = torch.autograd.grad(outputs, wanted, grads_out, allow_unused=True) if outputs else []
        found = iter(grads)
        result: list[torch.Tensor | None] = [None]
        for t in leaves:
            result.append(next(found) if t is not None and t.requires_grad else None)
        return tuple(result)


def ssd_chunked_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mamba2_reference.ssd_chunked`` with the forward in Triton (module docstring); same arguments and results."""
    if not triton_chunk(chunk_size):
        raise ValueError(f"ssd (triton): chunk_size = {chunk_size!r}; allowed: a power of two >= 16")
    options = {"dt_softplus": dt_softplus, "dt_limit": dt_limit, "cu_seqlens": cu_seqlens, "chunk_size": chunk_size}
    return _TritonScan.apply(options, x, dt, A, B, C, D, dt_bias, initial_state)  # type: ignore[no-any-return]
