"""The engine's paged attention (torch path) equals plain causal attention over each whole sequence."""

from __future__ import annotations

import pytest
import torch
from mcore_inference.attention import PagedAttention
from mcore_inference.cache import PagedKVCache

from mcore.errors import UserError
from mcore.protocols import AttentionCacheSpec, BlockContext


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, window: int | None) -> torch.Tensor:
    """Queries at positions ``start..`` of one sequence, ``q (c, nh, hd)`` against ``k (L, nkv, hd)``."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * 0.5
    qpos = torch.arange(start, start + q.shape[0])[:, None]
    kpos = torch.arange(k.shape[0])[None]
    mask = kpos <= qpos
    if window is not None:
        mask &= qpos - kpos < window
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize(("window", "latent"), [(None, False), (5, False), (None, True)])
def test_paged_attention_matches_whole_sequence_attention(window: int | None, latent: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    nh, nkv, hd, hdv = 4, 1 if latent else 2, 6, 4
    spec = AttentionCacheSpec(
        kv_heads=nkv, head_dim=hd, value_dim=None if latent else hdv, dtype=torch.float32, window=window
    )
    cache = PagedKVCache({3: spec}, block_size=4, num_blocks=32)
    lengths = {0: 11, 1: 3, 2: 9}
    keys = {s: torch.randn(n, nkv, hd, generator=gen) for s, n in lengths.items()}
    values = {s: keys[s][..., :hdv] if latent else torch.randn(n, nkv, hdv, generator=gen) for s, n in lengths.items()}
    backend = PagedAttention()
    done = dict.fromkeys(lengths, 0)
    for chunks in ({0: 6, 1: 1, 2: 9}, {1: 2, 0: 4}, {0: 1}):  # prefill chunks, then decode
        ids, counts = list(chunks), list(chunks.values())
        cache.schedule(ids, counts)
        k = torch.cat([keys[s][done[s] : done[s] + c] for s, c in chunks.items()])
        v = torch.cat([values[s][done[s] : done[s] + c] for s, c in chunks.items()])
        cache.append(3, k, None if latent else v)
        q = torch.randn(1, sum(counts), nh, hd, generator=gen)
        cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
        ctx = BlockContext(cu_seqlens=cu, kv_cache=cache, layer_index=3)
        assert backend.supports(q, ctx, window)
        out = backend(q, k[None], v[None], ctx=ctx, scale=0.5, window=window)
        assert out.shape == (1, sum(counts), nh, hdv)
        row = 0
        for s, c in chunks.items():
            want = _reference(q[0, row : row + c], keys[s][: done[s] + c], values[s][: done[s] + c], done[s], window)
            torch.testing.assert_close(out[0, row : row + c], want, atol=1e-5, rtol=1e-5)
            done[s] += c
            row += c


def test_paged_attention_refuses_a_call_without_cache() -> None:
    backend = PagedAttention()
    q = torch.zeros(1, 2, 2, 4)
    assert not backend.supports(q, BlockContext(), None)
    with pytest.raises(UserError):
        backend(q, q, q, ctx=BlockContext(), scale=1.0, window=None)
