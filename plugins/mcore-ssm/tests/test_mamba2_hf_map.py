"""``Mamba2.hf``: the ``mamba2`` block <-> Hugging Face Nemotron-H's Mamba mixer (config keys, the row split of the
fused ``in_proj`` and ``conv1d``, refusals). Logits parity with ``transformers`` is an integration test."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch

from mcore.hf import HFBlockMapping, block_mapping
from mcore_ssm.hf_map_mamba2 import Mamba2HF
from mcore_ssm.mamba2 import Mamba2
from mcore_testing.numerics import seeded_randn

HF_KEYS: dict[str, Any] = dict(
    ssm_state_size=4,
    conv_kernel=3,
    expand=2,
    mamba_head_dim=4,
    mamba_num_heads=6,
    n_groups=2,
    chunk_size=8,
    time_step_min=0.01,
    time_step_max=0.2,
    time_step_limit=[0.0, {"__float__": "Infinity"}],
    use_conv_bias=True,
    use_bias=False,
    mamba_hidden_act="silu",
    layer_norm_epsilon=1e-6,
)


def _block(**changes: Any) -> tuple[Mamba2.Config, Mamba2]:
    config = Mamba2HF().config_from_hf(HF_KEYS | changes, "nemotron_h")
    block = Mamba2(config, hidden_size=12)
    with torch.no_grad():  # distinct values everywhere
        for seed, (_, p) in enumerate(sorted(block.named_parameters())):
            p.copy_(seeded_randn(*p.shape, seed=seed))
    return config, block


def test_the_block_declares_its_mapping_through_the_core_protocol() -> None:
    assert isinstance(Mamba2.hf, HFBlockMapping)
    assert block_mapping(Mamba2, "mamba2", "nemotron_h") is Mamba2.hf


def test_config_maps_both_ways() -> None:
    config = Mamba2HF().config_from_hf(HF_KEYS, "nemotron_h")
    assert (config.num_heads, config.headdim, config.ngroups, config.d_state, config.d_conv) == (6, 4, 2, 4, 3)
    assert (config.dt_limit_min, config.dt_limit_max, config.norm_eps) == (0.0, None, 1e-6)
    assert Mamba2HF().config_to_hf(config, "nemotron_h") == HF_KEYS
    limited = Mamba2HF().config_from_hf(HF_KEYS | {"time_step_limit": [0.01, 2.5]}, "nemotron_h")
    assert (limited.dt_limit_min, limited.dt_limit_max) == (0.01, 2.5)
    assert Mamba2HF().config_to_hf(limited, "nemotron_h")["time_step_limit"] == [0.01, 2.5]
    assert Mamba2HF().config_from_hf({"time_step_limit": [0.0, math.inf]}, "nemotron_h").dt_limit_max is None


@pytest.mark.parametrize("conv_bias", [True, False])
def test_tensors_split_as_transformers_fuses_them(conv_bias: bool) -> None:
    """``in_proj`` rows ``[z | x | B | C | dt]`` and ``conv1d`` channels ``[x | B | C]``; back to the same tensors."""
    config, block = _block(use_conv_bias=conv_bias)
    hf = Mamba2HF().state_to_hf(block.state_dict(), config, "nemotron_h")
    inner, bc, heads = 24, 8, 6
    assert hf["in_proj.weight"].shape == (2 * inner + 2 * bc + heads, 12)
    assert hf["conv1d.weight"].shape == (inner + 2 * bc, 1, 3) and ("conv1d.bias" in hf) == conv_bias
    x = seeded_randn(5, 12, seed=9)
    fused = (x @ hf["in_proj.weight"].T).split([inner, inner, bc, bc, heads], dim=-1)
    for name, theirs in zip(("z_proj", "x_proj", "b_proj", "c_proj", "dt_proj"), fused, strict=True):
        mine = x @ getattr(block, name).weight.detach().T  # another GEMM shape: rounding may differ
        assert torch.allclose(mine, theirs, rtol=1e-6, atol=1e-6), name
    assert torch.equal(hf["conv1d.weight"][inner : inner + bc, 0], block.conv_b.weight.detach())
    assert hf["A_log"].shape == hf["D"].shape == hf["dt_bias"].shape == (heads,)
    back = Mamba2HF().state_from_hf(lambda name: hf[name], config, "nemotron_h")
    state = block.state_dict()
    assert back.keys() == state.keys()
    for name, value in back.items():
        assert torch.equal(value, state[name]), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mamba_hidden_act": "relu"}, "mamba_hidden_act = 'relu': allowed: silu"),
        ({"use_bias": True}, "use_bias = true"),
        ({"time_step_limit": [0.0]}, "time_step_limit = [0.0]: allowed: [low, high]"),
        ({"time_step_limit": [0.0, "big"]}, "time_step_limit = 'big': allowed: a number"),
    ],
)
def test_config_refusals_are_one_line(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        Mamba2HF().config_from_hf(HF_KEYS | change, "nemotron_h")
    assert "\n" not in str(info.value)


def test_other_model_types_and_shapes_are_refused() -> None:
    config, block = _block()
    with pytest.raises(ValueError, match="model_type = 'llama': the mamba2 block maps nemotron_h"):
        Mamba2HF().config_to_hf(config, "llama")
    hf = Mamba2HF().state_to_hf(block.state_dict(), config, "nemotron_h")
    other = Mamba2HF().config_from_hf(HF_KEYS | {"mamba_num_heads": 4}, "nemotron_h")
    with pytest.raises(
        ValueError,
        match=re.escape("in_proj.weight has shape (70, 12); the config's heads, groups and widths need (52, 12)"),
    ):
        Mamba2HF().state_from_hf(lambda name: hf[name], other, "nemotron_h")
    with pytest.raises(ValueError, match="mamba2.num_heads = None"):
        Mamba2HF().config_to_hf(Mamba2.Config(), "nemotron_h")
