"""A tiny causal language model that uses the inference cache the way mcore's attention blocks do.

It keeps the engine's tests independent of the models plugin: each layer appends its keys/values to
``ctx.kv_cache`` and hands ``q`` to ``ctx.attention`` under a cache, and runs plain causal SDPA over the whole
row without one, so ``forward(tokens)`` is the full-sequence reference the engine must reproduce.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from mcore.protocols import LOGIT_ROWS, AttentionCacheSpec, BlockContext


class ToyAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, window: int | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.window = heads, kv_heads, hidden // heads, window
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.kv = nn.Linear(hidden, 2 * kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def cache_spec(self) -> AttentionCacheSpec:
        return AttentionCacheSpec(
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            value_dim=self.head_dim,
            dtype=torch.float32,
            window=self.window,
        )

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.head_dim).unbind(2)
        scale = self.head_dim**-0.5
        if ctx.kv_cache is not None:
            ctx.kv_cache.append(ctx.layer_index, k.flatten(0, 1), v.flatten(0, 1))
            assert ctx.attention is not None
            out = ctx.attention(q, k, v, ctx=ctx, scale=scale, window=self.window)
        else:
            group = self.heads // self.kv_heads
            qt, kt, vt = (z.transpose(1, 2) for z in (q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)))
            pos = torch.arange(t, device=x.device)
            mask = pos[None, :] <= pos[:, None]
            if self.window is not None:
                mask &= pos[:, None] - pos[None, :] < self.window
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2)
        return self.out(out.reshape(b, t, -1))


class ToyLayer(nn.Module):
    def __init__(self, hidden: int, window: int | None) -> None:
        super().__init__()
        self.attention = ToyAttention(hidden, heads=4, kv_heads=2, window=window)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        x = x + self.attention(x, ctx)
        return x + self.mlp(x)


class ToyLM(nn.Module):
    """``forward(tokens (B, T), ctx=None)`` -> logits ``(B, T, V)``, or ``(1, R, V)`` with ``LOGIT_ROWS``."""

    def __init__(
        self, vocab: int = 50, hidden: int = 32, layers: int = 2, max_len: int = 128, window: int | None = None
    ):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=max_len)  # what the engine reads
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_len, hidden)
        self.layers = nn.ModuleList(ToyLayer(hidden, window if i % 2 else None) for i in range(layers))
        self.head = nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, tokens: torch.Tensor, *, ctx: BlockContext | None = None) -> torch.Tensor:
        ctx = ctx if ctx is not None else BlockContext()
        positions = (
            ctx.positions if ctx.positions is not None else torch.arange(tokens.shape[1], device=tokens.device)[None]
        )
        x = self.embed(tokens) + self.pos(positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx.for_layer(i))
        if LOGIT_ROWS in ctx.extra:
            x = x.flatten(0, 1)[ctx.extra[LOGIT_ROWS]][None]
        return self.head(x)


def greedy_reference(model: nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """Token-by-token argmax of the full-sequence forward."""
    ids = list(prompt)
    device = next(model.parameters()).device  # a CUDA model reads CUDA token ids
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids], device=device))[0, -1].argmax()))
    return ids[len(prompt) :]
