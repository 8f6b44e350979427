"""The ``hash`` router (DeepSeek-V4's first MoE layers): a fixed table picks each token id's experts.

Shape legend: N tokens, H hidden size, E experts, K experts per token, V vocabulary rows of the table.

The table ``(V, K)`` int64 (a buffer: saved with the checkpoint, never trained) maps a token id to its K
distinct experts; the router's logits give only the combine weights (scores as ``topk``'s, in fp32,
renormalised when ``normalize``). It starts round-robin; ``balance(counts)`` re-packs it from token
frequencies (a tokenizer's counts over a corpus) so each expert expects a near-equal load: tokens in
falling frequency, each to the K least-loaded experts so far (greedy bin packing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mcore.errors import ConfigError, UserError
from mcore.protocols.dispatcher import RoutingDecision
from mcore_moe.router import SCORE_FUNCTIONS, scores_of


@dataclass(kw_only=True, slots=True)
class HashRouterConfig:
    num_experts: int = 8
    top_k: int = 2
    vocab_size: int = 32768
    """Rows of the table: token ids the router accepts (the model's vocabulary)."""
    score_function: str = "softmax"
    normalize: bool = True
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        for key in ("num_experts", "top_k", "vocab_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.moe.{key} = {value!r}: must be a positive int")
        if self.top_k > self.num_experts:
            raise ConfigError(f"model.moe.top_k = {self.top_k}: must be at most num_experts = {self.num_experts}")
        if self.score_function not in SCORE_FUNCTIONS:
            raise ConfigError(
                f"model.moe.score_function = {self.score_function!r}: allowed: {', '.join(SCORE_FUNCTIONS)}"
            )


def round_robin_table(vocab_size: int, num_experts: int, top_k: int) -> torch.Tensor:
    """``(V, K)``: token ``t`` goes to experts ``(t * K + j) % E`` (distinct since K <= E)."""
    ids = torch.arange(vocab_size).unsqueeze(1) * top_k + torch.arange(top_k)  # (V, K)
    return ids % num_experts


def balanced_table(counts: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """``(V, K)`` from token frequencies ``counts (V,)``: tokens in falling frequency, each to the K experts
    with the least expected load so far (ties: the lower id)."""
    table = torch.empty(counts.numel(), top_k, dtype=torch.int64)
    load = torch.zeros(num_experts, dtype=torch.float64)
    for token in torch.argsort(counts.double(), descending=True, stable=True).tolist():
        chosen = torch.argsort(load, stable=True)[:top_k]  # (K,) least loaded
        table[token] = chosen
        load[chosen] += float(counts[token])
    return table


def expected_load(table: torch.Tensor, counts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``(E,)`` tokens each expert expects under ``table`` for token frequencies ``counts``."""
    per_slot = counts.double().unsqueeze(1).expand_as(table).reshape(-1)
    return torch.zeros(num_experts, dtype=torch.float64).index_add(0, table.reshape(-1), per_slot)


class HashRouter(nn.Module):
    """Experts from a token-id table, weights from the router logits at those experts."""

    Config = HashRouterConfig

    table: torch.Tensor

    def __init__(self, config: HashRouterConfig | None = None, *, hidden_size: int) -> None:
        super().__init__()
        self.config = c = config or HashRouterConfig()
        self.weight = nn.Parameter(torch.empty(c.num_experts, hidden_size))
        self.register_buffer("table", torch.empty(c.vocab_size, c.top_k, dtype=torch.int64))
        self.token_group: Any = None  # as ``TopKRouter``'s; the table keeps no load to sum
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        if not self.weight.is_meta:
            self.weight.copy_(torch.randn(self.weight.shape, generator=generator) * std)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        c = self.config
        if not self.table.is_meta:
            self.table.copy_(round_robin_table(c.vocab_size, c.num_experts, c.top_k))

    @torch.no_grad()
    def balance(self, counts: torch.Tensor) -> None:
        """Re-pack the table from token frequencies ``counts (V,)``."""
        c = self.config
        if counts.shape != (c.vocab_size,):
            raise UserError(f"hash router: token counts of shape {tuple(counts.shape)}; expected ({c.vocab_size},)")
        self.table.copy_(balanced_table(counts.cpu(), c.num_experts, c.top_k))

    def route(self, hidden: torch.Tensor, token_ids: torch.Tensor | None, **_: object) -> RoutingDecision:
        c = self.config
        if token_ids is None:
            raise UserError("moe: the hash router needs the token ids (BlockContext.token_ids); the model gave none")
        experts = self.table[token_ids.reshape(-1)]  # (N, K)
        scores = scores_of(F.linear(hidden.float(), self.weight.float()), c.score_function)  # (N, E)
        weights = scores.gather(1, experts)  # (N, K)
        if c.normalize and c.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return RoutingDecision(experts=experts, weights=weights * c.routed_scaling_factor, num_experts=c.num_experts)

    def aux_losses(self) -> list[tuple[str, torch.Tensor]]:
        return []

    def update_bias(self, load: torch.Tensor) -> None:
        """No bias: the table decides the experts."""
