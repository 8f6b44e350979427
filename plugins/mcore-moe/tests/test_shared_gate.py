"""The shared experts' sigmoid gate (``shared_expert_gate``, Qwen3-Next) and the ``qwen3_next`` Hugging Face mapping
of the ``moe`` block (config keys, tensor names, refusals); the model-level parity is an integration test."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mcore.errors import ConfigError
from mcore.protocols import AuxLosses, BlockContext, FlopsShape
from mcore_moe.block import MoE, MoEConfig
from mcore_moe.hf_map import MoEHF
from mcore_testing.conformance.block import BlockConformance
from mcore_testing.numerics import rel_error, seeded_randn

GATED: dict[str, Any] = dict(
    num_experts=4, top_k=2, moe_ffn_hidden_size=16, num_shared_experts=1, shared_ffn_hidden_size=12
)


class TestMoESharedGateConformance(BlockConformance):
    def make_block(self, hidden_size: int) -> Any:
        return MoE(MoEConfig(**GATED, shared_expert_gate=True), hidden_size=hidden_size)


def _reference(block: MoE, x: torch.Tensor) -> torch.Tensor:
    """``sum_k w[n, k] expert_{e[n, k]}(x[n]) + sigmoid(g . x[n]) shared(x[n])``, one token at a time."""
    flat = x.reshape(-1, x.shape[-1])
    routing = block.router.route(flat)
    assert block.shared_experts is not None and block.shared_gate is not None
    rows = []
    for n in range(flat.shape[0]):
        acc = torch.zeros(flat.shape[1])
        for e, w in zip(routing.experts[n].tolist(), routing.weights[n], strict=True):
            ex = block.experts
            acc = acc + w * (ex.down[e] @ (F.silu(ex.gate[e] @ flat[n]) * (ex.up[e] @ flat[n])))
        gate = torch.sigmoid(block.shared_gate.weight[0] @ flat[n])
        rows.append(acc + gate * block.shared_experts(flat[n]))
    return torch.stack(rows).view_as(x)


def test_gated_shared_expert_matches_the_per_token_reference() -> None:
    block = MoE(MoEConfig(**GATED, shared_expert_gate=True), hidden_size=8)
    with torch.no_grad():
        block.shared_gate.weight.copy_(seeded_randn(1, 8, seed=4))  # type: ignore[union-attr]  # gates far from 0.5
    x = seeded_randn(2, 5, 8, seed=1)
    out = block(x, BlockContext(aux_losses=AuxLosses()))
    assert rel_error(out, _reference(block, x)) < 1e-6
    ungated = MoE(MoEConfig(**GATED), hidden_size=8)
    ungated.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("shared_gate")})
    assert rel_error(ungated(x, BlockContext(aux_losses=AuxLosses())), out) > 1e-2  # the gate matters


def test_shared_gate_declaration_and_flops() -> None:
    block = MoE(MoEConfig(**GATED, shared_expert_gate=True), hidden_size=8)
    spec = block.param_specs()["shared_gate.weight"]
    assert (spec.role, spec.tp, block.shared_gate.weight.shape) == ("router", "replicate", (1, 8))  # type: ignore[union-attr]
    plain = MoE(MoEConfig(**GATED), hidden_size=8)
    assert block.flops(FlopsShape(tokens=3, attended=6)) - plain.flops(FlopsShape(tokens=3, attended=6)) == 2 * 3 * 8


def test_shared_gate_needs_a_shared_expert() -> None:
    with pytest.raises(ConfigError, match=r"model\.moe\.shared_expert_gate = true: needs num_shared_experts >= 1"):
        MoEConfig(num_experts=4, top_k=2, shared_expert_gate=True)


QWEN3_NEXT_HF = dict(
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=12,
    norm_topk_prob=True,
    router_aux_loss_coef=0.001,
)


def test_qwen3_next_config_maps_both_ways() -> None:
    config = MoEHF().config_from_hf(QWEN3_NEXT_HF, "qwen3_next")
    assert (config.num_shared_experts, config.shared_ffn_hidden_size, config.shared_expert_gate) == (1, 12, True)
    assert (config.score_function, config.normalize, config.top_k, config.num_experts) == ("softmax", True, 2, 4)
    back = MoEHF().config_to_hf(config, "qwen3_next")
    assert back == QWEN3_NEXT_HF
    assert MoEHF().config_from_hf(back, "qwen3_next") == config


def test_qwen3_next_tensors_round_trip_under_their_names() -> None:
    config = MoEConfig(**GATED, shared_expert_gate=True)
    block = MoE(config, hidden_size=8)
    state = block.state_dict()
    hf = MoEHF().state_to_hf(state, config, "qwen3_next")
    assert set(hf) == {
        "gate.weight",
        "shared_expert_gate.weight",
        *(f"shared_expert.{n}_proj.weight" for n in ("gate", "up", "down")),
        *(f"experts.{e}.{n}_proj.weight" for e in range(4) for n in ("gate", "up", "down")),
    }
    back = MoEHF().state_from_hf(hf.pop, config, "qwen3_next")
    assert not hf  # every tensor read
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(shared_expert_gate=False), "moe.shared_expert_gate = false (qwen3_next gates its shared expert"),
        (dict(num_shared_experts=2, shared_expert_gate=True), "moe.num_shared_experts = 2 (qwen3_next has exactly 1)"),
        (dict(num_shared_experts=0, shared_expert_gate=False), "moe.num_shared_experts = 0 (qwen3_next has exactly 1)"),
    ],
)
def test_qwen3_next_export_refuses_what_it_cannot_express(kw: dict[str, Any], message: str) -> None:
    config = MoEConfig(**(GATED | kw))
    with pytest.raises(ValueError, match="cannot be exported as Hugging Face 'qwen3_next': ") as info:
        MoEHF().config_to_hf(config, "qwen3_next")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_other_model_types_refuse_the_shared_gate() -> None:
    gated = MoEConfig(**GATED, shared_expert_gate=True, score_function="sigmoid")
    with pytest.raises(ValueError, match=r"moe\.shared_expert_gate = true \(deepseek_v3 has no shared-expert gate\)"):
        MoEHF().config_to_hf(gated, "deepseek_v3")
    with pytest.raises(ValueError, match=r"moe\.num_shared_experts = 1 \(qwen3_moe has none\)"):
        MoEHF().config_to_hf(MoEConfig(**GATED, shared_expert_gate=True), "qwen3_moe")


def test_qwen3_next_import_refuses_a_zero_width_shared_expert() -> None:
    with pytest.raises(ValueError, match=r"shared_expert_intermediate_size = 0: allowed: an int >= 1"):
        MoEHF().config_from_hf(QWEN3_NEXT_HF | {"shared_expert_intermediate_size": 0}, "qwen3_next")
