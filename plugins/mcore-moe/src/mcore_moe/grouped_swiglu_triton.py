"""A Triton grouped GEMM for the experts' gate and up projections with the SwiGLU in its epilogue.

Why: the ``torch._grouped_mm`` path writes ``(M, 2F)`` ``[gate | up]`` to memory and a second kernel
(``swiglu_triton``) reads it back to write ``(M, F)``; here one kernel computes, for each tile of rows of one
expert and each tile of FFN columns, ``g = x @ gate[e].T`` and ``u = x @ up[e].T`` as two fp32 accumulators over
the same ``x`` tile (``x`` read once per column tile, ``tl.dot``), and writes ``act = silu(g) * u`` (clamped:
``silu(min(g, a)) * clamp(u, -a, a)``) in the input's dtype, plus the pre-activation ``(M, 2F)`` when autograd
needs it. No stacked ``(E_l, 2F, H)`` copy is made in the forward (each weight is read where it lies).

Grid: one program per (row tile, F tile), F tiles fastest (the programs sharing an ``x`` tile run together). The
row tiles of every expert are counted on the device from ``tokens_per_expert`` (``ceil(n_e / BLOCK_M)`` each, a
prefix sum, each program finds its expert by counting the tile ends at or before it): no host sync; the launch
covers the most tiles any split can need (``ceil(M / BLOCK_M) + E_l + 1``) and programs past the real ones return.
Rows past the last group (a fixed-capacity dispatcher's padding) are one more group whose tiles store zeros
(what the reference gives) without reading ``x`` there (NaN in padding stays there).

Backward (``GroupedSwiGLUFunction``): the pre-activation ``(M, 2F)`` is SAVED by the forward, not recomputed:
recomputing it would re-read ``x (M, H)`` and redo ``4 M H F`` GEMM FLOPs (a fifth of the layer's expert FLOPs)
to save one ``(M, 2F)`` write and read; at the issue's shape (H = 2F) the traffic is about the same and the
FLOPs are not, so saving wins on time (the activation memory is what the ``torch._grouped_mm`` path keeps too).
``d pre`` comes from ``swiglu_triton``'s backward kernel, then ``d rows``, ``d gate``, ``d up`` from the same
``torch._grouped_mm`` calls as ``gate_up`` (``grouped_mm``: the caller's probe passed and the call fits), else
from autograd through the per-expert reference (fp32 on CUDA, odd sizes: a checking path, one host sync).

Configs: autotuned once per (H, F) on CUDA over a small Hopper set (BLOCK_M 64/128, BLOCK_N 64/128, BLOCK_K 64,
4-8 warps, 3-4 stages); on the CPU (Triton's interpreter, for tests) one small fixed config. Autotuning runs
the kernel a few times on the first call of a shape: make that call before any CUDA graph capture.

Shape legend: M routed rows sorted by expert, H hidden size, F expert FFN size, E_l local experts.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from mcore.precision.grouped import grouped_linear_reference
from mcore_moe.gate_up import gate_up_grads
from mcore_moe.swiglu_triton import swiglu_triton_backward


@triton.jit
def _grouped_swiglu_fwd(
    X,  # (M, H) rows sorted by expert
    WG,  # (E, F, H) gate
    WU,  # (E, F, H) up
    SIZES,  # (E,) rows per expert, summing to at most M
    ACT,  # (M, F) out
    PRE,  # (M, 2F) out [g | u] (written when SAVE_PRE)
    M,
    H,
    F,
    E,
    W_EXPERT,  # elements between two experts' weights (F * H contiguous; 2 * F * H packed [gate | up])
    limit,
    CLAMP: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    f_tiles = tl.cdiv(F, BLOCK_N)
    tile = pid // f_tiles  # row tile over all groups
    f_tile = pid % f_tiles
    groups = tl.arange(0, BLOCK_E)  # E experts, then the padding group E
    sizes = tl.load(SIZES + groups, mask=groups < E, other=0).to(tl.int32)  # (BLOCK_E,)
    sizes = tl.where(groups == E, M - tl.sum(sizes, 0), sizes)
    row_ends = tl.cumsum(sizes, 0)
    tiles = (sizes + BLOCK_M - 1) // BLOCK_M  # (BLOCK_E,) row tiles per group
    tile_ends = tl.cumsum(tiles, 0)
    e = tl.sum((tile_ends <= tile).to(tl.int32), 0)  # this tile's group
    if e <= E:  # else: past the real tiles
        this = groups == e
        row_end = tl.sum(tl.where(this, row_ends, 0), 0)
        first_tile = tl.sum(tl.where(this, tile_ends - tiles, 0), 0)
        row_start = row_end - tl.sum(tl.where(this, sizes, 0), 0)
        rows = row_start + (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        cols = f_tile * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) FFN features
        col_ok = cols < F
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if e < E:  # the padding group keeps zeros
            w_base = e.to(tl.int64) * W_EXPERT
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
                k_ok = ks < H
                x = tl.load(X + rows64[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w_off = w_base + cols[None, :].to(tl.int64) * H + ks[:, None]  # (BLOCK_K, BLOCK_N): W[e].T tile
                w_ok = k_ok[:, None] & col_ok[None, :]
                wg = tl.load(WG + w_off, mask=w_ok, other=0.0)
                wu = tl.load(WU + w_off, mask=w_ok, other=0.0)
                if DOT_FP32:  # the interpreter's bf16 dot reads the raw bits: multiply in fp32 there
                    x, wg, wu = x.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
                acc_g = tl.dot(x, wg, acc_g, input_precision=PRECISION)
                acc_u = tl.dot(x, wu, acc_u, input_precision=PRECISION)
        out_ok = row_ok[:, None] & col_ok[None, :]
        if SAVE_PRE:
            pre = PRE + rows64[:, None] * (2 * F) + cols[None, :]
            tl.store(pre, acc_g.to(PRE.dtype.element_ty), mask=out_ok)
            tl.store(pre + F, acc_u.to(PRE.dtype.element_ty), mask=out_ok)
        g, u = acc_g, acc_u
        if CLAMP:
            g = tl.minimum(g, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
        act = g * tl.sigmoid(g) * u
        tl.store(ACT + rows64[:, None] * F + cols[None, :], act.to(ACT.dtype.element_ty), mask=out_ok)


def _configs() -> list[triton.Config]:
    """The Hopper set: (BLOCK_M, BLOCK_N, warps, stages), BLOCK_K 64. Two fp32 accumulators: tiles past 64 x 64
    take 8 warps (compiled for sm_90 with Triton 3.9: 4 warps spill there; 128 x 128 on 8 uses 255 registers and
    spills 32 bytes, kept: the autotuner judges; shared memory at most 192 KiB)."""
    shapes = [(64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4)]
    shapes += [(64, 128, 8, 3), (64, 128, 8, 4), (128, 128, 8, 3), (128, 128, 8, 4)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 64}, num_warps=w, num_stages=s) for m, n, w, s in shapes
    ]


_tuned = triton.autotune(configs=_configs(), key=["H", "F"])(_grouped_swiglu_fwd)
_INTERPRETED = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}  # the CPU (interpreter) config: small, quick


def _rows_contiguous(weight: torch.Tensor) -> torch.Tensor:
    """``weight (E_l, F, H)`` itself when each expert's ``(F, H)`` is contiguous (strides ``(s, H, 1)``: a packed
    ``[gate | up]`` view, ``GroupedSwiGLU.pack_for_inference``), else a contiguous copy."""
    _, f, h = weight.shape
    if weight.stride(2) == 1 and weight.stride(1) == h and weight.stride(0) >= f * h:
        return weight
    return weight.contiguous()


def grouped_swiglu_forward(
    rows: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    limit: float | None,
    *,
    save_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel: ``rows (M, H)``, ``gate``/``up`` ``(E_l, F, H)`` -> ``act (M, F)`` and ``pre (M, 2F)`` (``None``
    unless ``save_pre``); rows past ``tokens_per_expert``'s sum are padding (zeros out)."""
    x, wg, wu = rows.contiguous(), _rows_contiguous(gate), _rows_contiguous(up)
    if wg.stride(0) != wu.stride(0):
        wg, wu = wg.contiguous(), wu.contiguous()
    m, h = x.shape
    e, f = wg.shape[0], wg.shape[1]
    act = x.new_empty((m, f))  # (M, F)
    pre = x.new_empty((m, 2 * f)) if save_pre else act  # (M, 2F); a placeholder pointer when not saved
    if m == 0 or f == 0:
        return act, (pre if save_pre else None)
    if h == 0:
        act.zero_()
        if save_pre:
            pre.zero_()
        return act, (pre if save_pre else None)
    sizes = tokens_per_expert.to(device=x.device)
    args = (x, wg, wu, sizes, act, pre, m, h, f, e, wg.stride(0), 0.0 if limit is None else float(limit))
    consts: dict[str, Any] = {
        "CLAMP": limit is not None,
        "SAVE_PRE": save_pre,
        "PRECISION": "ieee" if x.dtype == torch.float32 else "tf32",  # fp32 inputs: no TF32 rounding
        "DOT_FP32": not x.is_cuda,
        "BLOCK_E": triton.next_power_of_2(e + 1),
    }

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return ((triton.cdiv(m, meta["BLOCK_M"]) + e + 1) * triton.cdiv(f, meta["BLOCK_N"]),)

    if x.is_cuda:
        _tuned[grid](*args, **consts)
    else:
        _grouped_swiglu_fwd[grid({**_INTERPRETED})](*args, **consts, **_INTERPRETED, num_warps=4)
    return act, (pre if save_pre else None)


