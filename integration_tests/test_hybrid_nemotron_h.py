"""Hugging Face interop of Nemotron-H (``nemotron_h``) and mcore-ssm's ``nemotron-h-mini`` preset.

mcore-models maps the skeleton (``hf_nemotron_h``: mixer-only layers, NoPE attention, squared-ReLU MLPs, norms,
embeddings, head) and the ``mamba2`` block (mcore-ssm) its layers through its ``hf`` attribute. Checked against
real ``transformers`` on tiny random configs (every parameter drawn at random, norms and ``A_log``/``D``/``dt_bias``
included): fp32 logits of an import equal theirs (rel < 1e-5); an export loads in ``transformers`` with the same
tensors and logits and imports back to the same config and tensors. What does not map (MoE layers, another MLP
activation, tied embeddings, RoPE on the attention) is refused in one line naming the key and the value.
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
from mcore_models.gpt import GPTConfig
from mcore_models.hf_blocks import HFBlocks
from mcore_models.hf_nemotron_h import config_to_hf
from mcore_testing.hosts import isolated_host
from mcore_testing.numerics import rel_error, seeded_tokens

PLUGINS = ("mcore_models.plugin", "mcore_ssm.plugin")
COMMON: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=48,
    ssm_state_size=8,
    mamba_num_heads=8,
    mamba_head_dim=8,
    n_groups=2,
    conv_kernel=4,
    chunk_size=8,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
#: case -> (config values over COMMON, tokens per row: past two Mamba chunks of 8)
CASES: dict[str, tuple[dict[str, Any], int]] = {
    "m-mlp-attn": (
        dict(layers_block_type=["linear_attention", "mlp", "full_attention", "mlp", "linear_attention"]),
        21,
    ),
    "legacy-pattern-mha-bias-limit": (
        dict(
            hybrid_override_pattern="M*-M",
            num_key_value_heads=4,
            head_dim=12,
            mlp_bias=True,
            use_conv_bias=False,
            n_groups=1,
            time_step_limit=(0.01, 0.5),
            layer_norm_epsilon=1e-6,
        ),
        17,
    ),
}


def host() -> Any:
    return isolated_host(*PLUGINS)


def hf_model(case: str, seed: int = 0) -> Any:
    """A ``transformers`` Nemotron-H of ``case`` with every parameter random (fp32, eval)."""
    extra, _ = CASES[case]
    torch.manual_seed(seed)
    model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**{**COMMON, **extra})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                p.copy_(torch.randn_like(p) * 0.5)
            elif p.dim() == 1:  # norm scales, D, biases
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out).float()


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_equals_transformers(case: str, tmp_path: Path) -> None:
    reference = hf_model(case)
    reference.save_pretrained(tmp_path)
    extra = CASES[case][0]
    if "hybrid_override_pattern" in extra:  # an older config.json: the pattern string only
        hf = json.loads((tmp_path / "config.json").read_text())
        del hf["layers_block_type"]
        (tmp_path / "config.json").write_text(
            json.dumps(hf | {"hybrid_override_pattern": extra["hybrid_override_pattern"]})
        )
    name, config, model = load_hf(tmp_path, host())
    assert name == "gpt" and config.hf_model_type == "nemotron_h"
    assert all(mlp == "none" for _, mlp in config.layer_kinds())
    tokens = seeded_tokens((2, CASES[case][1]), vocab_size=COMMON["vocab_size"], seed=1)
    err = rel_error(logits(model.eval(), tokens), logits(reference, tokens))
    assert err < 1e-5, f"{case}: logits rel error {err:.2e}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_loads_in_transformers_and_imports_back(case: str, tmp_path: Path) -> None:
    h = host()
    hf_model(case, seed=3).save_pretrained(tmp_path / "hf")
    _, config, model = load_hf(tmp_path / "hf", h)
    export_family(type(model), "gpt", config, h).export(model, config, tmp_path / "ours")
    reference = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
    theirs = {k: v for k, v in reference.state_dict().items()}
    ours_again = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "hf").float().state_dict()
    assert theirs.keys() == ours_again.keys()
    for key, value in theirs.items():
        assert torch.equal(value, ours_again[key]), f"{case}: {key} changed through import + export"
    tokens = seeded_tokens((2, CASES[case][1]), vocab_size=COMMON["vocab_size"], seed=2)
    assert rel_error(logits(model.eval(), tokens), logits(reference, tokens)) < 1e-5, case
    _, again, back = load_hf(tmp_path / "ours", h)
    assert again == config
    state = back.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"{case}: {key} changed through export + import"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layers_block_type": ["linear_attention", "moe"]}, "'moe' layers: Nemotron-H MoE layers"),
        ({"hybrid_override_pattern": "M*X", "layers_block_type": None}, "hybrid_override_pattern = 'M*X'"),
        ({"mlp_hidden_act": "gelu"}, "mlp_hidden_act = 'gelu': allowed: relu2"),
        ({"mamba_hidden_act": "relu"}, "mamba_hidden_act = 'relu': allowed: silu"),
        ({"use_bias": True}, "use_bias = true"),
        ({"time_step_limit": [0.0]}, "time_step_limit = [0.0]: allowed: [low, high]"),
    ],
)
def test_import_refuses_what_does_not_map(change: dict[str, Any], message: str, tmp_path: Path) -> None:
    hf = transformers.NemotronHConfig(**COMMON, **CASES["m-mlp-attn"][0]).to_dict()
    hf = {k: v for k, v in hf.items() if k != "time_step_limit"} | change
    hf = {k: v for k, v in hf.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(hf))  # refused from the config, before any weight is read
    with pytest.raises(UserError, match=re.escape(message)) as info:
        load_hf(tmp_path, host())
    assert "\n" not in str(info.value)


def test_import_without_the_ssm_plugin_names_it(tmp_path: Path) -> None:
    hf_model("m-mlp-attn").save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"'mamba2' layers needs block 'mamba2' from mcore-ssm") as info:
        load_hf(tmp_path, isolated_host("mcore_models.plugin"))
    assert "\n" not in str(info.value)


def _export_config(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = dict(
        hf_model_type="nemotron_h",
        vocab_size=96,
        hidden_size=32,
        num_layers=3,
        layers=["mamba2/none", "attention/none", "gelu-mlp/none"],
        attention={"num_heads": 4, "no_rope": True},
        mamba2={"num_heads": 8, "headdim": 8, "d_state": 8, "ngroups": 2},
        **{"gelu-mlp": {"ffn_hidden_size": 48, "activation": "relu2"}},
    )
    for key, value in changes.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    h = host()
    return config_to_hf(GPTConfig.from_values(values), blocks=HFBlocks(lambda b: h.load("block", b), "nemotron_h"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layers": ["mamba2/none", "attention/swiglu", "gelu-mlp/none"]}, "needs every layer mamba2/none"),
        ({"tie_embeddings": True}, "tie_embeddings = True (needs false)"),
        ({"attention": {"no_rope": False}}, "attention.no_rope = False (needs True)"),
        ({"gelu-mlp": {"activation": "gelu"}}, "gelu-mlp.activation = 'gelu' (needs 'relu2')"),
        ({"mamba2": {"norm_eps": 1e-6}}, "mamba2 writes layer_norm_epsilon = 1e-06 but the model's is 1e-05"),
        ({"mamba2": {"num_heads": None, "expand": 8}}, "mamba2.num_heads = None (needs it set"),
    ],
)
def test_export_refuses_what_nemotron_h_cannot_express(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="cannot be exported as Hugging Face 'nemotron_h': ") as info:
        _export_config(**change)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_llama_refuses_nope_attention() -> None:
    from mcore_models.hf import config_to_hf as llama_config

    with pytest.raises(ValueError, match=r"attention.no_rope = true \(needs false"):
        llama_config(GPTConfig.from_values({"num_layers": 1, "attention": {"num_heads": 4, "no_rope": True}}))


# -- the preset -----------------------------------------------------------------------------------
def test_nemotron_h_mini_builds_and_exports_with_transformers_shapes(tmp_path: Path) -> None:
    """Full size on the meta device: the pattern M-M-*-M-M-*-, and its export config builds a ``transformers``
    model of the same parameter count; a small variant exports and loads with our logits."""
    h = host()
    assert h.get("preset", "nemotron-h-mini").source.distribution == "mcore-ssm"
    selection = resolve_model({"preset": "nemotron-h-mini"}, h)
    config = selection.config
    model = selection.implementation.load().build(
        config, seed=0, device="meta", block_lookup=lambda b: h.load("block", b)
    )
    letters = {"mamba2": "M", "attention": "*", "gelu-mlp": "-"}
    assert "".join(letters[mixer] for mixer, _ in config.layer_kinds()) == "M-M-*-" * 2
    hf = config_to_hf(config, blocks=HFBlocks(lambda b: h.load("block", b), "nemotron_h"))
    (tmp_path / "config.json").write_text(json.dumps(hf))  # as export writes it
    with torch.device("meta"):
        theirs = transformers.NemotronHForCausalLM(transformers.NemotronHConfig.from_pretrained(tmp_path))
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in model.parameters())


def test_nemotron_h_mini_small_exports_to_transformers(tmp_path: Path) -> None:
    h = host()
    small = dict(
        vocab_size=96,
        hidden_size=64,
        num_layers=6,
        layers=["mamba2/none", "gelu-mlp/none", "attention/none", "mamba2/none", "gelu-mlp/none", "attention/none"],
        mamba2=dict(d_state=8, headdim=8, num_heads=8, ngroups=2, chunk_size=8),
        attention=dict(num_heads=4, num_kv_heads=2, head_dim=16),
        **{"gelu-mlp": dict(ffn_hidden_size=96)},
    )
    selection = resolve_model({"preset": "nemotron-h-mini", **small}, h)
    factory, config = selection.implementation.load(), selection.config
    model = factory.build(config, seed=3, device="cpu", block_lookup=lambda b: h.load("block", b)).eval()
    export_family(factory, "gpt", config, h).export(model, config, tmp_path)
    reference = transformers.NemotronHForCausalLM.from_pretrained(tmp_path).float().eval()
    tokens = seeded_tokens((2, 19), vocab_size=config.vocab_size, seed=2)
    assert rel_error(logits(model, tokens), logits(reference, tokens)) < 1e-5
