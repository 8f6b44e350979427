"""One Triton launch that stores a step's keys and values into their pages.

Why it exists: the torch path stores keys and values with one ``index_copy_`` each, two kernels per attention
layer and step; in a captured decode step of a small model at batch 1 a kernel costs more in launch and tail
than in bytes (issue 20: bench-0.9b's graph is ~14 kernels a layer). This kernel writes both in one launch: program
``n`` copies row ``n`` of ``key (N, nkv, hd)`` and ``value (N, nkv, hdv)`` to flat page slot ``slots[n]``
(``block * bs + offset``) of ``key_pages (P, bs, nkv, hd)`` and ``value_pages (P, bs, nkv, hdv)``. Bytes are moved
as they are (same dtype, no rounding), so the pages equal the torch path's bit for bit.

Imported only on CUDA when triton imports (``kv_store_for``); FP8 pages (quantised on store) and latent caches
(no value pages) keep the torch path. Tests run it on the CPU through Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kernel(
    key_ptr,
    value_ptr,
    key_pages_ptr,
    value_pages_ptr,
    slots_ptr,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_kslot,
    stride_kph,
    stride_vslot,
    stride_vph,
    HEADS: tl.constexpr,
    KEY_DIM: tl.constexpr,
    VALUE_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    key_mask = (h[:, None] < HEADS) & (d[None, :] < KEY_DIM)
    key = tl.load(key_ptr + row * stride_kn + h[:, None] * stride_kh + d[None, :], mask=key_mask)  # (BLOCK_H, BLOCK_D)
    tl.store(key_pages_ptr + slot * stride_kslot + h[:, None] * stride_kph + d[None, :], key, mask=key_mask)
    value_mask = (h[:, None] < HEADS) & (dv[None, :] < VALUE_DIM)
    value = tl.load(value_ptr + row * stride_vn + h[:, None] * stride_vh + dv[None, :], mask=value_mask)
    tl.store(value_pages_ptr + slot * stride_vslot + h[:, None] * stride_vph + dv[None, :], value, mask=value_mask)


def store_kv_triton(
    key_pages: torch.Tensor, value_pages: torch.Tensor, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> None:
    """``key_pages (P, bs, nkv, hd)`` and ``value_pages (P, bs, nkv, hdv)`` at flat slots ``slots (N,)`` :=
    ``key (N, nkv, hd)``, ``value (N, nkv, hdv)`` (the pages' dtype), in one launch. Pages contiguous; the rows
    may be strided views (a fused QKV projection's split) with a contiguous last dim."""
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    rows, heads, key_dim = key.shape
    value_dim = value.shape[-1]
    if rows == 0:
        return
    _store_kernel[(rows,)](
        key.detach(),
        value.detach(),
        key_pages,
        value_pages,
        slots,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_pages.stride(1),  # one slot: (P, bs) flattened, pages contiguous
        key_pages.stride(2),
        value_pages.stride(1),
        value_pages.stride(2),
        HEADS=heads,
        KEY_DIM=key_dim,
        VALUE_DIM=value_dim,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(key_dim),
        BLOCK_DV=triton.next_power_of_2(value_dim),
    )