class GroupedSwiGLUFunction(torch.autograd.Function):
    """``act = swiglu([gate | up] grouped GEMM)`` by the fused kernel; backward from the saved pre-activation."""

    @staticmethod
    def forward(
        ctx: Any,
        rows: torch.Tensor,
        gate: torch.Tensor,
        up: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        limit: float | None,
        grouped_mm: bool,
    ) -> torch.Tensor:
        act, pre = grouped_swiglu_forward(rows, gate, up, tokens_per_expert, limit, save_pre=True)
        ctx.save_for_backward(rows, gate, up, tokens_per_expert, pre)
        ctx.limit, ctx.grouped_mm = limit, grouped_mm
        return act

    @staticmethod
    def backward(ctx: Any, d_act: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, gate, up, sizes, pre = ctx.saved_tensors
        d_pre = swiglu_triton_backward(pre, d_act, ctx.limit)  # (M, 2F) [d g | d u]
        needs = tuple(ctx.needs_input_grad[:3])
        if ctx.grouped_mm:
            offsets = torch.cumsum(sizes, 0).to(torch.int32)  # (E_l,) end rows, on the device
            d_rows, d_gate, d_up = gate_up_grads(d_pre, rows, gate, up, offsets, needs)
        else:  # the reference's gradients (checking path): autograd through the per-expert GEMMs
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(n) for t, n in zip((rows, gate, up), needs)]
                out = grouped_linear_reference(leaves[0], torch.cat(leaves[1:], dim=1), sizes)  # (M, 2F)
                wanted = [t for t in leaves if t.requires_grad]
                got = iter(torch.autograd.grad(out, wanted, d_pre))
            d_rows, d_gate, d_up = (next(got) if n else None for n in needs)
        return d_rows, d_gate, d_up, None, None, None


