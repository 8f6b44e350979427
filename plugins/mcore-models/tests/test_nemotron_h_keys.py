"""The two block keys Nemotron-H needs: ``attention.no_rope`` (NoPE attention) and ``gelu-mlp.activation = "relu2"``
(squared ReLU), each against a plain reference (fp32 rel 1e-5), off by default, and their one-line errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mcore.protocols.block import BlockContext
from mcore_models.blocks.attention import Attention
from mcore_models.blocks.mlp import GeluMLP
from mcore_testing.numerics import assert_rel_close, seeded_randn


def _nope_reference(block: Attention, x: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention of ``x (B, T, H)`` without any rotation, in float64."""
    x64 = x.double()
    batch, seq, _ = x.shape
    hd = block.head_dim

    def heads(linear: torch.nn.Linear) -> torch.Tensor:
        return F.linear(x64, linear.weight.double()).view(batch, seq, -1, hd).transpose(1, 2)  # (B, n, T, hd)

    q, k, v = heads(block.q), heads(block.k), heads(block.v)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, nh, T, hd)
    scores = q @ k.transpose(-1, -2) / hd**0.5  # (B, nh, T, T)
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, -1)  # (B, T, nh*hd)
    return F.linear(out, block.out.weight.double())


def test_no_rope_attention_equals_plain_causal_attention() -> None:
    assert Attention.Config().no_rope is False  # off by default
    torch.manual_seed(0)
    block = Attention(Attention.Config(num_heads=4, num_kv_heads=2, no_rope=True), hidden_size=32)
    x = seeded_randn((2, 9, 32), seed=1)
    assert_rel_close(block(x, BlockContext()), _nope_reference(block, x), 1e-5)
    shifted = BlockContext(positions=torch.arange(9).expand(2, 9) + 100)  # positions do not matter without RoPE
    assert_rel_close(block(x, shifted), _nope_reference(block, x), 1e-5)
    rope = Attention(Attention.Config(num_heads=4, num_kv_heads=2), hidden_size=32)
    rope.load_state_dict(block.state_dict())
    assert not torch.allclose(rope(x, BlockContext()), block(x, BlockContext()))  # the default rotates


def test_relu2_mlp_equals_squared_relu() -> None:
    assert GeluMLP.Config().activation == "gelu"  # off by default
    torch.manual_seed(0)
    block = GeluMLP(GeluMLP.Config(ffn_hidden_size=24, mlp_bias=True, activation="relu2"), hidden_size=16)
    x = seeded_randn((2, 5, 16), seed=1)
    want = block.down(torch.relu(block.up(x)) ** 2)
    assert_rel_close(block(x), want, 1e-5)
    gelu = GeluMLP(GeluMLP.Config(ffn_hidden_size=24, mlp_bias=True), hidden_size=16)
    gelu.load_state_dict(block.state_dict())
    assert_rel_close(gelu(x), gelu.down(F.gelu(gelu.up(x))), 1e-5)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"activation": "swish"}, "activation = 'swish': allowed: gelu, relu2"),
        ({"activation": "relu2", "gelu_approximate": "tanh"}, "gelu_approximate = 'tanh' with activation = 'relu2'"),
    ],
)
def test_relu2_mlp_errors(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        GeluMLP.Config(**values)
    assert "\n" not in str(info.value)
