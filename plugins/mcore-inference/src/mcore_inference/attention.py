"""The engine's paged attention backend: a step's queries against every sequence's cached pages.

Why it exists: under the engine's cache an attention block appends its new keys/values and hands ``q`` to
``ctx.attention``; this backend reads the layer's pages (``ctx.kv_cache.gather``) and attends. The torch path
here is the reference and the CPU path, batched over the step's sequences: gather each sequence's pages into a
padded ``(S, K)`` key row, scatter the packed queries into ``(S, C)`` rows and run one masked SDPA. On CUDA,
opted in with ``MCORE_INFERENCE_PREFILL=triton``, steps with prefill take the Triton varlen kernel of
``triton_prefill.py`` instead (it reads the pages in place; GQA caches, FP8 or not); a custom ``kernel`` replaces
both.

A step whose every sequence brings one token (``max_seqlen == 1``: decode) takes the decode path: one query per
sequence against its pages, masked by the lengths, with static shapes and no host sync (what a CUDA graph
captures, ``static_decode.py``). ``paged_decode_torch`` is its reference and CPU path; on CUDA the Triton
kernel of ``triton_decode.py`` (GQA, split-K over long contexts) serves it when triton imports.

A step whose every sequence brings the same ``q`` tokens and says so (``ctx.extra[QUERIES_PER_SEQUENCE] = q``: the
static verification and draft steps of speculative decoding, ``static_speculative.py``) takes the decode path too:
query ``j`` of sequence ``i`` is a decode query over the same pages with length ``L_i - q + 1 + j``
(``expand_queries``), so the causal mask among the step's tokens is the decode kernels' length mask, and the call
keeps static shapes and no host sync. It reads each sequence's pages ``q`` times (a fused multi-query decode kernel
would read them once).

FP8 pages (``kv_quant.py``): when the cache has ``kv_scales`` for the layer, a decode step takes the built-in
decode kernel of the device with the per-head scales (on CUDA the Triton kernel, which dequantises in registers,
when opted in with ``MCORE_INFERENCE_FP8_DECODE=triton``; otherwise ``paged_decode_torch``) and a step with prefill
the torch path, which dequantises the gathered pages (times the scales) before attending, or on CUDA, opted in with
``MCORE_INFERENCE_PREFILL=triton``, the Triton prefill kernel, which dequantises in registers. A latent (MLA) cache
prefills through the torch path, FP8 or not, and decodes through it too unless, on CUDA, opted in with
``MCORE_INFERENCE_MLA_DECODE=triton`` (the absorbed MLA decode kernel of ``triton_mla_decode.py``). A custom ``kernel`` or ``decode_kernel`` reads pages in
the model's dtype only: it is refused over FP8 pages.

Masking (``mcore.protocols.block.KVCacheHandle``): query ``j`` of sequence ``i`` (``c_i`` new tokens, ``L_i``
cached once appended) sits at position ``L_i - c_i + j`` and sees key ``s`` when ``s <= L_i - c_i + j`` and,
with a window ``w``, ``L_i - c_i + j - s < w``. A latent cache (MLA) has no value pages: values are the first
``hdv`` channels of the keys.

Shape legend: N new tokens of the step, S sequences, C most new tokens of one sequence, K = M * bs key slots
of the longest table (of ``max_model_len`` in a static decode step), nh query heads, nkv key/value heads, hd key dim, hdv value dim.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

from mcore.errors import UserError
from mcore.protocols.block import BlockContext, PagedKV
from mcore_inference.kv_quant import dequantize, take_pages

#: A paged attention implementation: ``(q (N, nh, hd), paged, cu_seqlens (S+1,), max_seqlen, hdv, scale, window)``
#: -> ``(N, nh, hdv)``; ``max_seqlen`` is the most new tokens of one sequence (a host int: no device sync).
PagedKernel = Callable[[torch.Tensor, PagedKV, torch.Tensor, int, int, float, int | None], torch.Tensor]


def paged_attention_torch(
    q: torch.Tensor,
    paged: PagedKV,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    value_dim: int,
    scale: float,
    window: int | None,
    *,
    key_scale: torch.Tensor | None = None,
    value_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The torch reference: ``q (N, nh, hd)`` packed by ``cu_seqlens`` -> ``(N, nh, hdv)`` in ``q``'s dtype;
    FP8 pages are dequantised with ``key_scale`` / ``value_scale`` ``(nkv,)`` (``None``: a plain cast)."""
    n, nh, _ = q.shape
    table = paged.block_table.long()  # (S, M)
    seqs, blocks = table.shape
    bs, nkv = paged.key_cache.shape[1], paged.key_cache.shape[2]
    cu = cu_seqlens.to(q.device).long()
    counts = cu[1:] - cu[:-1]  # (S,)
    lens = paged.seq_lens.to(q.device).long()  # (S,)
    width = max_seqlen
    owner = torch.repeat_interleave(torch.arange(seqs, device=q.device), counts, output_size=n)  # (N,) its sequence
    row = torch.arange(n, device=q.device) - cu[owner]  # (N,) index among its sequence's new tokens
    padded_q = q.new_zeros(seqs, width, nh, q.shape[-1])
    padded_q[owner, row] = q  # (S, C, nh, hd)
    safe = table.clamp(min=0)
    keys = dequantize(take_pages(paged.key_cache, safe).flatten(1, 2), key_scale, q.dtype)  # (S, K, nkv, hd)
    if paged.value_cache is None:
        values = keys[..., :value_dim]  # latent: values are the keys' first hdv channels
    else:
        values = dequantize(take_pages(paged.value_cache, safe).flatten(1, 2), value_scale, q.dtype)  # (S, K, nkv, hdv)
    slot = torch.arange(blocks * bs, device=q.device)  # (K,)
    query_pos = (lens - counts)[:, None] + torch.arange(width, device=q.device)  # (S, C)
    see = slot[None, None, :] <= query_pos[:, :, None]  # (S, C, K) causal
    see &= slot[None, None, :] < lens[:, None, None]
    see &= (table >= 0).repeat_interleave(bs, dim=1)[:, None, :]  # freed blocks: never read
    if window is not None:
        see &= query_pos[:, :, None] - slot[None, None, :] < window
    group = nh // nkv
    k = keys.permute(0, 2, 1, 3).repeat_interleave(group, dim=1)  # (S, nh, K, hd)
    v = values.permute(0, 2, 1, 3).repeat_interleave(group, dim=1)  # (S, nh, K, hdv)
    out = F.scaled_dot_product_attention(
        padded_q.transpose(1, 2), k, v, attn_mask=see[:, None], scale=scale
    )  # (S, nh, C, hdv)
    return out.transpose(1, 2)[owner, row]  # (N, nh, hdv)


