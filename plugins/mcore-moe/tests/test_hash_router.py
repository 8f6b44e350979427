"""The ``hash`` router: experts from the token-id table, weights from the logits, a balanced table."""

from __future__ import annotations

import math

import pytest
import torch

from mcore.errors import ConfigError, UserError
from mcore.protocols import AuxLosses, BlockContext, Router
from mcore_moe.block import MoE, MoEConfig
from mcore_moe.hash_router import HashRouter, HashRouterConfig, balanced_table, expected_load, round_robin_table
from mcore_testing.numerics import assert_rel_close, seeded_randn


def test_experts_from_the_table_weights_from_the_scores() -> None:
    router = HashRouter(HashRouterConfig(num_experts=4, top_k=2, vocab_size=10), hidden_size=4)
    assert isinstance(router, Router)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    z = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    routing = router.route(z, torch.tensor([3]))
    assert routing.experts.tolist() == [[2, 3]]  # round robin: (3 * 2 + j) % 4
    s = torch.softmax(z, -1)[0, [2, 3]]
    assert_rel_close(routing.weights, (s / s.sum()).unsqueeze(0), 1e-6)


def test_table_is_saved_and_needs_token_ids() -> None:
    router = HashRouter(HashRouterConfig(num_experts=4, top_k=2, vocab_size=10), hidden_size=4)
    assert torch.equal(router.state_dict()["table"], round_robin_table(10, 4, 2))
    with pytest.raises(UserError, match="hash router needs the token ids"):
        router.route(seeded_randn(2, 4, seed=0), None)


def test_balanced_table_beats_round_robin_on_a_zipf_distribution() -> None:
    vocab, experts, k = 1000, 16, 2
    counts = 1e6 / torch.arange(1, vocab + 1).double()  # Zipf, s = 1
    counts = counts[torch.randperm(vocab, generator=torch.Generator().manual_seed(0))]  # frequent ids anywhere
    rr = expected_load(round_robin_table(vocab, experts, k), counts, experts)
    balanced_tab = balanced_table(counts, experts, k)
    balanced = expected_load(balanced_tab, counts, experts)
    assert (balanced_tab.sort(-1).values.diff(dim=-1) > 0).all()  # each token's experts are distinct
    rr_ratio, bal_ratio = float(rr.max() / rr.mean()), float(balanced.max() / balanced.mean())
    # the most frequent token alone loads its K experts with its whole count: a floor for any table
    # (here round robin 1.98 x the mean, balanced 1.07 = the floor)
    floor = float(counts.max() / (counts.sum() * k / experts))
    assert bal_ratio < rr_ratio and bal_ratio <= max(floor, 1.05) + 1e-9, (rr_ratio, bal_ratio, floor)
    assert math.isclose(float(balanced.sum()), float(counts.sum()) * k)


def test_balance_refuses_counts_of_the_wrong_size() -> None:
    router = HashRouter(HashRouterConfig(num_experts=4, top_k=2, vocab_size=10), hidden_size=4)
    with pytest.raises(UserError, match=r"token counts of shape \(9,\); expected \(10,\)"):
        router.balance(torch.ones(9))


def test_moe_block_with_the_hash_router_routes_by_token_id() -> None:
    config = MoEConfig(num_experts=4, top_k=2, moe_ffn_hidden_size=8, router="hash", hash_vocab_size=16)
    block = MoE(config, hidden_size=8)
    tokens = torch.tensor([[1, 5, 1, 9]])
    x = seeded_randn(1, 4, 8, seed=1, dtype=torch.float32).requires_grad_()
    out = block(x, BlockContext(aux_losses=AuxLosses(), token_ids=tokens))
    out.sum().backward()
    assert block.router.weight.grad is not None and x.grad is not None
    block.after_optimizer_step(lambda t: t, applied=True)
    loads = block.step_metrics(lambda t: t)
    assert [loads[f"moe/0/load/{e}"] for e in range(4)] == [0.0, 0.0, 2.0, 2.0]  # ids 1, 5, 9 -> experts 2, 3


def test_hash_router_needs_the_vocabulary_size() -> None:
    with pytest.raises(ConfigError, match="model.moe.hash_vocab_size = None"):
        MoEConfig(router="hash")
    with pytest.raises(ConfigError, match="model.moe.router = 'table': allowed: topk, hash"):
        MoEConfig(router="table")
