"""``GatedDeltaNet.hf``: the ``gdn`` block <-> Hugging Face Qwen3-Next's ``linear_attn`` (config keys, the per-head
regrouping of the fused projections, refusals). Logits parity with ``transformers`` is an integration test."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mcore.hf import HFBlockMapping, block_mapping
from mcore_ssm.gdn import GatedDeltaNet
from mcore_ssm.hf_map import GatedDeltaNetHF
from mcore_testing.numerics import seeded_randn

HF_KEYS: dict[str, Any] = dict(
    linear_num_key_heads=2,
    linear_num_value_heads=6,
    linear_key_head_dim=8,
    linear_value_head_dim=4,
    linear_conv_kernel_dim=3,
    rms_norm_eps=1e-5,
)


def _block() -> tuple[GatedDeltaNet.Config, GatedDeltaNet]:
    config = GatedDeltaNetHF().config_from_hf(HF_KEYS, "qwen3_next")
    block = GatedDeltaNet(config, hidden_size=16)
    with torch.no_grad():  # distinct values everywhere
        for seed, (_, p) in enumerate(sorted(block.named_parameters())):
            p.copy_(seeded_randn(*p.shape, seed=seed))
    return config, block


def test_the_block_declares_its_mapping_through_the_core_protocol() -> None:
    assert isinstance(GatedDeltaNet.hf, HFBlockMapping)
    assert block_mapping(GatedDeltaNet, "gdn", "qwen3_next") is GatedDeltaNet.hf


def test_config_maps_both_ways() -> None:
    config = GatedDeltaNetHF().config_from_hf(HF_KEYS, "qwen3_next")
    assert (config.num_qk_heads, config.num_v_heads, config.head_k_dim, config.head_v_dim) == (2, 6, 8, 4)
    assert (config.conv_kernel, config.norm_eps, config.out_bias) == (3, 1e-5, False)
    assert GatedDeltaNetHF().config_to_hf(config, "qwen3_next") == HF_KEYS


def test_tensors_regroup_as_transformers_splits_its_fused_projections() -> None:
    """Hugging Face's per-head split of ``in_proj_qkvz``/``in_proj_ba`` (written out here) gives our projections."""
    config, block = _block()
    hf = GatedDeltaNetHF().state_to_hf(block.state_dict(), config, "qwen3_next")
    hk, hv, dk, dv, r = 2, 6, 8, 4, 3
    x = seeded_randn(5, 16, seed=9)
    qkvz = (x @ hf["in_proj_qkvz.weight"].T).view(5, hk, 2 * dk + 2 * r * dv)
    q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], dim=-1)
    b, a = (x @ hf["in_proj_ba.weight"].T).view(5, hk, 2 * r).split([r, r], dim=-1)
    for ours, theirs in (("q", q), ("k", k), ("v", v), ("z", z), ("b", b), ("a", a)):
        mine = x @ getattr(block, ours).weight.detach().T  # (5, rows): heads in order, value head g * r + i
        assert torch.allclose(mine, theirs.reshape(5, -1), rtol=1e-6, atol=1e-6), ours
    conv = hf["conv1d.weight"]  # (2 hk dk + hv dv, 1, K) over [q | k | v]
    assert conv.shape == (2 * hk * dk + hv * dv, 1, 3)
    assert torch.equal(conv[hk * dk : 2 * hk * dk, 0], block.conv_k.weight)
    assert torch.equal(hf["dt_bias"], block.a.bias) and hf["A_log"].shape == (hv,)
    assert torch.equal(hf["norm.weight"], block.norm_weight) and torch.equal(hf["out_proj.weight"], block.out.weight)


def test_tensors_round_trip_exactly_and_all_are_read() -> None:
    config, block = _block()
    state = block.state_dict()
    hf = GatedDeltaNetHF().state_to_hf(state, config, "qwen3_next")
    back = GatedDeltaNetHF().state_from_hf(hf.pop, config, "qwen3_next")
    assert not hf and set(back) == set(state)
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key


def test_a_tensor_of_the_wrong_shape_is_named() -> None:
    config, block = _block()
    hf = GatedDeltaNetHF().state_to_hf(block.state_dict(), config, "qwen3_next")
    hf["in_proj_ba.weight"] = hf["in_proj_ba.weight"][:-2]
    with pytest.raises(ValueError, match=r"tensor in_proj_ba.weight has shape \(10, 16\); the config's heads need"):
        GatedDeltaNetHF().state_from_hf(hf.pop, config, "qwen3_next")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(out_bias=True), "gdn.out_bias = true (needs false)"),
        (dict(head_k_dim=None), "gdn.head_k_dim = None (needs it set: it is linear_key_head_dim)"),
    ],
)
def test_export_refuses_what_qwen3_next_cannot_express(change: dict[str, Any], message: str) -> None:
    config = GatedDeltaNet.Config(**(dict(num_qk_heads=2, num_v_heads=4, head_k_dim=8) | change))
    with pytest.raises(ValueError, match="cannot be exported as Hugging Face 'qwen3_next': ") as info:
        GatedDeltaNetHF().config_to_hf(config, "qwen3_next")
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("hf", "model_type", "message"),
    [
        (HF_KEYS, "llama", "model_type = 'llama': the gdn block maps qwen3_next"),
        (HF_KEYS | {"hidden_act": "gelu"}, "qwen3_next", "hidden_act = 'gelu': allowed: silu"),
        (HF_KEYS | {"linear_num_value_heads": 5}, "qwen3_next", "linear_num_value_heads = 5: allowed: a multiple of"),
    ],
)
def test_import_refuses_what_does_not_map(hf: dict[str, Any], model_type: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GatedDeltaNetHF().config_from_hf(hf, model_type)
