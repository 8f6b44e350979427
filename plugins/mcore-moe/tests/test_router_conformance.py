"""The harness's ``RouterConformance`` for this plugin's routers: ``topk`` with each score function
(softmax, sigmoid with the aux-loss-free bias, group-limited sqrtsoftplus, a capacity limit that drops)
and ``hash``."""

from __future__ import annotations

from typing import Any

from mcore_moe.hash_router import HashRouter, HashRouterConfig
from mcore_moe.router import RouterConfig, TopKRouter
from mcore_testing.conformance import RouterConformance


class TestSoftmaxTopK(RouterConformance):
    def make_router(self, num_experts: int, top_k: int, hidden_size: int) -> Any:
        config = RouterConfig(num_experts=num_experts, top_k=top_k, aux_loss_coeff=0.01, z_loss_coeff=0.001)
        return TopKRouter(config, hidden_size=hidden_size)


class TestSigmoidWithBias(RouterConformance):
    def make_router(self, num_experts: int, top_k: int, hidden_size: int) -> Any:
        config = RouterConfig(
            num_experts=num_experts, top_k=top_k, score_function="sigmoid", expert_bias=True, bias_update_rate=0.1
        )
        return TopKRouter(config, hidden_size=hidden_size)


class TestGroupLimitedSqrtSoftplus(RouterConformance):
    def make_router(self, num_experts: int, top_k: int, hidden_size: int) -> Any:
        config = RouterConfig(
            num_experts=num_experts, top_k=top_k, score_function="sqrtsoftplus", num_groups=4, topk_groups=2
        )
        return TopKRouter(config, hidden_size=hidden_size)


class TestCapacityDrops(RouterConformance):
    def make_router(self, num_experts: int, top_k: int, hidden_size: int) -> Any:
        config = RouterConfig(num_experts=num_experts, top_k=top_k, capacity_factor=0.5)
        return TopKRouter(config, hidden_size=hidden_size)


class TestHash(RouterConformance):
    def make_router(self, num_experts: int, top_k: int, hidden_size: int) -> Any:
        config = HashRouterConfig(num_experts=num_experts, top_k=top_k, vocab_size=self.vocab_size)
        return HashRouter(config, hidden_size=hidden_size)
