"""``paged_attention_reference`` (the paged attention oracle) against dense attention over the keys as appended.

The oracle reads pages; this test keeps each sequence's keys and values in plain tensors as it appends them
and computes each query's attention densely (causal offset, window, GQA groups), so the oracle is checked
against the contract without any paging of its own.
"""

from __future__ import annotations

import pytest
import torch

from mcore.protocols.block import AttentionCacheSpec, BlockContext, PagedKV
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference_kv import ReferenceKVCache
from mcore_testing.reference_paged import ReferencePagedBackend, paged_attention_reference


def dense(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """``q (c, nh, hd)``, the last ``c`` of a sequence's ``L`` tokens, over ``keys (L, nkv, hd)``."""
    new, length, group = q.shape[0], keys.shape[0], q.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)  # (L, nh, hd|hdv)
    scores = torch.einsum("chd,lhd->hcl", q, k) * scale  # (nh, c, L)
    query_pos = torch.arange(length - new, length)[:, None]
    key_pos = torch.arange(length)[None]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= query_pos - key_pos < window
    return torch.einsum("hcl,lhd->chd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


@pytest.mark.parametrize(("kv_heads", "latent", "window"), [(2, False, None), (1, False, 3), (1, True, None)])
def test_oracle_equals_dense_attention_over_the_appended_keys(kv_heads: int, latent: bool, window: int | None) -> None:
    heads, head_dim, value_dim = 4, 8, 5
    spec = AttentionCacheSpec(
        kv_heads=kv_heads,
        head_dim=head_dim,
        value_dim=None if latent else value_dim,
        dtype=torch.float64,
        window=window,
    )
    cache = ReferenceKVCache({0: spec}, block_size=4, num_blocks=16)
    gen = torch.Generator().manual_seed(kv_heads + 7 * (window or 0))
    stored: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {0: ([], []), 1: ([], [])}
    for ids, counts in [([0, 1], [6, 2]), ([1, 0], [5, 1]), ([0, 1], [1, 3])]:
        cache.schedule(ids, counts)
        n = sum(counts)
        key = torch.randn(n, kv_heads, head_dim, generator=gen, dtype=torch.float64)
        value = (
            key[..., :value_dim] if latent else torch.randn(n, kv_heads, value_dim, generator=gen, dtype=torch.float64)
        )
        cache.append(0, key, None if latent else value)
        q = torch.randn(n, heads, head_dim, generator=gen, dtype=torch.float64)
        cu = torch.tensor([0, counts[0], n], dtype=torch.int32)
        out = paged_attention_reference(q, cache.gather(0), cu, scale=0.5, window=window, value_dim=value_dim)
        for i, seq in enumerate(ids):
            rows = slice(int(cu[i]), int(cu[i + 1]))
            stored[seq][0].append(key[rows])
            stored[seq][1].append(value[rows])
            keys, values = torch.cat(stored[seq][0]), torch.cat(stored[seq][1])
            assert_rel_close(out[rows], dense(q[rows], keys, values, 0.5, window), 1e-12)
        backend = ReferencePagedBackend()  # the same through the AttentionBackend call of a block
        via = backend(
            q[None], key[None], value[None], ctx=BlockContext(cu_seqlens=cu, kv_cache=cache), scale=0.5, window=window
        )
        assert_rel_close(via[0], out, 1e-12)
        assert backend.calls == 1


def test_oracle_refuses_to_read_a_freed_block_a_query_needs() -> None:
    keys = torch.randn(2, 4, 1, 8)  # (P, bs, nkv, hd)
    paged = PagedKV(
        key_cache=keys,
        value_cache=keys,
        block_table=torch.tensor([[-1, 1]], dtype=torch.int32),
        seq_lens=torch.tensor([6], dtype=torch.int32),
    )
    q, cu = torch.randn(1, 2, 8), torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(AssertionError, match="freed block"):
        paged_attention_reference(q, paged, cu, scale=1.0)
    out = paged_attention_reference(q, paged, cu, scale=1.0, window=2)  # keys 4 and 5 only: block 1
    assert out.shape == (1, 2, 8) and torch.isfinite(out).all()
