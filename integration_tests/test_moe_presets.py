"""This plugin's presets (``mcore_moe.presets``): registered beside mcore-models' ``gpt``, resolved and built by
the core, a training step of each on CPU at test size, parameter counts, and the Hugging Face export of the
public-model ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mcore.config import resolve_model
from mcore.presets import deep_merge
from mcore.train.step_hooks import after_optimizer_step, post_step_modules
from mcore_moe.presets import MOE_BENCH, PRESETS
from mcore_testing.conformance import PresetConformance
from mcore_testing.hosts import isolated_host
from mcore_testing.numerics import rel_error, seeded_tokens

PLUGINS = ("mcore_models.plugin", "mcore_moe.plugin")


class TestMoEPresets(PresetConformance):
    plugins = PLUGINS
    distribution = "mcore-moe"


def host() -> Any:
    return isolated_host(*PLUGINS)


#: Test-size overrides (merged key by key into each preset).
SMALL: dict[str, dict[str, Any]] = {
    "deepseek-v3-mini": dict(
        vocab_size=96,
        hidden_size=64,
        mla=dict(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_heads=4),
        swiglu=dict(ffn_hidden_size=96),
        moe=dict(moe_ffn_hidden_size=32),
    ),
    "qwen3-moe-mini": dict(
        vocab_size=96,
        hidden_size=64,
        attention=dict(num_heads=4, num_kv_heads=2, head_dim=16),
        moe=dict(moe_ffn_hidden_size=32),
    ),
    "moe-bench": dict(
        vocab_size=96,
        hidden_size=64,
        num_layers=2,
        attention=dict(num_heads=4, num_kv_heads=2),
        moe=dict(num_experts=16, moe_ffn_hidden_size=32),
    ),
}


def build(name: str, seed: int = 0, **overrides: Any) -> tuple[Any, Any]:
    """``(config, model)`` of preset ``name`` at test size, resolved and built through the core."""
    h = host()
    selection = resolve_model({"preset": name, **deep_merge(SMALL[name], overrides)}, h)
    factory = selection.implementation.load()
    model = factory.build(selection.config, seed=seed, device="cpu", block_lookup=lambda b: h.load("block", b))
    return selection.config, model


def test_presets_are_registered_by_this_plugin_and_the_dense_one_by_mcore_models() -> None:
    h = host()
    assert {n for n in PRESETS} == {"deepseek-v3-mini", "qwen3-moe-mini", "moe-bench"} == set(SMALL)
    for name in PRESETS:
        assert h.get("preset", name).source.distribution == "mcore-moe"
    assert h.get("preset", "deepseek-v3-mini-dense").source.distribution == "mcore-models"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_trains_a_step_on_cpu(name: str) -> None:
    config, model = build(name)
    kinds = config.layer_kinds()
    assert any(mlp == "moe" for _, mlp in kinds)
    if name == "deepseek-v3-mini":
        assert kinds[0] == ("mla", "swiglu") and config.mtp_num_layers == 1
        assert type(model.mtp[0].layer.mlp).__name__ == "MoE"  # the MTP depth is a MoE layer, like the last one
    model.train()
    hooks = post_step_modules(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = seeded_tokens((2, 16), vocab_size=config.vocab_size, seed=1)
    losses = []
    for _ in range(3):
        loss = model(tokens, labels=tokens.roll(-1, 1))
        loss.backward()
        expert_grad = model.layers[-1].mlp.experts.gate.grad
        assert expert_grad is not None and expert_grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        after_optimizer_step(hooks, lambda t: t, applied=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


def _expected_moe_bench_counts() -> tuple[int, int]:
    """(total, active per token) parameters of ``moe-bench`` from its values."""
    v = MOE_BENCH.values
    h, layers, vocab = v["hidden_size"], v["num_layers"], v["vocab_size"]
    att, moe = v["attention"], v["moe"]
    head_dim = h // att["num_heads"]
    attention = 2 * h * att["num_heads"] * head_dim + 2 * h * att["num_kv_heads"] * head_dim
    expert = 3 * h * moe["moe_ffn_hidden_size"]
    router, shared, norms = moe["num_experts"] * h, moe["num_shared_experts"] * expert, 2 * h
    total = layers * (attention + moe["num_experts"] * expert + shared + router + norms) + 2 * vocab * h + h
    active = layers * (attention + moe["top_k"] * expert + shared + router + norms) + 2 * vocab * h + h
    return total, active


def test_moe_bench_shape_and_parameter_counts_on_meta() -> None:
    h = host()
    selection = resolve_model({"preset": "moe-bench"}, h)
    model = selection.implementation.load().build(
        selection.config, seed=0, device="meta", block_lookup=lambda b: h.load("block", b)
    )
    moe = model.layers[0].mlp.config
    assert (moe.num_experts, moe.top_k, moe.moe_ffn_hidden_size, moe.num_shared_experts) == (64, 8, 1024, 1)
    assert selection.config.hidden_size == 2048 and len(model.layers) == 16
    assert all(type(layer.mlp).__name__ == "MoE" for layer in model.layers)  # every layer MoE
    total, active = _expected_moe_bench_counts()
    assert sum(p.numel() for p in model.parameters()) == total
    assert 6.8e9 < total < 7.0e9 and 1.2e9 < active < 1.3e9  # the docstring's 6.9B and 1.2B active


@pytest.mark.parametrize(
    ("name", "model_class"), [("deepseek-v3-mini", "DeepseekV3ForCausalLM"), ("qwen3-moe-mini", "Qwen3MoeForCausalLM")]
)
def test_public_model_presets_export_to_transformers(name: str, model_class: str, tmp_path: Path) -> None:
    """A model trained from ``deepseek-v3-mini`` / ``qwen3-moe-mini`` loads in ``transformers`` with our logits."""
    import transformers  # the integration tests install it (mcore-models' test extra)

    from mcore.hf import export_family, load_hf

    config, model = build(name, seed=3)
    with torch.no_grad():  # a moved expert bias must travel with the weights
        for layer in model.layers:
            if hasattr(layer.mlp, "router") and config.blocks["moe"].expert_bias:
                layer.mlp.router.expert_bias.copy_(torch.randn(layer.mlp.router.expert_bias.shape) * 0.01)
    h = host()
    export_family(type(model), "gpt", config, h).export(model, config, tmp_path)
    reference = getattr(transformers, model_class).from_pretrained(tmp_path, attn_implementation="eager").float()
    tokens = seeded_tokens((2, 13), vocab_size=config.vocab_size, seed=2)
    model.eval()
    with torch.no_grad():
        assert rel_error(model(tokens), reference.eval()(tokens).logits) < 1e-5
    _, config2, model2 = load_hf(tmp_path, h)
    for (key, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
