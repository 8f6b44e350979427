"""Every registered block through the shared conformance suite, plus block-specific checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcore.protocols.block import BlockContext
from mcore_models.blocks.attention import Attention
from mcore_models.blocks.masking import attention_mask
from mcore_models.blocks.mla import MLA
from mcore_models.blocks.mlp import ClampedSwiGLU, GeluMLP, SwiGLU
from mcore_models.blocks.mtp import MTP, NEXT_EMBEDDINGS
from mcore_models.blocks.norms import LayerNorm, RMSNorm
from mcore_testing.conformance.block import BlockConformance
from mcore_testing.numerics import assert_rel_close, seeded_randn


class TestRMSNorm(BlockConformance):
    dtypes = (torch.float32, torch.bfloat16)

    def make_block(self, hidden_size: int) -> RMSNorm:
        return RMSNorm(RMSNorm.Config(norm_eps=1e-6), hidden_size=hidden_size)


class TestLayerNormZeroCentred(BlockConformance):
    def make_block(self, hidden_size: int) -> LayerNorm:
        return LayerNorm(LayerNorm.Config(zero_centered_gamma=True), hidden_size=hidden_size)


class TestAttentionGQA(BlockConformance):
    dtypes = (torch.float32, torch.bfloat16)

    def make_block(self, hidden_size: int) -> Attention:
        return Attention(Attention.Config(num_heads=4, num_kv_heads=2), hidden_size=hidden_size)


class TestAttentionAllOptions(BlockConformance):
    """MQA, QK-norm, biases, sliding window, partial rotary with YaRN."""

    def make_block(self, hidden_size: int) -> Attention:
        cfg = Attention.Config(
            num_heads=4,
            num_kv_heads=1,
            head_dim=16,
            qk_norm=True,
            qkv_bias=True,
            out_bias=True,
            sliding_window=3,
            rotary_fraction=0.5,
            rope_scaling="yarn",
            rope_factor=4.0,
            rope_original_max_positions=64,
        )
        return Attention(cfg, hidden_size=hidden_size)


class TestMLA(BlockConformance):
    def make_block(self, hidden_size: int) -> MLA:
        cfg = MLA.Config(
            num_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6
        )
        return MLA(cfg, hidden_size=hidden_size)


class TestSwiGLU(BlockConformance):
    dtypes = (torch.float32, torch.bfloat16)

    def make_block(self, hidden_size: int) -> SwiGLU:
        return SwiGLU(SwiGLU.Config(ffn_hidden_size=48), hidden_size=hidden_size)


class TestClampedSwiGLU(BlockConformance):
    def make_block(self, hidden_size: int) -> ClampedSwiGLU:
        return ClampedSwiGLU(ClampedSwiGLU.Config(ffn_hidden_size=48, clamp_limit=0.05), hidden_size=hidden_size)


class TestGeluMLP(BlockConformance):
    def make_block(self, hidden_size: int) -> GeluMLP:
        return GeluMLP(GeluMLP.Config(ffn_hidden_size=48, mlp_bias=True), hidden_size=hidden_size)


class TestMTP(BlockConformance):
    def make_block(self, hidden_size: int) -> MTP:
        from mcore_models.gpt import TransformerLayer

        layer = TransformerLayer(
            Attention(Attention.Config(num_heads=4), hidden_size=hidden_size),
            SwiGLU(SwiGLU.Config(ffn_hidden_size=48), hidden_size=hidden_size),
            RMSNorm(hidden_size=hidden_size),
            RMSNorm(hidden_size=hidden_size),
        )
        return MTP(hidden_size=hidden_size, layer=layer)

    def _ctx(self, B: int, T: int, cu: list[int] | None = None) -> BlockContext:
        ctx = super()._ctx(B, T, cu)
        return ctx.for_layer(ctx.layer_index, extra={NEXT_EMBEDDINGS: seeded_randn(B, T, self.hidden_size, seed=11)})


def test_clamped_swiglu_formula() -> None:
    block = ClampedSwiGLU(ClampedSwiGLU.Config(ffn_hidden_size=8, clamp_limit=0.3), hidden_size=4)
    x = seeded_randn(2, 3, 4, seed=0) * 10
    gate, up = block.gate(x), block.up(x)
    expected = block.down(F.silu(torch.minimum(gate, torch.tensor(0.3))) * up.clamp(-0.3, 0.3))
    assert_rel_close(block(x, BlockContext()), expected)


def test_sliding_window_mask_matches_explicit_loop() -> None:
    mask = attention_mask(1, 6, torch.device("cpu"), cu_seqlens=torch.tensor([0, 4, 6], dtype=torch.int32), window=2)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    doc = [0, 0, 0, 0, 1, 1]
    for i in range(6):
        for j in range(6):
            expected[i, j] = j <= i and i - j < 2 and doc[i] == doc[j]
    assert torch.equal(mask[0, 0], expected)


def test_attention_matches_explicit_softmax() -> None:
    """GQA + QK-norm + window against attention written out by hand."""
    torch.manual_seed(0)
    cfg = Attention.Config(num_heads=4, num_kv_heads=2, qk_norm=True, sliding_window=3)
    block = Attention(cfg, hidden_size=32)
    x = seeded_randn(2, 7, 32, seed=1)
    out = block(x, BlockContext())
    q, k, v = block.q(x), block.k(x), block.v(x)
    q = block.q_norm(q.view(2, 7, 4, 8))
    k = block.k_norm(k.view(2, 7, 2, 8))
    cos, sin = block.rotary(torch.arange(7).expand(2, 7))
    from mcore_models.kernels.rope import apply_rope_reference

    q, k = apply_rope_reference(q, k, cos, sin)
    k = k.repeat_interleave(2, dim=2)
    v = v.view(2, 7, 2, 8).repeat_interleave(2, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5
    i, j = torch.arange(7)[:, None], torch.arange(7)[None, :]
    scores = scores.masked_fill(~((j <= i) & (i - j < 3)), float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(2, 7, 32)
    assert_rel_close(out, block.out(ref))


def test_packed_positions_restart_per_document() -> None:
    """A document packed after another gives the same output as the document alone."""
    block = Attention(Attention.Config(num_heads=4, num_kv_heads=2), hidden_size=32)
    doc_a, doc_b = seeded_randn(1, 5, 32, seed=2), seeded_randn(1, 6, 32, seed=3)
    packed = torch.cat([doc_a, doc_b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(6)])[None]
    ctx = BlockContext(positions=positions, cu_seqlens=torch.tensor([0, 5, 11], dtype=torch.int32), max_seqlen=6)
    out = block(packed, ctx)
    assert_rel_close(out[:, 5:], block(doc_b, BlockContext()))
    assert_rel_close(out[:, :5], block(doc_a, BlockContext()))


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_mla_absorbed_decode_equals_plain_form(q_lora_rank: int | None) -> None:
    cfg = MLA.Config(
        num_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6
    )
    block = MLA(cfg, hidden_size=32).double()
    x = seeded_randn(2, 9, 32, seed=4, dtype=torch.float64)
    plain = block(x, BlockContext())
    prefill, cache = block.forward_absorbed(x[:, :5], BlockContext())
    steps = [prefill]
    for t in range(5, 9):
        out, cache = block.forward_absorbed(x[:, t : t + 1], BlockContext(), cache)
        steps.append(out)
    assert cache[0].shape == (2, 9, 16) and cache[1].shape == (2, 9, 4)
    assert_rel_close(torch.cat(steps, dim=1), plain, tol=1e-10)


def test_bad_config_values_name_the_key() -> None:
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(Attention.Config(num_heads=4, num_kv_heads=3), hidden_size=32)
    with pytest.raises(ValueError, match="rope_scaling"):
        Attention(Attention.Config(num_heads=4, rope_scaling="ntk"), hidden_size=32)
    with pytest.raises(ValueError, match="rotary_fraction"):
        Attention(Attention.Config(num_heads=4, rotary_fraction=0.1), hidden_size=32)
    with pytest.raises(ValueError, match="gelu_approximate"):
        GeluMLP(GeluMLP.Config(gelu_approximate="fast"), hidden_size=8)


def test_mla_yarn_softmax_scale_includes_mscale() -> None:
    cfg = MLA.Config(
        num_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        rope_scaling="yarn", rope_factor=40.0, rope_mscale=1.0, rope_mscale_all_dim=1.0,
        rope_original_max_positions=64,
    )  # fmt: skip
    block = MLA(cfg, hidden_size=16)
    mscale = 0.1 * math.log(40.0) + 1.0
    assert block.scale == pytest.approx(mscale**2 / math.sqrt(16))
    assert block.rotary.attention_factor == pytest.approx(1.0)  # mscale / mscale_all_dim


def test_block_flops_formulas() -> None:
    from mcore.protocols.block import FlopsShape

    shape = FlopsShape(tokens=10, attended=55)
    attn = Attention(Attention.Config(num_heads=4, num_kv_heads=2), hidden_size=32)
    assert attn.flops(shape) == 2 * 10 * 32 * (64 + 32) + 4 * 55 * 4 * 8
    mlp = SwiGLU(SwiGLU.Config(ffn_hidden_size=48), hidden_size=32)
    assert mlp.flops(shape) == 2 * 10 * 3 * 32 * 48
    assert GeluMLP(GeluMLP.Config(ffn_hidden_size=48), hidden_size=32).flops(shape) == 2 * 10 * 2 * 32 * 48
    mla = MLA(
        MLA.Config(num_heads=2, q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=3),
        hidden_size=16,
    )
    linears = 16 * 12 + 12 * 2 * 6 + 16 * 10 + 8 * 2 * 7 + 6 * 16
    assert mla.flops(shape) == 2 * 10 * linears + 2 * 55 * 2 * (4 + 2 + 3)


def test_project_fuses_plain_weights_and_keeps_subclass_weights_apart() -> None:
    from torch import nn

    from mcore_models.blocks.base import project

    class Marked(torch.Tensor):  # stands in for a layout's DTensor or a quantized weight
        pass

    gen = torch.Generator().manual_seed(0)
    linears = (nn.Linear(8, 6), nn.Linear(8, 2), nn.Linear(8, 2))
    for linear in linears:
        nn.init.normal_(linear.weight, generator=gen)
        nn.init.normal_(linear.bias, generator=gen)
    x = torch.randn(3, 5, 8, generator=gen)
    want = [linear(x) for linear in linears]
    got = project(x, linears)
    assert [g.shape for g in got] == [(3, 5, 6), (3, 5, 2), (3, 5, 2)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    sum(g.sum() for g in got).backward()  # type: ignore[union-attr]
    fused_grads = [linear.weight.grad.clone() for linear in linears]  # type: ignore[union-attr]
    for linear in linears:
        linear.zero_grad()
    sum(w.sum() for w in want).backward()  # type: ignore[union-attr]
    for fused, plain in zip(fused_grads, (linear.weight.grad for linear in linears), strict=True):
        torch.testing.assert_close(fused, plain)
    # under autocast the weights are cast before they are concatenated: the same bf16 GEMM as apart
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast_want = [linear(x) for linear in linears]
        cast_got = project(x, linears)
    for g, w in zip(cast_got, cast_want, strict=True):
        assert g.dtype == w.dtype == torch.bfloat16
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2)
    # a subclass weight is never concatenated (that would gather a tensor-parallel shard)
    marked = nn.Linear(8, 2)
    marked.weight = nn.Parameter(marked.weight.detach().as_subclass(Marked))
    assert type(marked.weight) is not nn.Parameter
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = project(x, (linears[0], marked))
    assert [o.shape for o in out] == [(3, 5, 6), (3, 5, 2)] and all(o.dtype == torch.bfloat16 for o in out)


def test_project_calls_each_linear_that_is_not_a_plain_linear() -> None:
    """``project`` fuses q/k/v-style linears into one GEMM only when each is exactly ``nn.Linear``: a subclass (a
    precision recipe's quantised linear) computes its own GEMM, so the fused path must not read its weight."""
    from mcore_models.blocks.base import fused_projection, project

    class Counting(nn.Linear):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            type(self).calls += 1
            return super().forward(x) * 2.0

    plain = (nn.Linear(8, 4, bias=False), nn.Linear(8, 6, bias=False))
    hidden = torch.randn(3, 8)
    assert fused_projection(hidden, plain) is not None
    mixed = (plain[0], Counting(8, 6, bias=False))
    assert fused_projection(hidden, mixed) is None
    a, b = project(hidden, mixed)
    assert Counting.calls == 1
    torch.testing.assert_close(b, 2.0 * (hidden @ mixed[1].weight.t()))
    torch.testing.assert_close(a, hidden @ plain[0].weight.t())
