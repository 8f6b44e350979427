"""Hugging Face interop: logits parity with ``transformers`` per family, and exact round trips.

Through ``mcore_models.hf.import_hf`` / ``export_hf`` (dispatch on ``model_type`` among this package's
families) and, once, through the core's ``mcore.hf.load_hf`` with the families registered as kind ``"hf"``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from mcore.errors import UserError
from mcore_models.blocks.attention import Attention
from mcore_models.blocks.rope import RopeFields, inverse_frequencies
from mcore_models.gpt import GPT, GPTConfig
from mcore_models.hf import config_from_hf, config_to_hf, export_hf, import_hf
from mcore_models.presets import preset_config
from mcore_testing.numerics import rel_error

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

FAMILIES = {
    "llama-llama3-rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_key_value_heads=2,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama-tied-mha": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=4, tie_word_embeddings=True, head_dim=32),
    ),
    "llama-linear-rope-bias": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_key_value_heads=1,
            attention_bias=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        ),
    ),
    "llama-yarn": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_key_value_heads=2,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "qwen2-tied": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            num_key_value_heads=2, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
        ),
    ),
    "mistral-window": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(num_key_value_heads=2, sliding_window=5, head_dim=16),
    ),
    "deepseek-v3-interleaved-yarn": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            first_k_dense_replace=2,
            num_nextn_predict_layers=0,
            rope_interleave=True,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "deepseek-v3-no-q-lora-tied": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            first_k_dense_replace=2,
            num_nextn_predict_layers=0,
            rope_interleave=False,
            tie_word_embeddings=True,
        ),
    ),
}


def hf_model(family: str):  # type: ignore[no-untyped-def]
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**COMMON, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).float().eval()
    with torch.no_grad():  # non-trivial norms and biases, so their mapping is checked too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_matches_transformers_logits(family: str, tmp_path: Path) -> None:
    reference = hf_model(family)
    reference.save_pretrained(tmp_path)
    config, model = import_hf(tmp_path)
    assert isinstance(config, GPTConfig)
    with torch.no_grad():
        ref = reference(tokens()).logits
        ours = model(tokens())
    assert rel_error(ours, ref) < 1e-5  # ||ours - ref|| / ||ref||
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-5  # max relative error


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_loads_in_transformers_and_round_trips_exactly(family: str, tmp_path: Path) -> None:
    reference = hf_model(family)
    reference.save_pretrained(tmp_path / "hf")
    config, model = import_hf(tmp_path / "hf")
    export_hf(model, config, tmp_path / "ours")
    reloaded = (
        getattr(transformers, FAMILIES[family][1])
        .from_pretrained(tmp_path / "ours", attn_implementation="eager")
        .float()
        .eval()
    )
    config2, model2 = import_hf(tmp_path / "ours")
    assert config2 == config
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    if getattr(reference.config, "rope_interleave", True) is False:
        # we always write DeepSeek's interleaved RoPE rows, so the weights differ by a permutation
        assert reloaded.config.rope_interleave is True
        with torch.no_grad():
            assert rel_error(reloaded(tokens()).logits, reference(tokens()).logits) < 1e-5
        return
    for name, tensor in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(reloaded(tokens()).logits, reference(tokens()).logits)


def test_round_trip_of_a_model_we_trained_from_scratch(tmp_path: Path) -> None:
    cfg = preset_config("tiny", hf_model_type="qwen2", tie_embeddings=True, attention={"qkv_bias": True})
    assert cfg.blocks["attention"] == {"num_heads": 4, "num_kv_heads": 2, "qkv_bias": True}  # merged key by key
    model = GPT.build(cfg, seed=4, device="cpu")
    export_hf(model, cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    cfg2, model2 = import_hf(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert cfg2.tie_embeddings and cfg2.blocks["attention"].qkv_bias and cfg2.hf_model_type == "qwen2"


def test_export_refuses_what_hf_cannot_express(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mtp_num_layers"):
        config_to_hf(preset_config("tiny", mtp_num_layers=1))
    with pytest.raises(ValueError, match="hf_model_type"):
        config_to_hf(GPTConfig(hf_model_type="gpt2"))


TINY_MLA = {"mixer": "mla", "mla": {"num_heads": 4}}


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("tiny", {"hf_model_type": "qwen2"}, "attention.qkv_bias/out_bias = False/False (qwen2 needs true/false)"),
        (
            "tiny",
            {"hf_model_type": "qwen2", "attention": {"qkv_bias": True, "head_dim": 8}},
            "attention.head_dim = 8 (qwen2 needs hidden_size / num_heads)",
        ),
        (
            "tiny",
            {"hf_model_type": "qwen2", "attention": {"qkv_bias": True, "sliding_window": 8}},
            "attention.sliding_window = 8 (qwen2 here has none)",
        ),
        ("tiny", {"attention": {"sliding_window": 8}}, "attention.sliding_window = 8 (llama has none; use mistral)"),
        (
            "tiny",
            {"attention": {"qkv_bias": True}},
            "attention.qkv_bias != out_bias (llama's attention_bias covers both)",
        ),
        ("tiny", {"attention": {"qk_norm": True}}, "attention.qk_norm = true (needs false)"),
        ("tiny", {"attention": {"rotary_fraction": 0.5}}, "attention.rotary_fraction = 0.5 (needs 1.0)"),
        ("tiny", {"attention": {"attention_scale": 0.1}}, "attention.attention_scale = 0.1 (needs none)"),
        (
            "tiny",
            {"hf_model_type": "mistral", "attention": {"out_bias": True}},
            "attention.qkv_bias/out_bias (mistral has no attention bias)",
        ),
        (
            "tiny",
            TINY_MLA,
            "layers = None, mixer = 'mla', mlp = 'swiglu' (needs every layer attention/swiglu)",
        ),
        (
            "tiny",
            {"layers": ["attention/swiglu", "attention/gelu-mlp"]},
            "layers = ['attention/swiglu', 'attention/gelu-mlp'], mixer = 'attention', mlp = 'swiglu' "
            "(needs every layer attention/swiglu)",
        ),
        ("tiny", {"norm": "layernorm"}, "norm = 'layernorm' (needs 'rmsnorm')"),
        ("tiny", {"mup_base_width": 32}, "mup_base_width = 32 (needs none)"),
        ("tiny", {"swiglu": {"mlp_bias": True}}, "swiglu.mlp_bias = true (needs false)"),
        ("tiny", {"rmsnorm": {"zero_centered_gamma": True}}, "rmsnorm.zero_centered_gamma = true (needs false)"),
        (
            "deepseek-v3-mini-dense",
            {"mixer": "attention", "attention": {"num_heads": 8}},
            "layers = None, mixer = 'attention', mlp = 'swiglu' (needs every layer mla/swiglu or mla/moe, "
            "the swiglu ones first)",
        ),
        ("deepseek-v3-mini-dense", {"rmsnorm": {"norm_eps": 1e-5}}, "rmsnorm.norm_eps = 1e-05 (needs 1e-06)"),
        ("deepseek-v3-mini-dense", {"mla": {"norm_eps": 1e-5}}, "mla.norm_eps = 1e-05 (needs 1e-06)"),
        ("deepseek-v3-mini-dense", {"mtp": {"norm_eps": 1e-5}}, "mtp.norm_eps = 1e-05 (needs 1e-06)"),
        ("deepseek-v3-mini-dense", {"mla": {"sliding_window": 8}}, "mla.sliding_window = 8 (needs none)"),
        ("deepseek-v3-mini-dense", {"mla": {"attention_scale": 0.1}}, "mla.attention_scale = 0.1 (needs none)"),
    ],
)
def test_export_refusals_name_the_block_key(preset: str, overrides: dict, message: str) -> None:  # type: ignore[type-arg]
    """Each family's refusal names the block table's key (``attention.qk_norm``), the value and what it needs."""
    from mcore_models import hf_deepseek

    cfg = preset_config(preset, **overrides)
    codec = hf_deepseek if cfg.hf_model_type == "deepseek_v3" else None
    with pytest.raises(ValueError, match=f"cannot be exported as Hugging Face {cfg.hf_model_type!r}: ") as info:
        (codec.config_to_hf if codec else config_to_hf)(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("preset", "overrides"), [("tiny", TINY_MLA), ("deepseek-v3-mini-dense", {"mixer": "attention"})]
)
def test_export_of_a_model_its_family_cannot_express_is_refused_before_writing(
    preset: str,
    overrides: dict,  # type: ignore[type-arg]
    tmp_path: Path,
) -> None:
    cfg = preset_config(preset, vocab_size=64, hidden_size=64, num_layers=1, mtp_num_layers=0, **overrides)
    model = GPT.build(cfg, seed=0, device="cpu")
    with pytest.raises(ValueError, match="needs every layer"):
        export_hf(model, cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        {
            "rope_type": "yarn",
            "rope_theta": 1e6,
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
            "attention_factor": 1.3,
        },
    ],
)
def test_rope_frequencies_equal_transformers(rope: dict) -> None:  # type: ignore[type-arg]
    """Scaled RoPE variants (the default one is covered by the logits parity tests)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = transformers.LlamaConfig(**{**COMMON, "max_position_embeddings": 200000}, rope_parameters=dict(rope))
    inv_ref, factor_ref = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config, "cpu")
    attention = config_from_hf(hf_config.to_dict()).blocks["attention"]  # RoPE settings live in [model.attention]
    assert isinstance(attention, Attention.Config)
    fields = RopeFields(**{f: getattr(attention, f) for f in RopeFields.__slots__})
    inv, factor = inverse_frequencies(fields, 16)
    assert torch.equal(inv, inv_ref.float())
    assert factor == pytest.approx(factor_ref, rel=1e-12)


