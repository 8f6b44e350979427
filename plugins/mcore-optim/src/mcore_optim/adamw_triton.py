"""One AdamW step per parameter in one Triton kernel: gradient cast, clipping, update and the low-precision copy.

Why it exists: with bf16 parameters and fp32 master weights (the ``bf16`` recipe's default), the torch path
costs four passes over memory per parameter and step: the bf16 gradient cast to an fp32 copy, clipping's
multiply (``clip_grads_``), ``torch._fused_adamw_`` on the master weights (fp32 operands only), and the copy of
the new master weights into the bf16 parameter (``_foreach_copy_``). On an H100, ``bench-0.9b`` (2026-12-06),
those passes took about 15 ms of a 111 ms ``mcore train`` step. This kernel reads each gradient once in its own
dtype, multiplies it by the clipping factor (a device scalar: no host sync), updates the fp32 master weight
and moments, and writes the master, the moments and the low-precision parameter in the same pass.

The math is ``mcore_optim.adamw_math``'s (decoupled weight decay, bias-corrected moments)::

    g <- grad * scale;  w <- w (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    w <- w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps);  param <- w (rounded to its dtype)

with ``t`` the parameter's own step count (a 0-d fp32 device tensor, already incremented), read in the kernel.
One launch covers a whole parameter group (per gradient and parameter dtype): programs of ``BLOCK`` elements
find their parameter in a table, and its tensors through tables of addresses (apex's multi-tensor apply, in
Triton), so a step costs a few launches instead of one per parameter; the tables stay on the device between
steps, only the gradients' addresses are copied each step (from pinned memory, no host sync).
Imported only on CUDA; ``adamw.AdamW`` falls back to the torch paths elsewhere (and Triton's interpreter runs
this kernel on the CPU in the tests).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from mcore.errors import UserError

#: Elements per program (a 2048-wide norm weight is one program; the embedding spreads over the whole card).
BLOCK = 2048

#: torch dtypes of gradients and low-precision parameters the kernel reads and writes.
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _adamw_kernel(
    w_table,  # (P,) int64 addresses of the fp32 master weights (or fp32 parameters), updated
    g_table,  # (P,) int64 addresses of the gradients (G_DTYPE)
    m_table,  # (P,) int64 addresses of the fp32 first moments, updated
    v_table,  # (P,) int64 addresses of the fp32 second moments, updated
    p_table,  # (P,) int64 addresses of the low-precision parameters (P_DTYPE), written when HAS_P
    t_table,  # (P,) int64 addresses of the 0-d fp32 step counts t, already incremented
    numel_table,  # (P,) int64 elements of each parameter
    first_block_table,  # (P,) int32 first program of each parameter
    block_param,  # (blocks,) int32 which parameter each program updates
    scale_ptr,  # () fp32 gradient factor (HAS_SCALE)
    ok_ptr,  # () fp32: 0 skips the whole update, nothing is written (GUARDED)
    lr,
    beta1,
    beta2,
    eps,
    decay,  # 1 - lr * weight_decay
    G_DTYPE: tl.constexpr,
    P_DTYPE: tl.constexpr,
    HAS_P: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    GUARDED: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.load(block_param + pid)
    n = tl.load(numel_table + i)
    if GUARDED:  # a bad step: no element in range, every load and store masked off, the tensors stay as they were
        n = tl.where(tl.load(ok_ptr) != 0.0, n, 0)
    start = (pid - tl.load(first_block_table + i)).to(tl.int64) * BLOCK_SIZE
    offs = start + tl.arange(0, BLOCK_SIZE)
    w_ptr = tl.load(w_table + i).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(g_table + i).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(m_table + i).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(v_table + i).to(tl.pointer_type(tl.float32))
    p_ptr = tl.load(p_table + i).to(tl.pointer_type(P_DTYPE))
    t = tl.load(tl.load(t_table + i).to(tl.pointer_type(tl.float32)))
    bias1 = 1.0 - tl.exp2(t * tl.log2(beta1))  # 1 - beta1^t
    bias2 = 1.0 - tl.exp2(t * tl.log2(beta2))
    scale = tl.load(scale_ptr) if HAS_SCALE else 1.0
    step_size = lr / bias1
    if start + BLOCK_SIZE <= n:  # a whole block: no mask, so (ALIGNED) the loads and stores are vectorized
        _update(w_ptr, g_ptr, m_ptr, v_ptr, p_ptr, offs, n, scale, step_size, bias2, beta1, beta2, eps, decay,
                P_DTYPE, HAS_P, False, ALIGNED)  # fmt: skip
    else:  # the parameter's last, partial block (or a skipped step: n = 0, nothing read or written)
        _update(w_ptr, g_ptr, m_ptr, v_ptr, p_ptr, offs, n, scale, step_size, bias2, beta1, beta2, eps, decay,
                P_DTYPE, HAS_P, True, ALIGNED)  # fmt: skip


@triton.jit
def _update(
    w_ptr, g_ptr, m_ptr, v_ptr, p_ptr, offs, n, scale, step_size, bias2, beta1, beta2, eps, decay,
    P_DTYPE: tl.constexpr, HAS_P: tl.constexpr, MASKED: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """One block's update (the module docstring's math) at ``offs``; ``MASKED``: only the elements below ``n``."""
    mask = offs < n if MASKED else None
    gs, ws = _block(g_ptr, offs, ALIGNED), _block(w_ptr, offs, ALIGNED)
    ms, vs = _block(m_ptr, offs, ALIGNED), _block(v_ptr, offs, ALIGNED)
    g = tl.load(gs, mask=mask, other=0.0 if MASKED else None).to(tl.float32) * scale
    w = tl.load(ws, mask=mask, other=0.0 if MASKED else None) * decay
    m = tl.load(ms, mask=mask, other=0.0 if MASKED else None)
    v = tl.load(vs, mask=mask, other=0.0 if MASKED else None)
    m = m + (g - m) * (1.0 - beta1)  # lerp, as torch's fused kernel
    v = v * beta2 + (1.0 - beta2) * g * g
    denom = tl.sqrt(v) / tl.sqrt(bias2) + eps
    w = w - step_size * (m / denom)
    tl.store(ws, w, mask=mask)
    tl.store(ms, m, mask=mask)
    tl.store(vs, v, mask=mask)
    if HAS_P:
        tl.store(_block(p_ptr, offs, ALIGNED), w.to(P_DTYPE), mask=mask)


@triton.jit
def _block(base, offs, ALIGNED: tl.constexpr):
    """``base + offs``; with ``ALIGNED`` (every tensor of the launch starts 16-byte aligned: ``aligned``) the compiler
    is told that the block starts 16-byte aligned and runs contiguous. Pointers read from a table carry no alignment
    of their own: without it no load or store is vectorized (offline sm_90 build: 64 scalar loads and stores of 4 and
    2 bytes a thread for a block of 16 elements; with it, 14 loads and 14 stores of 16 bytes in a whole block)."""
    ptrs = base + offs
    if ALIGNED:
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, 16), 16)
    return ptrs


#: ``MCORE_OPTIM_ADAMW_VECTORIZED``: ``1`` (unset: the default) lets whole blocks of 16-byte aligned tensors load and
#: store 16 bytes at a time (``_block``); ``0``: the scalar loads of the kernel as first measured. On an H100 (torch
#: 2.11, 2026-12-07) the vectorized pass took 8.42 ms for bench-0.9b's 0.89 B parameters against 9.15 ms scalar
#: (97.6% against 89.8% of a copy of the same bytes), with the same results (``benchmarks/RESULTS.md``).
VECTORIZED_ENV = "MCORE_OPTIM_ADAMW_VECTORIZED"


def vectorized_from_env() -> bool:
    """``MCORE_OPTIM_ADAMW_VECTORIZED`` as a bool; another value is a one-line ``UserError``."""
    value = os.environ.get(VECTORIZED_ENV, "1")
    if value not in ("0", "1"):
        raise UserError(f"{VECTORIZED_ENV}={value!r}; allowed: 0 (scalar loads) or 1 (vectorized, the default)")
    return value == "1"


def aligned(*groups: Sequence[torch.Tensor | None]) -> bool:
    """Whether every tensor starts on a 16-byte boundary (the vectorized loads' requirement; views into flat
    buffers may not)."""
    return all(t is None or t.data_ptr() % 16 == 0 for group in groups for t in group)


def _address_table(pointers: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(pointers, dtype=torch.int64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


#: One parameter's tensors: fp32 weight, first and second moment, step count, low-precision copy (or None).
Member = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]

#: One row of a launch's tables: the addresses of the weight, moments, step count and low-precision copy (-1: none),
#: the row's elements, and where they start in the parameter (elements: the gradient's address is offset by it).
Row = tuple[int, int, int, int, int, int, int]


def chunked_layout(p: torch.Tensor) -> tuple[int, int, int] | None:
    """``(count, chunk, stride)`` when ``p`` is ``count`` contiguous runs of ``chunk >= BLOCK`` elements, ``stride``
    elements apart (a strided view of a packed buffer, e.g. an MoE ``(E, F, H)`` gate in an ``(E, 2, F, H)`` buffer:
    ``E`` runs of ``F H``); None for a contiguous ``p``, shorter runs or any other layout."""
    if p.is_contiguous() or p.dim() < 2 or p.numel() == 0 or not p[0].is_contiguous() or p.stride(0) < p[0].numel():
        return None
    if p[0].numel() < BLOCK:  # runs shorter than a program's block: as many rows as runs (the caller copies instead)
        return None
    return p.shape[0], p[0].numel(), p.stride(0)


def _rows(member: Member) -> list[Row]:
    """A parameter's rows: one, or one per contiguous run of a chunked low-precision copy (``chunked_layout``), whose
    weight, moments and gradient are contiguous: run ``r`` reads them ``r * chunk`` elements in."""
    w, m, v, t, p = member
    if p is None or p.is_contiguous():
        return [
            (w.data_ptr(), m.data_ptr(), v.data_ptr(), t.data_ptr(), -1 if p is None else p.data_ptr(), w.numel(), 0)
        ]
    layout = chunked_layout(p)
    if layout is None:
        raise ValueError(f"adamw_step_triton: a low-precision parameter of strides {p.stride()} is neither contiguous "
                         "nor chunked (chunked_layout)")  # fmt: skip
    count, chunk, stride = layout
    fp32, low = w.element_size(), p.element_size()
    return [
        (
            w.data_ptr() + r * chunk * fp32,
            m.data_ptr() + r * chunk * fp32,
            v.data_ptr() + r * chunk * fp32,
            t.data_ptr(),
            p.data_ptr() + r * stride * low,
            chunk,
            r * chunk,
        )
        for r in range(count)
    ]


class _Tables:
    """The device tables of one launch that stay put between steps: the addresses of the weights, moments, step
    counts and low-precision copies, element counts, and which row each program updates (a row a parameter, or one
    a contiguous run of a chunked copy). Rebuilt when any of those tensors moves (``key``); the gradients' addresses
    change every step and are copied each call (``grad_table``)."""

    def __init__(self, members: list[Member], device: torch.device) -> None:
        rows, row_param, row_offset = [], [], []
        for index, member in enumerate(members):
            for row in _rows(member):
                rows.append(row)
                row_param.append(index)
                row_offset.append(row[6])
        self.key = _key(members)
        w, m, v, t, p, numels, _ = (list(col) for col in zip(*rows, strict=True))
        has_p = members[0][4] is not None
        self.aligned = all(a % 16 == 0 for col in (w, m, v, p if has_p else []) for a in col)
        self.w, self.m, self.v, self.t = (_address_table(col, device) for col in (w, m, v, t))
        self.p = _address_table(p, device) if has_p else self.w
        # a chunked parameter's rows read its gradient at offsets: (rows,) which member, elements in (None: one row
        # a member, the gradients' own addresses serve)
        self.chunked = len(rows) > len(members)
        self.row_param = torch.tensor(row_param, dtype=torch.int64).to(device) if self.chunked else None
        self.row_offset = torch.tensor(row_offset, dtype=torch.int64).to(device) if self.chunked else None
        self.offsets_aligned = all(o * 2 % 16 == 0 for o in row_offset)  # at 2 bytes an element, and so at 4
        blocks = [triton.cdiv(n, BLOCK) for n in numels]
        firsts = [sum(blocks[:i]) for i in range(len(blocks))]
        self.blocks = sum(blocks)
        self.numel = torch.tensor(numels, dtype=torch.int64).to(device)
        self.first = torch.tensor(firsts, dtype=torch.int32).to(device)
        self.block_param = torch.repeat_interleave(
            torch.arange(len(blocks), dtype=torch.int32), torch.tensor(blocks)
        ).to(device)  # (blocks,)

    def grad_table(self, grads: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, bool]:
        """Each row's gradient address on ``device`` (``grads`` in the members' order; one host copy of one address
        a parameter, rows of chunked parameters offset on the device), and whether all are 16-byte aligned."""
        pointers = [g.data_ptr() for g in grads]
        table = _address_table(pointers, device)  # (members,)
        aligned = all(a % 16 == 0 for a in pointers)
        if self.row_param is None or self.row_offset is None:
            return table, aligned
        size = grads[0].element_size()  # one gradient dtype a launch
        return table[self.row_param] + self.row_offset * size, aligned and self.offsets_aligned


def _key(members: list[Member]) -> tuple[tuple[Any, ...], ...]:
    """What the tables were built from: every tensor's address, the element count and the low-precision copy's
    strides (a chunked copy's rows follow from them), one entry a parameter (cheap to build every step)."""
    return tuple(
        (
            w.data_ptr(),
            m.data_ptr(),
            v.data_ptr(),
            t.data_ptr(),
            -1 if p is None else p.data_ptr(),
            w.numel(),
            None if p is None else p.stride(),
        )
        for w, m, v, t, p in members
    )


def adamw_step_triton(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    params_out: list[torch.Tensor | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: torch.Tensor | None = None,
    ok: torch.Tensor | None = None,
    cache: dict[Any, _Tables] | None = None,
    vectorized: bool | None = None,
) -> None:
    """Update every ``weights[i]`` (fp32, contiguous) with ``grads[i]`` (same shape and layout, fp32/bf16/fp16),
    its fp32 moments and step count (incremented here); write the result into ``params_out[i]`` (the bf16/fp16
    parameter, contiguous or chunked (``chunked_layout``: a view of a packed buffer, one table row per run), or
    ``None`` when ``weights[i]`` is the parameter). ``grad_scale``: an fp32 0-d device tensor every
    gradient is multiplied by first (the clipping factor), or ``None``. ``ok``: a 0-d bool device tensor; where
    false nothing changes (weights, moments, parameters, step counts), read on the device. One launch per (gradient dtype,
    parameter dtype) combination; ``cache`` (a dict the caller keeps, one per parameter group) holds the tables
    between calls, so a steady step copies only the gradients' addresses (no host sync). ``vectorized``: whole
    blocks of aligned tensors loaded 16 bytes at a time (None: ``MCORE_OPTIM_ADAMW_VECTORIZED``)."""
    if not weights:
        return
    vectorize = vectorized_from_env() if vectorized is None else vectorized
    okf = None if ok is None else ok.to(device=weights[0].device, dtype=torch.float32)  # () 1.0 or 0.0
    torch._foreach_add_(steps, 1.0 if okf is None else okf)  # a skipped step leaves the counts
    device = weights[0].device
    scale = grad_scale if grad_scale is not None else steps[0]  # any fp32 pointer: not read without HAS_SCALE
    launches: dict[tuple[torch.dtype, torch.dtype | None], list[int]] = {}
    for i, (w, g, p) in enumerate(zip(weights, grads, params_out, strict=True)):
        if w.numel():
            launches.setdefault((g.dtype, None if p is None else p.dtype), []).append(i)
    cache = {} if cache is None else cache
    for (g_dtype, p_dtype), rows in launches.items():
        members = [(weights[i], exp_avgs[i], exp_avg_sqs[i], steps[i], params_out[i]) for i in rows]
        tables = cache.get((g_dtype, p_dtype))
        if tables is None or tables.key != _key(members):
            tables = cache[(g_dtype, p_dtype)] = _Tables(members, device)
        grad_table, grads_aligned = tables.grad_table([grads[i] for i in rows], device)
        _adamw_kernel[(tables.blocks,)](
            tables.w,
            grad_table,
            tables.m,
            tables.v,
            tables.p,
            tables.t,
            tables.numel,
            tables.first,
            tables.block_param,
            scale,
            okf if okf is not None else steps[0],  # not read without GUARDED
            lr,
            beta1,
            beta2,
            eps,
            1.0 - lr * weight_decay,
            G_DTYPE=TL_DTYPES[g_dtype],
            P_DTYPE=TL_DTYPES[p_dtype if p_dtype is not None else torch.float32],
            HAS_P=p_dtype is not None,
            HAS_SCALE=grad_scale is not None,
            GUARDED=okf is not None,
            ALIGNED=vectorize and tables.aligned and grads_aligned,
            BLOCK_SIZE=BLOCK,
        )
