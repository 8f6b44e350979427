"""The ``moe`` block: conformance, the per-token reference, chunking, metrics, FLOPs, settings."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mcore.errors import ConfigError
from mcore.params import collect_param_specs
from mcore.protocols import AuxLosses, BlockContext, FlopsShape
from mcore_moe.block import MoE, MoEConfig
from mcore_testing.conformance.block import BlockConformance
from mcore_testing.numerics import assert_rel_close, seeded_generator, seeded_randn


def _config(**kw: Any) -> MoEConfig:
    base: dict[str, Any] = {"num_experts": 4, "top_k": 2, "moe_ffn_hidden_size": 16}
    return MoEConfig(**(base | kw))


class TestMoEConformance(BlockConformance):
    def make_block(self, hidden_size: int) -> Any:
        config = _config(num_shared_experts=1, aux_loss_coeff=0.01, z_loss_coeff=0.001)
        return MoE(config, hidden_size=hidden_size)


class TestMoESigmoidAllToAllConformance(BlockConformance):
    def make_block(self, hidden_size: int) -> Any:
        config = _config(score_function="sigmoid", expert_bias=True, dispatcher="alltoall", chunk_tokens=5)
        return MoE(config, hidden_size=hidden_size)


def _reference(block: MoE, x: torch.Tensor) -> torch.Tensor:
    """``sum_k w[n, k] * expert_{e[n, k]}(x[n]) + shared(x[n])``, one token and one expert at a time."""
    flat = x.reshape(-1, x.shape[-1])
    routing = block.router.route(flat)
    rows = []
    for n in range(flat.shape[0]):
        acc = torch.zeros(flat.shape[1])
        for e, w in zip(routing.experts[n].tolist(), routing.weights[n]):
            if e < 0:
                continue
            ex = block.experts
            hidden = F.silu(ex.gate[e] @ flat[n]) * (ex.up[e] @ flat[n])
            acc = acc + w * (ex.down[e] @ hidden)
        if block.shared_experts is not None:
            acc = acc + block.shared_experts(flat[n])
        rows.append(acc)
    return torch.stack(rows).view_as(x)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"num_shared_experts": 2, "shared_ffn_hidden_size": 8},
        {"score_function": "sigmoid", "num_groups": 2, "topk_groups": 1, "routed_scaling_factor": 2.0},
        {"capacity_factor": 0.5, "dispatcher": "alltoall"},
    ],
)
def test_matches_the_per_token_reference(kw: dict[str, Any]) -> None:
    block = MoE(_config(**kw), hidden_size=8)
    x = seeded_randn(2, 5, 8, seed=1)
    assert_rel_close(block(x, BlockContext(aux_losses=AuxLosses())), _reference(block, x), 1e-5)


def test_chunked_experts_give_the_same_output_and_gradients() -> None:
    x = seeded_randn(2, 8, 8, seed=2)
    outs, grads = [], []
    for chunk in (None, 3):
        block = MoE(_config(chunk_tokens=chunk), hidden_size=8)
        block.reset_parameters(seeded_generator(0))
        xi = x.clone().requires_grad_()
        out = block(xi, BlockContext(aux_losses=AuxLosses()))
        out.square().sum().backward()
        outs.append(out)
        grads.append([xi.grad, block.experts.gate.grad, block.router.weight.grad])
    assert_rel_close(outs[1], outs[0], 1e-6)
    for a, b in zip(grads[1], grads[0]):
        assert_rel_close(a, b, 1e-5)


def test_aux_losses_reach_the_collector_under_the_layer_index() -> None:
    block = MoE(_config(aux_loss_coeff=0.1, seq_aux_loss_coeff=0.2, z_loss_coeff=0.3), hidden_size=8)
    losses = AuxLosses()
    block(seeded_randn(2, 4, 8, seed=3), BlockContext(aux_losses=losses).for_layer(5))
    assert sorted(losses) == [(5, "aux"), (5, "seq_aux"), (5, "z")]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def test_step_metrics_give_relative_load_dropped_fraction_and_aux_losses() -> None:
    block = MoE(_config(capacity_factor=0.5, aux_loss_coeff=0.1), hidden_size=8)
    ctx = BlockContext(aux_losses=AuxLosses()).for_layer(3)
    assert block.step_metrics(_identity) == {}
    aux = []
    for seed in (4, 5):  # two micro-batches of one step
        block(seeded_randn(1, 8, 8, seed=seed), ctx)
        aux.append(float(ctx.aux_losses[(3, "aux")].detach()))
    block.eval()
    block(seeded_randn(1, 8, 8, seed=6), ctx)  # evaluation counts nothing
    block.train()
    block.after_optimizer_step(_identity, applied=True)
    metrics = block.step_metrics(_identity)
    loads = [metrics[f"moe/3/load/{e}"] for e in range(4)]
    assert sum(loads) == pytest.approx(4.0)  # shares of the kept rows times E
    assert metrics["moe/3/max_load"] == max(loads)
    # 32 slots, capacity ceil(0.5 * 16 / 4) = 2 per expert and call: at most 16 kept
    assert metrics["moe/3/dropped_fraction"] >= 0.5
    assert metrics["moe/3/aux/aux"] == pytest.approx(sum(aux) / 2) and aux[0] != aux[1]
    block(seeded_randn(1, 8, 8, seed=7), ctx)  # the next step counts afresh; the last step's numbers stay
    assert block.step_metrics(_identity) == metrics


def test_step_metrics_sum_over_ranks_through_reduce() -> None:
    block = MoE(_config(), hidden_size=8)
    block(seeded_randn(1, 8, 8, seed=4), BlockContext())
    block.after_optimizer_step(_identity, applied=True)
    seen: list[torch.Tensor] = []

    def doubled(t: torch.Tensor) -> torch.Tensor:  # another rank with the same counts
        seen.append(t)
        return t.mul_(2)

    one, two = block.step_metrics(_identity), block.step_metrics(doubled)
    assert len(seen) == 1 and one == two  # shares unchanged when every count doubles


def test_flops_count_active_parameters() -> None:
    block = MoE(_config(num_shared_experts=1), hidden_size=8)
    per_token = 8 * 4 + 2 * 3 * 8 * 16 + 3 * 8 * 16  # router, two routed experts, one shared expert
    assert block.flops(FlopsShape(tokens=10, attended=55)) == 2 * 10 * per_token


def test_param_specs_declare_experts_and_router() -> None:
    specs = collect_param_specs(MoE(_config(num_shared_experts=1), hidden_size=8))
    assert specs["router.weight"].role == "router"
    assert {specs[f"experts.{n}"].role for n in ("gate", "up", "down")} == {"expert"}
    assert (specs["experts.gate"].tp, specs["experts.down"].tp) == ("column", "row")
    assert specs["shared_experts.gate.weight"].role == "matrix"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"dispatcher": "nccl"}, "model.moe.dispatcher = 'nccl': allowed: allgather, alltoall"),
        ({"moe_ffn_hidden_size": 0}, "model.moe.moe_ffn_hidden_size = 0"),
        ({"chunk_tokens": 0}, "model.moe.chunk_tokens = 0"),
        ({"top_k": 9}, "model.moe.top_k = 9: must be at most num_experts = 4"),
    ],
)
def test_wrong_block_settings_are_one_line_errors(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _config(**kw)