#: ``BlockContext.extra`` key: every sequence of the step brings this many new tokens (an int; static speculative
#: steps), which lets the decode kernels serve the step (``expand_queries``).
QUERIES_PER_SEQUENCE = "mcore_inference.queries_per_sequence"


def expand_queries(paged: PagedKV, queries: int) -> PagedKV:
    """``paged`` of a step of ``queries`` new tokens per sequence as a decode step of ``S * queries`` rows: row
    ``i * queries + j`` reads sequence ``i``'s table with length ``L_i - queries + 1 + j`` (its causal prefix)."""
    lens = paged.seq_lens.long()  # (S,)
    offsets = torch.arange(1 - queries, 1, device=lens.device)  # (q,)
    return replace(
        paged,
        block_table=paged.block_table.repeat_interleave(queries, dim=0),  # (S * q, M); an int count: no sync
        seq_lens=(lens[:, None] + offsets[None, :]).flatten().to(torch.int32),  # (S * q,)
    )


#: A paged decode implementation: ``(q (S, nh, hd), paged, hdv, scale, window) -> (S, nh, hdv)``, one query per
#: sequence at position ``seq_lens - 1``; static shapes, no host sync.
PagedDecodeKernel = Callable[[torch.Tensor, PagedKV, int, float, int | None], torch.Tensor]