def test_import_reads_sharded_checkpoints(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    reference = hf_model("llama-llama3-rope")
    reference.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _, model = import_hf(tmp_path)
    with torch.no_grad():
        assert rel_error(model(tokens()), reference(tokens()).logits) < 1e-5


@pytest.mark.parametrize(
    ("family", "drop"),
    [
        ("llama-linear-rope-bias", "model.layers.1.self_attn.k_proj.weight"),
        ("llama-linear-rope-bias", "model.layers.0.self_attn.v_proj.bias"),
        ("qwen2-tied", "model.layers.0.mlp.gate_proj.weight"),
        ("deepseek-v3-interleaved-yarn", "model.layers.1.mlp.up_proj.weight"),
        ("deepseek-v3-interleaved-yarn", "model.norm.weight"),  # was a KeyError traceback
    ],
)
def test_import_names_a_missing_tensor(family: str, drop: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    hf_model(family).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors[drop]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"missing tensor {re.escape(repr(drop))}") as info:
        import_hf(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("family", ["llama-llama3-rope", "deepseek-v3-interleaved-yarn"])
def test_import_names_tensors_it_would_not_use(family: str, tmp_path: Path) -> None:
    """A fused tensor (another converter's layout) is not silently dropped."""
    from safetensors.torch import load_file, save_file

    hf_model(family).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.self_attn.qkv_proj.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"does not use, e.g. \['model.layers.0.self_attn.qkv_proj.weight'\]"):
        import_hf(tmp_path)


def test_import_rejects_unknown_families(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type"):
        import_hf(tmp_path)


@pytest.mark.parametrize("family", ["qwen2-tied", "deepseek-v3-no-q-lora-tied"])
def test_core_reads_and_chooses_the_registered_families(family: str, tmp_path: Path) -> None:
    """``mcore.hf.load_hf`` / ``export_family`` find this package's families as kind ``"hf"`` (no import of gpt's)."""
    from mcore.hf import export_family, load_hf
    from mcore_testing.hosts import isolated_host

    host = isolated_host("mcore_models.plugin")
    reference = hf_model(family)
    reference.save_pretrained(tmp_path)
    name, config, model = load_hf(tmp_path, host)
    assert name == "gpt" and config == import_hf(tmp_path)[0]
    with torch.no_grad():
        assert rel_error(model(tokens()), reference(tokens()).logits) < 1e-5
    chosen = export_family(GPT, "gpt", config, host)
    assert chosen.name == reference.config.model_type and chosen.model == "gpt"


def test_deepseek_with_mtp_round_trips_and_loads_in_transformers(tmp_path: Path) -> None:
    cfg = preset_config(
        "deepseek-v3-mini-dense",
        hf_model_type="deepseek_v3",
        vocab_size=96,
        hidden_size=64,
        num_layers=2,
        mtp_num_layers=2,
        swiglu={"ffn_hidden_size": 112},
        mla={"q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8},
    )
    model = GPT.build(cfg, seed=1, device="cpu")
    export_hf(model, cfg, tmp_path)
    cfg2, model2 = import_hf(tmp_path)
    assert cfg2.mtp_num_layers == 2 and cfg2.mixer == "mla"
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    with torch.no_grad():
        assert rel_error(model(tokens()), hf(tokens()).logits) < 1e-5


@pytest.mark.parametrize(
    ("config_name", "values"),
    [
        ("DeepseekV3Config", {"first_k_dense_replace": 1}),
        ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
        ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "num_key_value_heads": 2}),
    ],
)
def test_moe_checkpoints_without_the_moe_plugin_are_refused_naming_it(
    config_name: str,
    values: dict,  # type: ignore[type-arg]
    tmp_path: Path,
) -> None:
    """MoE layers are the moe block's to map: without mcore-moe, one line naming it, before any weight is read."""
    from mcore.hf import load_hf
    from mcore_testing.hosts import isolated_host

    hf = getattr(transformers, config_name)(**COMMON, **values).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(hf))  # no weights: the config is refused first
    with pytest.raises(UserError, match="with 'moe' layers needs block 'moe' from mcore-moe: load through mcore"):
        import_hf(tmp_path)  # Python use without a block lookup
    with pytest.raises(
        UserError, match="needs block 'moe' from mcore-moe: install it and check `mcore plugins`"
    ) as info:
        load_hf(tmp_path, isolated_host("mcore_models.plugin"))  # the registry has no block 'moe'
    assert "\n" not in str(info.value) and "unknown block 'moe'" in str(info.value)


