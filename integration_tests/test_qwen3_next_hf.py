"""Hugging Face interop of hybrid models: Qwen3-Next (``qwen3_next``), and the hybrid presets of mcore-ssm.

mcore-models maps the skeleton (``hf_qwen3_next``: norms, gated attention, dense MLPs); the ``gdn`` block
(mcore-ssm) maps the linear-attention layers and the ``moe`` block (mcore-moe) the sparse MLPs, each through
its ``hf`` attribute. Checked against real ``transformers`` on tiny random configs: fp32 logits of an import
equal theirs (rel < 1e-5), and an export loads in ``transformers`` with the same tensors and logits, and imports
back to the same config and tensors. What does not map is refused in one line naming the key and the value.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers  # the integration tests install it (mcore-models' test extra)

from mcore.config import resolve_model
from mcore.errors import UserError
from mcore.hf import export_family, load_hf
from mcore.presets import deep_merge
from mcore_models.gpt import GPTConfig
from mcore_models.hf_blocks import HFBlocks
from mcore_models.hf_qwen3_next import config_to_hf
from mcore_ssm.presets import HYBRID_BENCH, PRESETS
from mcore_testing.conformance import PresetConformance
from mcore_testing.hosts import isolated_host
from mcore_testing.numerics import rel_error, seeded_tokens

PLUGINS = ("mcore_models.plugin", "mcore_moe.plugin", "mcore_ssm.plugin")
COMMON: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=12,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

#: case -> (config values over COMMON, tokens per row: past one GDN chunk of 64 in one case)
CASES: dict[str, tuple[dict[str, Any], int]] = {
    "moe-interval4-one-dense": (
        dict(
            num_hidden_layers=4,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            mlp_only_layers=[1],
        ),
        13,
    ),
    "dense-bias-tied-interval2-half-rotary": (
        dict(
            num_hidden_layers=2,
            num_experts=0,
            attention_bias=True,
            tie_word_embeddings=True,
            full_attention_interval=2,
            linear_num_value_heads=2,
            linear_value_head_dim=8,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
        ),
        13,
    ),
    "layer-types-sparse-step-top1-long": (
        dict(
            num_hidden_layers=3,
            layer_types=["full_attention", "linear_attention", "linear_attention"],
            num_experts=4,
            num_experts_per_tok=1,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=16,
            decoder_sparse_step=2,
            norm_topk_prob=False,
        ),
        70,
    ),
}


def host() -> Any:
    return isolated_host(*PLUGINS)


def hf_model(case: str) -> Any:
    config = transformers.Qwen3NextConfig(**{**COMMON, **CASES[case][0]})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Qwen3NextForCausalLM(config).float().eval()
    with torch.no_grad():  # decisive routing; non-trivial norms, biases, shared-expert gates and decays
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(20.0)
            if name.endswith("norm.weight") or name.endswith(".bias") or name.endswith("dt_bias"):
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("shared_expert_gate.weight"):
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def tokens(case: str) -> torch.Tensor:
    return seeded_tokens((2, CASES[case][1]), vocab_size=COMMON["vocab_size"], seed=1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_transformers_and_export_round_trips(case: str, tmp_path: Path) -> None:
    reference = hf_model(case)
    reference.save_pretrained(tmp_path / "hf")
    name, config, model = load_hf(tmp_path / "hf", host())
    assert name == "gpt" and {"gdn", "attention"} <= set(config.block_names())
    with torch.no_grad():
        ref = reference(tokens(case)).logits
        ours = model(tokens(case))
    assert rel_error(ours, ref) < 1e-5
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-5

    family = export_family(type(model), "gpt", config, host())
    assert family.name == "qwen3_next"
    family.export(model, config, tmp_path / "ours")
    reloaded = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    reloaded = reloaded.float().eval()
    assert reloaded.config.layer_types == reference.config.layer_types
    assert (
        reloaded.config.rope_parameters["partial_rotary_factor"]
        == reference.config.rope_parameters["partial_rotary_factor"]
    )
    for key, tensor in reference.state_dict().items():  # the same tensors under the same names
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    with torch.no_grad():
        assert rel_error(reloaded(tokens(case)).logits, ref) < 1e-5
    _, config2, model2 = load_hf(tmp_path / "ours", host())
    assert config2 == config
    for (key, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_the_layer_kinds_follow_layer_types_and_the_sparse_layers(tmp_path: Path) -> None:
    hf_model("moe-interval4-one-dense").save_pretrained(tmp_path)
    _, config, model = load_hf(tmp_path, host())
    assert config.layers == ["1*gdn/moe", "1*gdn/swiglu", "1*gdn/moe", "1*attention/moe"]
    assert [type(layer.attention).__name__ for layer in model.layers] == ["GatedDeltaNet"] * 3 + ["Attention"]
    assert config.blocks["attention"].output_gate and config.blocks["rmsnorm"].zero_centered_gamma
    assert config.blocks["attention"].rotary_fraction == 0.25  # Qwen3-Next's default partial RoPE


def test_multi_token_prediction_tensors_are_ignored_like_transformers_does(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    hf_model("dense-bias-tied-interval2-half-rotary").save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["mtp.fc.weight"] = torch.zeros(64, 128)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    _, _, model = load_hf(tmp_path, host())
    assert not any(name.startswith("mtp") for name in model.state_dict())


@pytest.mark.parametrize(
    "drop",
    [
        "model.layers.0.linear_attn.in_proj_ba.weight",
        "model.layers.3.self_attn.q_proj.weight",
        "model.layers.2.mlp.shared_expert_gate.weight",
        "model.layers.1.mlp.up_proj.weight",
    ],
)
def test_import_names_a_missing_tensor(drop: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    hf_model("moe-interval4-one-dense").save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors[drop]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"missing tensor {re.escape(repr(drop))}"):
        load_hf(tmp_path, host())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layer_types": ["linear_attention", "sliding_attention"]}, "layer_types entry 'sliding_attention': allowed"),
        ({"layer_types": ["full_attention"]}, "layer_types = ['full_attention']: needs one entry per layer (2)"),
        ({"hidden_act": "gelu"}, "hidden_act = 'gelu': allowed: silu"),
        ({"linear_num_value_heads": 3}, "linear_num_value_heads = 3: allowed: a multiple of linear_num_key_heads = 2"),
        ({"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size = 0: allowed: an int >= 1"),
    ],
)
def test_import_refuses_what_does_not_map_in_one_line(change: dict[str, Any], message: str, tmp_path: Path) -> None:
    extra = dict(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
    hf = transformers.Qwen3NextConfig(**{**COMMON, **extra}).to_dict() | change
    (tmp_path / "config.json").write_text(json.dumps(hf))  # refused from the config, before any weight is read
    with pytest.raises(UserError, match=re.escape(message)) as info:
        load_hf(tmp_path, host())
    assert "\n" not in str(info.value)


def test_import_without_the_ssm_plugin_names_it(tmp_path: Path) -> None:
    hf_model("dense-bias-tied-interval2-half-rotary").save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"'gdn' layers needs block 'gdn' from mcore-ssm") as info:
        load_hf(tmp_path, isolated_host("mcore_models.plugin", "mcore_moe.plugin"))
    assert "\n" not in str(info.value)


# -- export refusals ------------------------------------------------------------------------------
_GATED = dict(num_heads=4, num_kv_heads=2, qk_norm=True, qk_norm_zero_centered=True, output_gate=True, norm_eps=1e-6)
_OK: dict[str, Any] = dict(
    hidden_size=32,
    num_layers=2,
    layers=["gdn/swiglu", "attention/swiglu"],
    hf_model_type="qwen3_next",
    attention=_GATED,
    gdn=dict(num_qk_heads=2, num_v_heads=4, head_k_dim=8),
    rmsnorm=dict(norm_eps=1e-6, zero_centered_gamma=True),
)


def _export_config(**change: Any) -> dict[str, Any]:
    h = host()
    config = GPTConfig.from_values(deep_merge(_OK, change))
    return config_to_hf(config, torch.float32, HFBlocks(lambda name: h.load("block", name), "qwen3_next"))


def test_a_valid_config_exports_its_keys() -> None:
    hf = _export_config()
    assert hf["layer_types"] == ["linear_attention", "full_attention"] and hf["num_experts"] == 0
    assert hf["linear_key_head_dim"] == 8 and hf["rope_parameters"]["partial_rotary_factor"] == 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(attention=dict(output_gate=False)), "attention.output_gate = false (qwen3_next needs true)"),
        (
            dict(attention=dict(qk_norm_zero_centered=False)),
            "attention.qk_norm_zero_centered = false (qwen3_next needs true)",
        ),
        (dict(rmsnorm=dict(zero_centered_gamma=False)), "rmsnorm.zero_centered_gamma = false"),
        (dict(attention=dict(norm_eps=1e-5)), "attention.norm_eps = 1e-05 (qwen3_next needs rmsnorm.norm_eps = 1e-06)"),
        (dict(gdn=dict(norm_eps=1e-5)), "gdn writes rms_norm_eps = 1e-05 but the model's is 1e-06 (they must agree)"),
        (dict(gdn=dict(out_bias=True)), "gdn.out_bias = true (needs false)"),
        (dict(layers=["mamba2/swiglu", "attention/swiglu"]), "needs every layer gdn or attention, with moe or swiglu"),
        (dict(layers=["gdn/none", "attention/swiglu"]), "needs every layer gdn or attention, with moe or swiglu"),
        (dict(attention=dict(sliding_window=8)), "attention.sliding_window = 8 (qwen3_next has none)"),
        (dict(mtp_num_layers=1), "mtp_num_layers = 1 (needs 0)"),
        (
            dict(attention=dict(qkv_bias=True)),
            "attention.qkv_bias != out_bias (qwen3_next's attention_bias covers both)",
        ),
    ],
)
def test_export_refuses_what_qwen3_next_cannot_express(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="cannot be exported as Hugging Face 'qwen3_next': ") as info:
        _export_config(**change)
    assert message in str(info.value) and "\n" not in str(info.value)


# -- presets ------------------------------------------------------------------------------------
class TestHybridPresets(PresetConformance):
    plugins = PLUGINS
    distribution = "mcore-ssm"


#: Test-size overrides (merged key by key into each preset).
SMALL: dict[str, dict[str, Any]] = {
    "qwen3-next-mini": dict(
        vocab_size=96,
        hidden_size=64,
        num_layers=4,
        layers=["3*gdn/moe", "attention/moe"],
        attention=dict(num_heads=4, num_kv_heads=2, head_dim=16),
        gdn=dict(num_qk_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8),
        moe=dict(num_experts=4, top_k=2, moe_ffn_hidden_size=16, shared_ffn_hidden_size=16),
    ),
    "hybrid-bench": dict(
        vocab_size=96,
        hidden_size=64,
        num_layers=4,
        layers=["3*gdn/swiglu", "attention/swiglu"],
        attention=dict(num_heads=4, num_kv_heads=2),
        gdn=dict(num_qk_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8),
        swiglu=dict(ffn_hidden_size=96),
    ),
}


def build(name: str, seed: int = 0) -> tuple[Any, Any]:
    h = host()
    selection = resolve_model({"preset": name, **SMALL[name]}, h)
    factory = selection.implementation.load()
    model = factory.build(selection.config, seed=seed, device="cpu", block_lookup=lambda b: h.load("block", b))
    return selection.config, model


def test_presets_are_registered_by_mcore_ssm() -> None:
    h = host()
    assert set(SMALL) <= set(PRESETS)
    for name in SMALL:
        assert h.get("preset", name).source.distribution == "mcore-ssm"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_each_preset_trains_a_step_on_cpu(name: str) -> None:
    config, model = build(name)
    kinds = [mixer for mixer, _ in config.layer_kinds()]
    assert kinds == ["gdn", "gdn", "gdn", "attention"]
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = seeded_tokens((2, 16), vocab_size=config.vocab_size, seed=1)
    losses = []
    for _ in range(3):
        loss = model(batch, labels=batch.roll(-1, 1))
        loss.backward()
        grad = model.layers[0].attention.q.weight.grad
        assert grad is not None and grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


def test_qwen3_next_mini_exports_to_transformers(tmp_path: Path) -> None:
    """A model built from ``qwen3-next-mini`` loads in ``transformers`` with our logits, and imports back."""
    config, model = build("qwen3-next-mini", seed=3)
    h = host()
    export_family(type(model), "gpt", config, h).export(model, config, tmp_path)
    reference = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float()
    batch = seeded_tokens((2, 13), vocab_size=config.vocab_size, seed=2)
    model.eval()
    with torch.no_grad():
        assert rel_error(model(batch), reference.eval()(batch).logits) < 1e-5
    _, config2, model2 = load_hf(tmp_path, h)
    for (key, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_full_size_hybrid_presets_build_on_meta_with_their_shapes() -> None:
    h = host()
    counts, layers = {}, {}
    for name in SMALL:
        selection = resolve_model({"preset": name}, h)
        model = selection.implementation.load().build(
            selection.config, seed=0, device="meta", block_lookup=lambda b: h.load("block", b)
        )
        counts[name] = sum(p.numel() for p in model.parameters())
        layers[name] = [mixer for mixer, _ in selection.config.layer_kinds()]
    for kinds in layers.values():  # GDN : attention 3:1
        assert kinds == ["gdn", "gdn", "gdn", "attention"] * (len(kinds) // 4)
    assert len(layers["qwen3-next-mini"]) == 8 and len(layers["hybrid-bench"]) == 16
    bench = resolve_model({"preset": "bench-0.9b"}, h).config
    assert (HYBRID_BENCH.values["hidden_size"], HYBRID_BENCH.values["vocab_size"]) == (
        bench.hidden_size,
        bench.vocab_size,
    )
    assert 0.9e9 < counts["hybrid-bench"] < 1.0e9  # the docstring's ~0.94B
    mini = resolve_model({"preset": "qwen3-next-mini"}, h).config
    assert mini.hf_model_type == "qwen3_next" and mini.hidden_size == 512


RUN_TOML = """
[model]
name = "gpt"
preset = "qwen3-next-mini"
vocab_size = 257
hidden_size = 32
num_layers = 4
layers = ["3*gdn/moe", "attention/moe"]
max_position_embeddings = 64