def paged_decode_torch(
    q: torch.Tensor,
    paged: PagedKV,
    value_dim: int,
    scale: float,
    window: int | None,
    *,
    key_scale: torch.Tensor | None = None,
    value_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The torch decode reference: ``q (S, nh, hd)`` -> ``(S, nh, hdv)`` in ``q``'s dtype. Reads every block of
    the table (``-1`` entries as block 0) and masks by the lengths: no shape depends on the data. FP8 pages are
    dequantised with ``key_scale`` / ``value_scale`` ``(nkv,)``."""
    table = paged.block_table.long()  # (S, M)
    bs = paged.key_cache.shape[1]
    safe = table.clamp(min=0)
    keys = dequantize(take_pages(paged.key_cache, safe).flatten(1, 2), key_scale, q.dtype)  # (S, K, nkv, hd)
    if paged.value_cache is None:
        values = keys[..., :value_dim]  # latent: values are the keys' first hdv channels
    else:
        values = dequantize(take_pages(paged.value_cache, safe).flatten(1, 2), value_scale, q.dtype)  # (S, K, nkv, hdv)
    lens = paged.seq_lens.to(q.device).long()  # (S,)
    slot = torch.arange(keys.shape[1], device=q.device)  # (K,)
    held = (table >= 0)[:, :, None].expand(-1, -1, bs).reshape(table.shape[0], -1)  # (S, K); no sync, unlike
    see = (slot[None, :] < lens[:, None]) & held  # repeat_interleave, which may read its count on the host
    if window is not None:
        see &= lens[:, None] - 1 - slot[None, :] < window
    out = F.scaled_dot_product_attention(
        q[:, :, None],  # (S, nh, 1, hd)
        keys.transpose(1, 2),  # (S, nkv, K, hd)
        values.transpose(1, 2),  # (S, nkv, K, hdv)
        attn_mask=see[:, None, None],  # (S, 1, 1, K)
        scale=scale,
        enable_gqa=q.shape[1] != keys.shape[2],
    )  # (S, nh, 1, hdv)
    return out[:, :, 0]


class ScaledPagedKernel(Protocol):
    """A built-in paged prefill kernel: a ``PagedKernel`` that also reads FP8 pages, given the per-head
    dequantisation scales ``key_scale`` / ``value_scale`` ``(nkv,)`` fp32."""

    def __call__(
        self,
        q: torch.Tensor,
        paged: PagedKV,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        value_dim: int,
        scale: float,
        window: int | None,
        *,
        key_scale: torch.Tensor | None = None,
        value_scale: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


class ScaledPagedDecodeKernel(Protocol):
    """A built-in paged decode kernel: a ``PagedDecodeKernel`` that also reads FP8 pages, given the per-head
    dequantisation scales ``key_scale`` / ``value_scale`` ``(nkv,)`` fp32."""

    def __call__(
        self,
        q: torch.Tensor,
        paged: PagedKV,
        value_dim: int,
        scale: float,
        window: int | None,
        *,
        key_scale: torch.Tensor | None = None,
        value_scale: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


FP8_DECODE_ENV = "MCORE_INFERENCE_FP8_DECODE"
"""``MCORE_INFERENCE_FP8_DECODE=triton`` opts FP8 decode steps on CUDA into the Triton kernel. It matches the torch
FP8 path in Triton's CPU interpreter and on a card (``gpu`` tests, H200 and H100, 2026-12-06); opt-in until
``benchmarks/bench_decode.py`` has timed it on a card. Unset, FP8 pages decode through ``paged_decode_torch``."""


def fp8_decode_in_triton() -> bool:
    """Whether FP8 decode steps on CUDA take the Triton kernel (``FP8_DECODE_ENV``)."""
    return os.environ.get(FP8_DECODE_ENV, "") == "triton"


def decode_kernel_for(device: torch.device) -> ScaledPagedDecodeKernel:
    """The Triton decode kernel on CUDA when triton imports, else ``paged_decode_torch``; both read FP8 pages."""
    if device.type == "cuda":
        try:
            from mcore_inference.triton_decode import paged_decode_triton
        except ImportError:
            return paged_decode_torch
        return paged_decode_triton
    return paged_decode_torch


PREFILL_ENV = "MCORE_INFERENCE_PREFILL"
"""``MCORE_INFERENCE_PREFILL=triton`` opts steps with prefill on CUDA into the Triton varlen kernel
(``triton_prefill.py``; GQA caches, FP8 or not). It matches the torch path in Triton's
CPU interpreter and on a card (``test_triton_prefill``, H100, 2026-12-06); opt-in until it has been timed on a card.
Unset (or on the CPU, or for a latent MLA cache), prefill goes through ``paged_attention_torch``."""


def prefill_in_triton() -> bool:
    """Whether steps with prefill on CUDA take the Triton kernel (``PREFILL_ENV``)."""
    return os.environ.get(PREFILL_ENV, "") == "triton"


def prefill_kernel_for(device: torch.device) -> ScaledPagedKernel:
    """The Triton prefill kernel on CUDA when opted in (``PREFILL_ENV``) and triton imports, else
    ``paged_attention_torch``; both read FP8 pages."""
    if device.type == "cuda" and prefill_in_triton():
        try:
            from mcore_inference.triton_prefill import paged_prefill_triton
        except ImportError:
            return paged_attention_torch
        return paged_prefill_triton
    return paged_attention_torch


MLA_DECODE_ENV = "MCORE_INFERENCE_MLA_DECODE"
"""``MCORE_INFERENCE_MLA_DECODE=triton`` opts decode steps of a latent (MLA) cache on CUDA, FP8 or not, into the
absorbed MLA decode kernel (``triton_mla_decode.py``). It matches the torch path in Triton's CPU
interpreter and on a card (``test_triton_mla_decode``, H100, 2026-12-06); opt-in until it has been timed on a card.
Unset, latent caches decode through ``paged_decode_torch``."""


def latent_decode_kernel_for(device: torch.device) -> ScaledPagedDecodeKernel:
    """The Triton absorbed MLA decode kernel on CUDA when opted in (``MLA_DECODE_ENV``) and triton imports, else
    ``paged_decode_torch``; both read FP8 latent pages."""
    if device.type == "cuda" and os.environ.get(MLA_DECODE_ENV, "") == "triton":
        try:
            from mcore_inference.triton_mla_decode import paged_mla_decode_triton
        except ImportError:
            return paged_decode_torch
        return paged_mla_decode_triton
    return paged_decode_torch


class PagedAttention:
    """``AttentionBackend`` of the engine: reads the layer's pages of ``ctx.kv_cache`` (the step's keys are in
    them already). ``kernel`` serves steps with prefill (``None``: ``prefill_kernel_for`` the device, torch unless
    opted in to Triton on CUDA); ``decode_kernel`` serves pure-decode steps (``None``: chosen once per device type by
    ``decode_kernel_for``)."""

    name: ClassVar[str] = "paged"

    def __init__(self, kernel: PagedKernel | None = None, decode_kernel: PagedDecodeKernel | None = None) -> None:
        self.kernel: PagedKernel = kernel if kernel is not None else paged_attention_torch
        self._builtin_kernel = kernel is None
        self.decode_kernel = decode_kernel
        self._decode_for: dict[str, ScaledPagedDecodeKernel] = {}

    def supports(self, q: torch.Tensor, ctx: BlockContext, window: int | None) -> bool:
        """Only calls under the engine's cache (a plain call has no pages to read)."""
        return ctx.kv_cache is not None

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        ctx: BlockContext,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        """``q (1, N, nh, hd)`` (``k``, ``v``: the step's new keys/values, already appended) -> ``(1, N, nh, hdv)``."""
        if ctx.kv_cache is None:
            raise UserError("paged attention was called without ctx.kv_cache: it only serves the inference engine")
        if q.shape[0] != 1:
            raise UserError(f"paged attention takes the step's tokens packed in one row; got {q.shape[0]} rows")
        paged = ctx.kv_cache.gather(ctx.layer_index)
        cu, longest = ctx.cu_seqlens, ctx.max_seqlen
        if cu is None:
            cu, longest = torch.tensor([0, q.shape[1]], dtype=torch.int32, device=q.device), q.shape[1]
        if longest is None:
            longest = int((cu[1:] - cu[:-1]).max())
        window = window if window is not None else paged.window
        queries = ctx.extra.get(QUERIES_PER_SEQUENCE)
        if queries is not None and longest > 1:  # q tokens per sequence: a decode step of S * q rows
            if longest != queries or q.shape[1] % queries:
                raise UserError(
                    f"paged attention: {QUERIES_PER_SEQUENCE} = {queries!r} but the step has max_seqlen {longest} and "
                    f"{q.shape[1]} tokens; every sequence must bring exactly that many"
                )
            paged, longest = expand_queries(paged, queries), 1
        kv_scales = getattr(ctx.kv_cache, "kv_scales", None)
        scales = kv_scales(ctx.layer_index) if callable(kv_scales) else None
        if scales is not None:  # FP8 pages: the built-in kernels dequantise them
            if self.kernel is not paged_attention_torch or self.decode_kernel not in (None, paged_decode_torch):
                raise UserError(
                    "paged attention: the cache is FP8 (kv_cache_dtype='fp8_e4m3') and a custom kernel reads pages "
                    "in the model's dtype only; drop the kernel or use kv_cache_dtype='auto'"
                )
            key_scale, value_scale = scales
            if longest == 1:  # decode: the device's kernel (Triton on CUDA, opted in) unless torch was asked for
                builtin = self.decode_kernel is None and (q.device.type != "cuda" or fp8_decode_in_triton())
                scaled = self._builtin_decode(q.device) if builtin else paged_decode_torch
                if self.decode_kernel is None and paged.value_cache is None:  # latent: its own opt-in
                    scaled = latent_decode_kernel_for(q.device)
                out = scaled(q[0], paged, v.shape[-1], scale, window, key_scale=key_scale, value_scale=value_scale)
            else:
                prefill = self._builtin_prefill(q.device, paged) if self._builtin_kernel else paged_attention_torch
                out = prefill(
                    q[0], paged, cu, longest, v.shape[-1], scale, window, key_scale=key_scale, value_scale=value_scale
                )
            return out[None]  # (1, N, nh, hdv)
        if longest == 1:  # decode: one query per sequence
            decode = self.decode_kernel if self.decode_kernel is not None else self._builtin_decode(q.device)
            if self.decode_kernel is None and paged.value_cache is None:  # latent (MLA): its own opt-in
                decode = latent_decode_kernel_for(q.device)
            return decode(q[0], paged, v.shape[-1], scale, window)[None]  # (1, S, nh, hdv)
        kernel = self._builtin_prefill(q.device, paged) if self._builtin_kernel else self.kernel
        out = kernel(q[0], paged, cu, longest, v.shape[-1], scale, window)  # (N, nh, hdv)
        return out[None]

    @staticmethod
    def _builtin_prefill(device: torch.device, paged: PagedKV) -> ScaledPagedKernel:
        """``prefill_kernel_for(device)`` for a GQA cache; a latent (MLA) cache stays on torch."""
        if paged.value_cache is None:
            return paged_attention_torch
        return prefill_kernel_for(device)

    def _builtin_decode(self, device: torch.device) -> ScaledPagedDecodeKernel:
        """``decode_kernel_for(device)``, chosen once per device type."""
        decode = self._decode_for.get(device.type)
        if decode is None:
            decode = self._decode_for[device.type] = decode_kernel_for(device)
        return decode
