"""Hugging Face interop of models with ``moe`` layers: DeepSeek-V3, Qwen3-MoE and Mixtral.

The model plugin (mcore-models, a test dependency) maps each family's skeleton; the ``moe`` block maps its
router, experts and shared experts (``mcore_moe.hf_map``). Checked against real ``transformers`` on tiny
random configs: fp32 logits of an import equal theirs (rel < 1e-5), and an export loads in ``transformers``
with the same logits, tensors and config after a second import.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers  # the integration tests install it (mcore-models' test extra)

from mcore.errors import UserError
from mcore.hf import export_family, load_hf
from mcore_moe.block import MoEConfig
from mcore_moe.hf_map import MoEHF
from mcore_testing.hosts import isolated_host
from mcore_testing.numerics import rel_error

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
MLA = dict(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)

#: case -> (transformers config class, model class, config values)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "deepseek-v3-groups-shared": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_hidden_layers=3,
            num_key_value_heads=4,
            **MLA,
            first_k_dense_replace=1,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            moe_intermediate_size=24,
            n_shared_experts=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            num_nextn_predict_layers=0,
            rope_interleave=True,
        ),
    ),
    "deepseek-v3-all-moe-unnormalised-tied": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_hidden_layers=2,
            num_key_value_heads=4,
            **MLA,
            first_k_dense_replace=0,
            n_routed_experts=6,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            moe_intermediate_size=16,
            n_shared_experts=1,
            routed_scaling_factor=1.5,
            norm_topk_prob=False,
            num_nextn_predict_layers=0,
            tie_word_embeddings=True,
        ),
    ),
    "deepseek-v3-no-shared": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_hidden_layers=2,
            num_key_value_heads=4,
            **MLA,
            first_k_dense_replace=1,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            moe_intermediate_size=16,
            n_shared_experts=0,
            num_nextn_predict_layers=0,
        ),
    ),
    "qwen3-moe-sparse-step": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_hidden_layers=4,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            norm_topk_prob=True,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
        ),
    ),
    "qwen3-moe-unnormalised-bias-top1": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_hidden_layers=2,
            num_key_value_heads=4,
            attention_bias=True,
            num_experts=4,
            num_experts_per_tok=1,
            moe_intermediate_size=24,
            norm_topk_prob=False,
        ),
    ),
    "qwen3-moe-top1-normalised": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_hidden_layers=2,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=1,
            moe_intermediate_size=24,
            norm_topk_prob=True,
        ),
    ),
    "mixtral-window": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_hidden_layers=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=5),
    ),
    "mixtral-top1-tied-rope": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            num_hidden_layers=2,
            num_key_value_heads=1,
            head_dim=8,
            num_local_experts=3,
            num_experts_per_tok=1,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        ),
    ),
}


def host() -> Any:
    return isolated_host("mcore_models.plugin", "mcore_moe.plugin")


def hf_model(case: str) -> Any:
    config_name, model_name, extra = CASES[case]
    config_cls = getattr(transformers, config_name, None)
    if config_cls is None or getattr(transformers, model_name, None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    config = config_cls(**{**COMMON, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).float().eval()
    with torch.no_grad():  # decisive routing, non-trivial norms, biases and expert biases
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.dim() == 2 and "shared" not in name:
                p.mul_(20.0)
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.2)
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_transformers_and_export_round_trips(case: str, tmp_path: Path) -> None:
    reference = hf_model(case)
    reference.save_pretrained(tmp_path / "hf")
    name, config, model = load_hf(tmp_path / "hf", host())
    assert name == "gpt" and "moe" in config.block_names()
    with torch.no_grad():
        ref = reference(tokens()).logits
        ours = model(tokens())
    assert rel_error(ours, ref) < 1e-5
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-5

    family = export_family(type(model), "gpt", config, host())
    assert family.name == reference.config.model_type
    family.export(model, config, tmp_path / "ours")
    reloaded = getattr(transformers, CASES[case][1]).from_pretrained(tmp_path / "ours", attn_implementation="eager")
    reloaded = reloaded.float().eval()
    for key, tensor in reference.state_dict().items():  # the same tensors under the same names
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    with torch.no_grad():
        assert rel_error(reloaded(tokens()).logits, ref) < 1e-5
    _, config2, model2 = load_hf(tmp_path / "ours", host())
    assert config2 == config
    for (key, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


RUN_TOML = """
[model]
name = "gpt"
preset = "deepseek-v3-mini"
vocab_size = 257
hidden_size = 32
num_layers = 2
layers = ["1*mla/swiglu", "1*mla/moe"]
max_position_embeddings = 64
mtp_num_layers = 1

