"""``lse_merge``: attention over key blocks merged by log-sum-exp equals attention over all keys.

Random shapes (GQA, MLA's value dim != key dim), masks that leave some query rows without any key in
a block (and some without any key at all), forward and backward in fp32 (rel 1e-5), against a plain
softmax reference; the hand-written block backward (the ring's) against autograd. On CUDA too where
there is a GPU.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mcore_parallel.lse_merge import merge, merge_with_lse, partial_attention, partial_attention_backward
from mcore_testing.numerics import assert_rel_close


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention, a row without keys gives 0: ``(B, T, nh, hdv)``."""
    group = q.shape[2] // k.shape[2]
    kf = k.repeat_interleave(group, dim=2).transpose(1, 2)  # (B, nh, S, hd)
    vf = v.repeat_interleave(group, dim=2).transpose(1, 2)  # (B, nh, S, hdv)
    scores = (q.transpose(1, 2) @ kf.transpose(-1, -2)) * scale  # (B, nh, T, S)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ vf).transpose(1, 2)


CASES = [  # (B, T, S, nh, nkv, hd, hdv, blocks)
    (2, 5, 12, 4, 4, 8, 8, 3),
    (1, 7, 9, 6, 2, 4, 4, 2),  # GQA
    (2, 4, 16, 4, 1, 12, 6, 4),  # MQA, value dim != key dim (MLA)
    (3, 3, 6, 2, 2, 5, 7, 6),  # one key per block
]


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def _inputs(case: tuple[int, ...], seed: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    b, t, s, nh, nkv, hd, hdv, _ = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, nh, hd, generator=g).to(device).requires_grad_()
    k = torch.randn(b, s, nkv, hd, generator=g).to(device).requires_grad_()
    v = torch.randn(b, s, nkv, hdv, generator=g).to(device).requires_grad_()
    mask = (torch.rand(b, t, s, generator=g) < 0.5).to(device)
    mask[:, 0] = False  # a query that sees nothing at all
    mask[0, 1, : s // 2] = False  # one that sees nothing in the first blocks
    return q, k, v, mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_blocks_merged_equal_full_attention_forward_and_backward(case: tuple[int, ...], device: str) -> None:
    q, k, v, mask = _inputs(case, seed=sum(case), device=device)
    scale = 1 / math.sqrt(q.shape[-1])
    blocks = case[-1]
    bounds = torch.linspace(0, k.shape[1], blocks + 1).round().long().tolist()
    parts = [
        partial_attention(q, k[:, a:b], v[:, a:b], scale=scale, mask=mask[..., a:b])
        for a, b in itertools.pairwise(bounds)
    ]
    assert torch.isinf(parts[0][1][:, :, 0]).all() and (parts[0][0][:, 0] == 0).all()  # fully masked: -inf, 0
    out = merge(parts)
    want = _reference(q, k, v, scale, mask)
    assert_rel_close(out, want, 1e-5, name="merged output")
    g = torch.Generator().manual_seed(7)
    grad = torch.randn(want.shape, generator=g).to(device)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(want, (q, k, v), grad)
    for name, a, b in zip("qkv", got, ref, strict=True):
        assert torch.isfinite(a).all(), name
        assert_rel_close(a, b, 1e-5, name=f"grad of {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_block_backward_equals_autograd(case: tuple[int, ...], device: str) -> None:
    """The ring's per-block backward, given the merged output and lse, sums to autograd's gradients."""
    q, k, v, mask = _inputs(case, seed=3 + sum(case), device=device)
    scale = 0.3
    s, blocks = k.shape[1], case[-1]
    bounds = torch.linspace(0, s, blocks + 1).round().long().tolist()
    spans = list(itertools.pairwise(bounds))
    parts = [partial_attention(q, k[:, a:b], v[:, a:b], scale=scale, mask=mask[..., a:b]) for a, b in spans]
    out, lse = merge_with_lse(parts)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(11)).to(device)
    ref = torch.autograd.grad(out, (q, k, v), grad)
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for a, b in spans:
        bq, bk, bv = partial_attention_backward(
            q, k[:, a:b], v[:, a:b], out.detach(), lse.detach(), grad, scale=scale, mask=mask[..., a:b]
        )
        dq += bq
        dks.append(bk)
        dvs.append(bv)
    for name, got, want in (("q", dq, ref[0]), ("k", torch.cat(dks, 1), ref[1]), ("v", torch.cat(dvs, 1), ref[2])):
        assert torch.isfinite(got).all(), name
        assert_rel_close(got, want, 1e-5, name=f"block backward {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_still_accumulates_in_fp32(device: str) -> None:
    """Under a bf16 recipe's autocast the reference multiplies in fp32: the same result as without it."""
    q, k, v, mask = _inputs(CASES[1], seed=5, device=device)
    plain, plain_lse = partial_attention(q, k, v, scale=0.5, mask=mask)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        cast, cast_lse = partial_attention(q, k, v, scale=0.5, mask=mask)
    assert cast.dtype == torch.float32
    assert torch.equal(cast, plain) and torch.equal(cast_lse, plain_lse)
