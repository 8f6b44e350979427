"""The conformance suites run against small test-local implementations of each protocol.

These implementations exist only to prove that the suites pass on correct code; the tests
of ``test_suites_catch_bugs.py`` prove they fail on wrong code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from mcore.protocols import BlockContext, DispatchResult, FlopsShape, RoutingDecision
from mcore_testing.conformance import BlockConformance, DispatcherConformance, LayoutConformance
from mcore_testing.layouts import AllReduceLayout
from mcore_testing.reference import TinyConfig
from mcore_testing.split_layouts import PipelineLayout, SequenceSplitLayout


class TestAllReduceLayout(LayoutConformance):
    world_size = 2
    fill_dim = "dp_replicate"

    def make_layout(self) -> AllReduceLayout:
        return AllReduceLayout()


class TestSequenceSplitLayout(LayoutConformance):
    """A layout that splits the sequence: ``shard_batch``, ``loss_group``, a context attention backend."""

    world_size = 2
    fill_dim = "cp"

    def make_layout(self) -> SequenceSplitLayout:
        return SequenceSplitLayout()


class TestPipelineLayout(LayoutConformance):
    """A layout that cuts stages and runs their schedule (``forward_backward``), 3 stages of 4 layers."""

    world_size = 3
    fill_dim = "pp"

    def make_layout(self) -> PipelineLayout:
        return PipelineLayout()

    def model_config(self) -> TinyConfig:
        return TinyConfig(num_layers=4)


class DocumentAttention(nn.Module):
    """Single-head causal attention that respects ``ctx.cu_seqlens`` (a block-diagonal mask)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        B, T, H = hidden.shape
        q, k, v = self.qkv(hidden).split(H, dim=-1)  # 3 x (B, T, H)
        mask = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T) causal
        if ctx.cu_seqlens is not None:
            doc = torch.zeros(B * T, dtype=torch.long)
            doc[ctx.cu_seqlens[1:-1].long()] = 1
            doc = doc.cumsum(0).view(B, T)  # (B, T) document index of each token
            mask = mask & (doc[:, :, None] == doc[:, None, :])  # (B, T, T)
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops(self, shape: FlopsShape) -> int:
        h = self.out.in_features
        return 2 * shape.tokens * 4 * h * h + 4 * shape.attended * h

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


class TestDocumentAttention(BlockConformance):
    def make_block(self, hidden_size: int) -> DocumentAttention:
        return DocumentAttention(hidden_size)


class AllGatherDispatcher:
    """Every rank gathers all tokens, keeps the rows of its experts, and all-reduces the result."""

    def __init__(self, group: Any, num_experts: int) -> None:
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.local = num_experts // self.world

    def dispatch(self, hidden: torch.Tensor, routing: RoutingDecision) -> DispatchResult:
        if self.group is not None:
            hidden_all = torch.cat(dist_fn.all_gather(hidden, group=self.group))  # (world * N, H)
            experts = [torch.empty_like(routing.experts) for _ in range(self.world)]
            weights = [torch.empty_like(routing.weights) for _ in range(self.world)]
            dist.all_gather(experts, routing.experts, group=self.group)
            dist.all_gather(weights, routing.weights, group=self.group)
            experts_all, weights_all = torch.cat(experts), torch.cat(weights)  # (world * N, K)
        else:
            hidden_all, experts_all, weights_all = hidden, routing.experts, routing.weights
        local = experts_all - self.rank * self.local  # (world * N, K) local expert index
        token, slot = ((local >= 0) & (local < self.local)).nonzero(as_tuple=True)  # (M,)
        order = torch.argsort(local[token, slot], stable=True)
        token, slot = token[order], slot[order]
        counts = torch.bincount(local[token, slot], minlength=self.local)
        return DispatchResult(
            tokens=hidden_all[token],
            tokens_per_expert=counts,
            weights=weights_all[token, slot],
            handle=(token, hidden.shape[0], hidden_all.shape[0]),
        )

    def combine(self, expert_out: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        token, n_local, n_all = result.handle
        out_all = torch.zeros(n_all, expert_out.shape[1], dtype=expert_out.dtype)
        out_all = out_all.index_add(0, token, expert_out * result.weights[:, None])  # (world * N, H)
        if self.group is not None:
            out_all = dist_fn.all_reduce(out_all, group=self.group)
        return out_all[self.rank * n_local : (self.rank + 1) * n_local]


class TestAllGatherDispatcher(DispatcherConformance):
    def make_dispatcher(self, group: Any, num_experts: int) -> AllGatherDispatcher:
        return AllGatherDispatcher(group, num_experts)
