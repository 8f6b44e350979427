"""An oracle for paged attention: each query's softmax over its sequence's cached keys, read token by token.

It exists so that every paged attention kernel (the models plugin's default torch backend, an inference
engine's backend and its Triton kernels) is checked against the same few lines that follow the contract of
``mcore.protocols.block.KVCacheHandle`` literally: the step's query ``j`` of sequence ``i`` (``c_i`` new
tokens, ``cu_seqlens`` over the step's ``N`` tokens) sits at position ``p = seq_lens[i] - c_i + j`` and sees
the cached keys at positions ``s <= p`` with ``p - s < window``; token ``s`` lies in block
``block_table[i, s // bs]`` at offset ``s % bs``. A latent cache (no values) reads values as the first
``hdv`` channels of the keys. Computed in fp64, nothing fast: keep inputs small.

Shape legend: N new tokens of the step, nh query heads, nkv key/value heads, hd key dim, hdv value dim,
S sequences of the step.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mcore.protocols.block import BlockContext, PagedKV


def paged_attention_reference(
    q: torch.Tensor,
    paged: PagedKV,
    cu_seqlens: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    value_dim: int | None = None,
) -> torch.Tensor:
    """``q (N, nh, hd)`` against ``paged``'s pages -> ``(N, nh, hdv)`` in ``q``'s dtype.

    ``value_dim``: ``hdv`` of a latent cache (``paged.value_cache`` ``None``); a value cache gives its own. A key the
    query must see that lies in a freed block (``-1``) fails an assertion: the cache dropped a live token.
    """
    key_cache, value_cache = paged.key_cache, paged.value_cache
    if value_cache is not None:
        value_dim = value_cache.shape[-1]
    assert value_dim is not None, "a latent cache (no values) needs value_dim"
    bounds = [int(b) for b in cu_seqlens]
    assert len(bounds) - 1 == paged.seq_lens.numel(), "cu_seqlens and seq_lens disagree on the sequences"
    assert bounds[-1] == q.shape[0], "cu_seqlens must cover the step's queries"
    block_size = key_cache.shape[1]
    heads, kv_heads = q.shape[1], key_cache.shape[2]
    out = torch.zeros(q.shape[0], heads, value_dim, dtype=q.dtype, device=q.device)
    for i in range(len(bounds) - 1):
        new, length = bounds[i + 1] - bounds[i], int(paged.seq_lens[i])
        for j in range(new):
            row, pos = bounds[i] + j, length - new + j
            keys, values = [], []
            for s in range(pos + 1):
                if window is not None and pos - s >= window:
                    continue
                block = int(paged.block_table[i, s // block_size])
                assert block >= 0, f"sequence {i}: key {s} seen by query {pos} lies in a freed block"
                key = key_cache[block, s % block_size].double()  # (nkv, hd)
                keys.append(key)
                values.append(key[:, :value_dim] if value_cache is None else value_cache[block, s % block_size])
            k = torch.stack(keys).repeat_interleave(heads // kv_heads, dim=1)  # (n, nh, hd)
            v = torch.stack(values).double().repeat_interleave(heads // kv_heads, dim=1)  # (n, nh, hdv)
            scores = torch.einsum("hd,nhd->hn", q[row].double(), k) * scale  # (nh, n)
            out[row] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


class ReferencePagedBackend:
    """An ``AttentionBackend`` over ``ctx.kv_cache`` that calls ``paged_attention_reference``: hand it to a
    model as ``BlockContext.attention`` under a cache to run the model on the oracle. ``calls`` counts calls."""

    name: ClassVar[str] = "reference-paged"

    def __init__(self) -> None:
        self.calls = 0

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
        """``q (B, T, nh, hd)`` (the step's new tokens; ``k``, ``v`` only give ``hdv``) -> ``(B, T, nh, hdv)``."""
        assert ctx.kv_cache is not None, "the reference paged backend reads ctx.kv_cache"
        self.calls += 1
        batch, seq = q.shape[:2]
        cu = ctx.cu_seqlens
        if cu is None:  # one sequence per row
            cu = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32)
        paged = ctx.kv_cache.gather(ctx.layer_index)
        out = paged_attention_reference(
            q.reshape(batch * seq, *q.shape[2:]), paged, cu, scale=scale, window=window, value_dim=v.shape[-1]
        )
        return out.view(batch, seq, *out.shape[1:])
