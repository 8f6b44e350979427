"""Gated attention (``output_gate``) and zero-centred QK-norm (``qk_norm_zero_centered``): Qwen3-Next's attention,
against the plain block written out by hand, plus conformance, declarations and the Hugging Face refusals of the
families that cannot express them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mcore.protocols.block import BlockContext
from mcore_models.blocks.attention import Attention
from mcore_models.gpt import GPTConfig
from mcore_testing.conformance.block import BlockConformance
from mcore_testing.numerics import assert_rel_close, rel_error, seeded_randn

GATED: dict[str, Any] = dict(num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, rotary_fraction=0.25)


class TestAttentionGatedZeroCentred(BlockConformance):
    dtypes = (torch.float32, torch.bfloat16)

    def make_block(self, hidden_size: int) -> Attention:
        cfg = Attention.Config(**GATED, qkv_bias=True, out_bias=True, qk_norm_zero_centered=True, output_gate=True)
        return Attention(cfg, hidden_size=hidden_size)


def _randomise(block: Attention) -> None:
    with torch.no_grad():
        for seed, (_, p) in enumerate(sorted(block.named_parameters())):
            p.copy_(seeded_randn(*p.shape, seed=100 + seed, scale=0.3))


def test_output_gate_is_sigmoid_of_its_projection_times_each_head_output() -> None:
    gated = Attention(Attention.Config(**GATED, qkv_bias=True, output_gate=True), hidden_size=32)
    plain = Attention(Attention.Config(**GATED, qkv_bias=True), hidden_size=32)
    _randomise(gated)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gate.")})
    plain.out = torch.nn.Identity()  # type: ignore[assignment]  # the heads' output before the projection
    x = seeded_randn(2, 7, 32, seed=1)
    assert gated.gate is not None
    heads = plain(x, BlockContext())  # (B, T, nh*hd)
    expected = gated.out(heads * torch.sigmoid(x @ gated.gate.weight.T + gated.gate.bias))
    out = gated(x, BlockContext())
    assert rel_error(out, expected) < 1e-6
    assert gated.gate.weight.shape == (32, 32) and gated.gate.bias is not None  # q-sized, with the q/k/v bias
    assert gated.fused_groups() == [(gated.q, gated.k, gated.v, gated.gate)]


def test_zero_centred_qk_norm_equals_the_plain_norm_with_one_added() -> None:
    centred = Attention(Attention.Config(**GATED, qk_norm_zero_centered=True), hidden_size=32)
    plain = Attention(Attention.Config(**GATED), hidden_size=32)
    _randomise(centred)
    state = centred.state_dict()
    state = {k: v + 1.0 if k.endswith("_norm.weight") else v for k, v in state.items()}
    plain.load_state_dict(state)
    x = seeded_randn(2, 7, 32, seed=2)
    assert_rel_close(centred(x, BlockContext()), plain(x, BlockContext()), tol=1e-6)
    fresh = Attention(Attention.Config(**GATED, qk_norm_zero_centered=True), hidden_size=32)
    assert torch.equal(fresh.q_norm.get_parameter("weight"), torch.zeros(8))  # gamma - 1 starts at 0


def test_gate_declared_like_q_and_counted() -> None:
    block = Attention(Attention.Config(**GATED, output_gate=True, qkv_bias=True), hidden_size=32)
    specs = block.param_specs()
    assert specs["gate.weight"].tp == "column" and specs["gate.weight"].head_rows == 8
    assert specs["gate.bias"].tp == "column"
    gate_init, q_init = specs["gate.weight"].init, specs["q.weight"].init
    assert gate_init is not None and q_init is not None and gate_init.std == q_init.std
    from mcore.protocols.block import FlopsShape

    plain = Attention(Attention.Config(**GATED, qkv_bias=True), hidden_size=32)
    shape = FlopsShape(tokens=10, attended=55)
    assert block.flops(shape) - plain.flops(shape) == 2 * 10 * 32 * 32


@pytest.mark.parametrize("key", ["output_gate", "qk_norm_zero_centered"])
def test_llama_like_families_refuse_the_new_keys(key: str) -> None:
    from mcore_models import hf, hf_moe

    attention: dict[str, Any] = dict(num_heads=4, **{key: True})
    llama = GPTConfig(hidden_size=32, num_layers=1, blocks={"attention": Attention.Config(**attention)})
    if key == "output_gate":
        with pytest.raises(ValueError, match=r"attention\.output_gate = true \(needs false"):
            hf.config_to_hf(llama)
    qwen = GPTConfig(
        hidden_size=32,
        num_layers=1,
        hf_model_type="qwen3_moe",
        blocks={"attention": Attention.Config(**attention, qk_norm=True, norm_eps=1e-6), "rmsnorm": {"norm_eps": 1e-6}},
    )
    with pytest.raises(ValueError, match=rf"attention\.{key} = true \(needs false"):
        hf_moe.config_to_hf(qwen)