[model.mla]
num_heads = 2
q_lora_rank = 16
kv_lora_rank = 8
qk_nope_head_dim = 8
qk_rope_head_dim = 4
v_head_dim = 8

[model.swiglu]
ffn_hidden_size = 48

[model.moe]
num_experts = 8
top_k = 2
num_groups = 4
topk_groups = 2
moe_ffn_hidden_size = 16

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


def test_cli_trains_exports_and_the_core_imports_a_moe_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``mcore train`` then ``mcore export`` of a DeepSeek-V3 MoE model (MTP included): ``transformers`` loads
    it with the logits of the core's ``load_hf`` of the same directory, and the moved expert bias travels."""
    import mcore.plugins
    from mcore.cli import main

    h = isolated_host("mcore_testing.plugin", "mcore_models.plugin", "mcore_moe.plugin")  # its optimizer
    monkeypatch.setattr(mcore.plugins, "load_plugins", lambda **kw: h)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    (tmp_path / "run.toml").write_text(RUN_TOML.format(out=tmp_path / "run", source=corpus))
    assert main(["train", str(tmp_path / "run.toml")]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0, capsys.readouterr().err
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["model_type"] == "deepseek_v3" and hf_config["first_k_dense_replace"] == 1
    assert hf_config["n_routed_experts"] == 8 and hf_config["num_nextn_predict_layers"] == 1

    name, config, model = load_hf(tmp_path / "hf", h)
    bias = model.layers[1].mlp.router.expert_bias
    assert bias.abs().sum() > 0  # two steps moved it (aux-loss-free balancing), and the export kept it
    reference = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    tokens = torch.randint(0, 257, (2, 13), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        assert rel_error(model(tokens), reference.float().eval()(tokens).logits) < 1e-5
    assert re.search(r"mtp\.0\.layer\.mlp\.experts\.gate", " ".join(model.state_dict()))  # the MTP layer is MoE


@pytest.mark.parametrize(
    ("model_type", "moe", "message"),
    [
        (
            "qwen3_moe",
            dict(capacity_factor=1.25),
            "moe.capacity_factor = 1.25 (Hugging Face MoE is dropless: needs none)",
        ),
        ("deepseek_v3", dict(score_function="softmax"), "moe.score_function = 'softmax' (deepseek_v3 needs 'sigmoid')"),
        (
            "deepseek_v3",
            dict(score_function="sigmoid", num_shared_experts=1, shared_ffn_hidden_size=64),
            "moe.shared_ffn_hidden_size = 64 (deepseek_v3 needs none or moe_ffn_hidden_size = 512)",
        ),
        (
            "deepseek_v3",
            dict(score_function="sigmoid", num_groups=8, top_k=1),
            "moe.num_groups = 8 (deepseek_v3 needs at least 2 experts per group)",
        ),
        ("qwen3_moe", dict(score_function="sigmoid"), "moe.score_function = 'sigmoid' (qwen3_moe needs 'softmax')"),
        ("qwen3_moe", dict(expert_bias=True), "moe.expert_bias = true (qwen3_moe has no expert bias)"),
        ("mixtral", dict(num_groups=2), "moe.num_groups = 2 (mixtral needs 1)"),
        ("mixtral", dict(routed_scaling_factor=2.0), "moe.routed_scaling_factor = 2.0 (mixtral needs 1.0)"),
        ("mixtral", dict(num_shared_experts=1), "moe.num_shared_experts = 1 (mixtral has none)"),
        ("mixtral", dict(normalize=False), "moe.normalize = False with top_k = 2 (mixtral renormalises the top-k"),
        ("qwen3_moe", dict(router="hash", hash_vocab_size=32), "moe.router = 'hash' (needs 'topk')"),
    ],
)
def test_export_refuses_moe_settings_the_model_type_cannot_express(model_type: str, moe: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=f"cannot be exported as Hugging Face {model_type!r}: ") as info:
        MoEHF().config_to_hf(MoEConfig(**moe), model_type)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("case", "change", "message"),
    [
        ("deepseek-v3-groups-shared", {"scoring_func": "softmax"}, "scoring_func = 'softmax': allowed: 'sigmoid'"),
        ("deepseek-v3-groups-shared", {"topk_method": "greedy"}, "topk_method = 'greedy': allowed: 'noaux_tc'"),
        ("deepseek-v3-groups-shared", {"moe_layer_freq": 2}, "moe_layer_freq = 2: allowed: 1"),
        (
            "deepseek-v3-groups-shared",
            {"num_experts_per_tok": 1, "n_group": 1},
            "num_experts_per_tok = 1 with norm_topk_prob = true: not supported",
        ),
        ("deepseek-v3-groups-shared", {"n_group": 8}, "n_group = 8: needs at least 2 experts per group"),
        ("mixtral-window", {"router_jitter_noise": 0.1}, "router_jitter_noise = 0.1: allowed: 0.0"),
        ("qwen3-moe-sparse-step", {"use_sliding_window": True}, "use_sliding_window = true"),
        ("qwen3-moe-sparse-step", {"hidden_act": "gelu"}, "hidden_act = 'gelu': allowed: silu"),
    ],
)
def test_import_refuses_what_does_not_map_in_one_line(case: str, change: dict, message: str, tmp_path: Path) -> None:  # type: ignore[type-arg]
    config_name, _, extra = CASES[case]
    hf = getattr(transformers, config_name)(**{**COMMON, **extra}).to_dict() | change
    (tmp_path / "config.json").write_text(json.dumps(hf))  # refused from the config, before any weight is read
    with pytest.raises(UserError, match=re.escape(message)) as info:
        load_hf(tmp_path, host())
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("case", "drop"),
    [
        ("deepseek-v3-groups-shared", "model.layers.2.mlp.experts.5.up_proj.weight"),
        ("deepseek-v3-groups-shared", "model.layers.1.mlp.gate.e_score_correction_bias"),
        ("deepseek-v3-groups-shared", "model.layers.1.mlp.shared_experts.down_proj.weight"),
        ("mixtral-window", "model.layers.0.block_sparse_moe.experts.3.w2.weight"),
    ],
)
def test_import_names_a_missing_moe_tensor(case: str, drop: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    hf_model(case).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors[drop]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"missing tensor {re.escape(repr(drop))}"):
        load_hf(tmp_path, host())


def test_import_names_expert_tensors_it_would_not_use(tmp_path: Path) -> None:
    """A fused expert tensor (another converter's layout) is not silently dropped."""
    from safetensors.torch import load_file, save_file

    hf_model("qwen3-moe-sparse-step").save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.1.mlp.experts.gate_up_proj"] = torch.zeros(8, 48, 64)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"does not use, e.g. \['model.layers.1.mlp.experts.gate_up_proj'\]"):
        load_hf(tmp_path, host())


def test_the_moe_block_declares_its_mapping_through_the_core_protocol() -> None:
    from mcore.hf import HFBlockMapping, block_mapping
    from mcore_moe.block import MoE

    assert isinstance(MoE.hf, HFBlockMapping) and block_mapping(MoE, "moe", "mixtral") is MoE.hf
    with pytest.raises(UserError, match=r"block 'mlp' \('Linear'\) has no Hugging Face mapping") as info:
        block_mapping(torch.nn.Linear, "mlp", "mixtral")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="model_type = 'llama': the moe block maps deepseek_v3, qwen3_moe, mixtral"):
        MoE.hf.config_to_hf(MoEConfig(), "llama")
