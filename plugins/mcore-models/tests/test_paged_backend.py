"""The ``paged`` attention backend against mcore_testing's paged attention oracle, on random pages.

The cache (``ReferenceKVCache``, blocks of 4 tokens) is filled over several steps in which sequences come
and go in different orders, so each sequence's blocks are scattered through the pool; the step's queries
then attend through the backend and through ``paged_attention_reference`` (a softmax per query over the
keys read token by token): GQA groups, block boundaries, sliding windows (blocks freed) and latent caches.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from mcore.errors import UserError
from mcore.protocols.block import AttentionCacheSpec, BlockContext
from mcore_models.attention_backends.paged import PagedBackend, step_positions
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference_kv import ReferenceKVCache
from mcore_testing.reference_paged import paged_attention_reference

# (sequence ids, new tokens) of each step: sequences interleave, cross block boundaries, prefill and decode
STEPS = [([0, 1], [5, 3]), ([1, 2, 0], [1, 9, 2]), ([2, 0, 1], [1, 1, 4]), ([0, 2], [3, 1])]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is as fast, and threads spinning on a shared CPU are much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spec(heads: int, kv_heads: int, latent: bool, window: int | None) -> AttentionCacheSpec:
    if latent:
        return AttentionCacheSpec(kv_heads=1, head_dim=10, value_dim=None, dtype=torch.float32, window=window)
    return AttentionCacheSpec(kv_heads=kv_heads, head_dim=8, value_dim=6, dtype=torch.float32, window=window)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "latent", "window"),
    [
        (4, 2, False, None),
        (4, 4, False, None),
        (6, 1, False, None),
        (4, 2, False, 3),
        (4, 1, True, None),
        (4, 1, True, 6),
    ],
)
def test_paged_backend_equals_the_oracle(heads: int, kv_heads: int, latent: bool, window: int | None) -> None:
    layer_spec = spec(heads, kv_heads, latent, window)
    cache = ReferenceKVCache({3: layer_spec}, block_size=4, num_blocks=32)
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads + (window or 0))
    value_dim = 6
    for ids, counts in STEPS:
        cache.schedule(ids, counts)
        n = sum(counts)
        key = torch.randn(n, layer_spec.kv_heads, layer_spec.head_dim, generator=gen)
        value = None if latent else torch.randn(n, kv_heads, value_dim, generator=gen)
        cache.append(3, key, value)
        q = torch.randn(1, n, heads, layer_spec.head_dim, generator=gen)
        v = key[None, :, :, :value_dim] if latent else value[None]  # type: ignore[index]
        cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
        ctx = BlockContext(cu_seqlens=cu, kv_cache=cache, layer_index=3)
        out = PagedBackend()(q, key[None], v, ctx=ctx, scale=0.3, window=window)
        ref = paged_attention_reference(q[0], cache.gather(3), cu, scale=0.3, window=window, value_dim=value_dim)
        assert out.shape == (1, n, heads, value_dim)
        assert_rel_close(out[0], ref, 1e-5)


def test_step_positions_continue_each_sequence() -> None:
    seq_lens = torch.tensor([7, 1, 12], dtype=torch.int32)  # after this step's 2, 1 and 3 tokens
    bounds = torch.tensor([0, 2, 3, 6])
    assert step_positions(seq_lens, bounds, 1, 6).tolist() == [[5, 6, 0, 9, 10, 11]]


def test_paged_backend_refuses_a_step_the_cache_did_not_schedule() -> None:
    cache = ReferenceKVCache({0: spec(2, 2, False, None)}, block_size=4)
    cache.schedule([0], [3])
    cache.append(0, torch.zeros(3, 2, 8), torch.zeros(3, 2, 6))
    q = torch.zeros(1, 4, 2, 8)
    ctx = BlockContext(cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), kv_cache=cache)
    with pytest.raises(UserError, match="appends the step's keys"):  # 4 queries, 3 tokens appended
        PagedBackend()(q, q, q[..., :6], ctx=ctx, scale=1.0, window=None)
    two = BlockContext(cu_seqlens=torch.tensor([0, 1, 4], dtype=torch.int32), kv_cache=cache)
    with pytest.raises(UserError, match="cu_seqlens"):  # 2 sequences, the step scheduled 1
        PagedBackend()(q, q, q[..., :6], ctx=two, scale=1.0, window=None)
    with pytest.raises(UserError, match="kv_cache"):
        PagedBackend()(q, q, q, ctx=BlockContext(), scale=1.0, window=None)
