"""The ``paged`` attention backend: attention of a step's new tokens over the inference cache's pages, in torch.

Shape legend: B rows, T new tokens per row (the engine packs one row: ``N = B * T``), nh query heads, nkv
key/value heads, hd key dim, hdv value dim, S sequences of the step, L a sequence's cached length, P blocks,
bs block size.

Under a cache (``BlockContext.kv_cache``) a block has already appended the step's keys and values, so this
backend ignores the ``k`` and ``v`` it is handed (bar ``v``'s last dim, the value width a latent cache reads
from its keys) and reads the layer's pages (``gather``): the step's query ``j`` of sequence ``i`` (``c_i`` new
tokens) sits at position ``seq_lens[i] - c_i + j`` and sees the keys up to it, at most ``window`` back. It is
what attention blocks fall back to when the context brings no backend of the engine's; the training backends
(``sdpa``, ``flex``, ``auto``) decline calls under a cache (their mask assumes the keys they are handed are the
whole row), so they can never be used there. One SDPA per sequence, a host read of the lengths per layer:
a reference, not a kernel (the engine brings its own).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from mcore.errors import UserError
from mcore.protocols.block import BlockContext


def step_bounds(ctx: BlockContext, batch: int, seq: int) -> torch.Tensor:
    """``(S + 1,)`` int64 offsets of the step's sequences in the flattened ``B * T`` tokens: ``ctx.cu_seqlens``,
    else one sequence per row."""
    if ctx.cu_seqlens is not None:
        return ctx.cu_seqlens.long()
    return torch.arange(0, batch * seq + 1, seq)


def step_positions(seq_lens: torch.Tensor, bounds: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``(B, T)`` int64 position of each new token in its whole sequence: ``seq_lens[i] - c_i + j`` for the
    ``j``-th of the ``c_i`` new tokens of sequence ``i`` (``seq_lens`` counts this step's tokens)."""
    bounds = bounds.to(seq_lens.device)
    flat = torch.arange(batch * seq, device=seq_lens.device)  # (N,)
    docs = torch.searchsorted(bounds[1:].contiguous(), flat, right=True)  # (N,) sequence of each token
    start = seq_lens.long() - (bounds[1:] - bounds[:-1])  # (S,) position of each sequence's first new token
    return (start[docs] + flat - bounds[docs]).view(batch, seq)


class PagedBackend:
    """``__call__(q (B, T, nh, hd), k, v (B, T, nkv, hdv), *, ctx, scale, window) -> (B, T, nh, hdv)`` over
    ``ctx.kv_cache``'s pages of layer ``ctx.layer_index``."""

    name: ClassVar[str] = "paged"

    def supports(self, q: torch.Tensor, ctx: BlockContext, window: int | None) -> bool:
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
        if ctx.kv_cache is None:
            raise UserError("paged attention needs BlockContext.kv_cache (the inference engine's cache); got none")
        batch, seq, heads, _ = q.shape
        paged = ctx.kv_cache.gather(ctx.layer_index)
        bounds = step_bounds(ctx, batch, seq).tolist()
        lengths = paged.seq_lens.tolist()
        if len(bounds) - 1 != len(lengths) or bounds[-1] != batch * seq:
            raise UserError(
                f"paged attention of layer {ctx.layer_index}: the call has {len(bounds) - 1} sequences over "
                f"{bounds[-1]} tokens (cu_seqlens), the cache's step {len(lengths)} sequences for {batch * seq} "
                "queries; schedule the step's sequences in cu_seqlens order"
            )
        keys_all, values_all = paged.key_cache, paged.value_cache  # (P, bs, nkv, hd|hdv)
        block_size, value_dim = keys_all.shape[1], v.shape[-1]
        flat_q = q.reshape(batch * seq, heads, -1)  # (N, nh, hd)
        outs = []
        for i, length in enumerate(lengths):
            new = bounds[i + 1] - bounds[i]
            if new > length:
                raise UserError(
                    f"paged attention of layer {ctx.layer_index}: sequence {i} brings {new} new tokens but the cache "
                    f"holds {length}; a block appends the step's keys before it attends"
                )
            blocks = paged.block_table[i, : -(-length // block_size)].long()  # (ceil(L / bs),)
            pages = blocks.clamp(min=0)  # a freed block (-1) lies outside the window: read, then masked
            keys = keys_all[pages].flatten(0, 1)[:length]  # (L, nkv, hd)
            values = keys[..., :value_dim] if values_all is None else values_all[pages].flatten(0, 1)[:length]
            key_pos = torch.arange(length, device=q.device)
            query_pos = key_pos[length - new :, None]  # (c, 1)
            allowed = (key_pos[None] <= query_pos) & (blocks >= 0).repeat_interleave(block_size)[None, :length]
            if window is not None:
                allowed = allowed & (query_pos - key_pos[None] < window)  # (c, L)
            qi = flat_q[bounds[i] : bounds[i + 1]].transpose(0, 1)  # (nh, c, hd)
            out = F.scaled_dot_product_attention(
                qi,
                keys.transpose(0, 1).to(q.dtype),  # (nkv, L, hd)
                values.transpose(0, 1).to(q.dtype),  # (nkv, L, hdv)
                attn_mask=allowed,
                scale=scale,
                enable_gqa=heads != keys.shape[1],
            )  # (nh, c, hdv)
            outs.append(out.transpose(0, 1))
        return torch.cat(outs).view(batch, seq, heads, value_dim)  # (B, T, nh, hdv)