def grouped_swiglu(
    rows: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    limit: float | None = None,
    *,
    grouped_mm: bool = False,
) -> torch.Tensor:
    """``silu(rows @ gate[e].T) * (rows @ up[e].T)`` per expert's rows (clamped to ``limit`` when given):
    ``rows (M, H)`` sorted by expert, ``gate``/``up`` ``(E_l, F, H)``, ``tokens_per_expert (E_l,)`` on the device
    -> ``(M, F)`` (padding rows zero). ``grouped_mm``: the backward's GEMMs may use ``torch._grouped_mm``."""
    if rows.dim() != 2 or gate.dim() != 3 or gate.shape != up.shape or rows.shape[1] != gate.shape[2]:
        raise ValueError(
            f"moe: grouped_swiglu rows {tuple(rows.shape)}, gate {tuple(gate.shape)}, up {tuple(up.shape)}; "
            "allowed: (M, H), (E, F, H), (E, F, H)"
        )
    if not (rows.dtype == gate.dtype == up.dtype) or rows.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"moe: grouped_swiglu dtypes rows {rows.dtype}, gate {gate.dtype}, up {up.dtype}; "
            "allowed: one of float32, float16, bfloat16 for all three"
        )
    if not (torch.is_grad_enabled() and (rows.requires_grad or gate.requires_grad or up.requires_grad)):
        return grouped_swiglu_forward(rows, gate, up, tokens_per_expert, limit, save_pre=False)[0]  # no (M, 2F)
    return GroupedSwiGLUFunction.apply(rows, gate, up, tokens_per_expert, limit, grouped_mm)  # type: ignore[no-any-return]