[model.attention]
num_heads = 2
num_kv_heads = 1
head_dim = 16

[model.gdn]
num_qk_heads = 2
num_v_heads = 4
head_k_dim = 8
head_v_dim = 8

[model.moe]
num_experts = 4
top_k = 2
moe_ffn_hidden_size = 16
shared_ffn_hidden_size = 16

[optimizer]
name = "reference-adamw"

[train]
steps = 2
seq_len = 16
global_batch_size = 2
out_dir = "{out}"
cpu_threads = 1

[data]
source = "{source}"
workers = 0

[log]
progress = "none"
tensorboard = false
plot = false
"""


def test_cli_trains_and_exports_a_hybrid_model_that_transformers_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``mcore train`` then ``mcore export`` of ``qwen3-next-mini`` (test size): ``transformers`` loads it with the
    logits of the core's ``load_hf`` of the same directory."""
    import mcore.plugins
    from mcore.cli import main

    h = isolated_host("mcore_testing.plugin", *PLUGINS)  # its optimizer
    monkeypatch.setattr(mcore.plugins, "load_plugins", lambda **kw: h)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    (tmp_path / "run.toml").write_text(RUN_TOML.format(out=tmp_path / "run", source=corpus))
    assert main(["train", str(tmp_path / "run.toml")]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0, capsys.readouterr().err
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["model_type"] == "qwen3_next" and hf_config["layer_types"][-1] == "full_attention"
    _, _, model = load_hf(tmp_path / "hf", h)
    reference = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    batch = seeded_tokens((2, 13), vocab_size=257, seed=1)
    model.eval()
    with torch.no_grad():
        assert rel_error(model(batch), reference.float().eval()(batch).logits) < 1e-5