def test_import_refuses_untruncated_yarn() -> None:
    hf = {**COMMON, "model_type": "llama", "hidden_act": "silu",
          "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "truncate": False}}  # fmt: skip
    with pytest.raises(ValueError, match="truncate"):
        config_from_hf(hf)


MOE_SKELETON = {"hf_model_type": "qwen3_moe", "mlp": "moe", "attention": {"qk_norm": True, "norm_eps": 1e-5}}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attention": {"qk_norm": False}}, "attention.qk_norm = false (qwen3_moe needs true)"),
        ({"attention": {"norm_eps": 1e-6}}, "attention.norm_eps = 1e-06 (qwen3_moe needs rmsnorm.norm_eps = 1e-05)"),
        ({"attention": {"sliding_window": 8}}, "attention.sliding_window = 8 (qwen3_moe here has none)"),
        ({"attention": {"qkv_bias": True}}, "attention.qkv_bias != out_bias (qwen3_moe's attention_bias covers both)"),
        ({"mtp_num_layers": 1}, "mtp_num_layers = 1 (needs 0)"),
        ({"mixer": "mla"}, "(needs every layer attention/swiglu or attention/moe)"),
        (
            {"hf_model_type": "mixtral", "attention": {"qk_norm": True}},
            "attention.qk_norm = true (mixtral needs false)",
        ),
        (
            {"hf_model_type": "mixtral", "layers": ["attention/swiglu", "attention/moe"]},
            "(needs every layer attention/moe)",
        ),
        (
            {"hf_model_type": "mixtral", "attention": {"qk_norm": False, "out_bias": True}},
            "mixtral has no attention bias",
        ),
    ],
)
def test_moe_family_skeleton_refusals_name_the_key(overrides: dict, message: str) -> None:  # type: ignore[type-arg]
    """Qwen3-MoE / Mixtral skeleton checks come before the moe block is needed (no MoE plugin here)."""
    from mcore.presets import deep_merge
    from mcore_models.hf_moe import config_to_hf as moe_config_to_hf

    cfg = preset_config("tiny", **deep_merge(MOE_SKELETON, overrides))
    with pytest.raises(ValueError, match=f"cannot be exported as Hugging Face {cfg.hf_model_type!r}: ") as info:
        moe_config_to_hf(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_deepseek_checkpoint_without_its_mtp_layer_says_so(tmp_path: Path) -> None:
    """``transformers`` builds and saves no MTP layer: the error names the key to change, not a norm tensor."""
    config_name, model_name, extra = FAMILIES["deepseek-v3-interleaved-yarn"]
    config = transformers.DeepseekV3Config(**COMMON, **{**extra, "num_nextn_predict_layers": 1})
    transformers.DeepseekV3ForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="num_nextn_predict_layers = 1 but the checkpoint has no layer 2") as info:
        import_hf(tmp_path)
    assert "set num_nextn_predict_layers = 0" in str(info.value) and "\n" not in str(info.value)
