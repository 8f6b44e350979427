"""The ``topk`` router: which experts each token goes to, with what weight, and the balancing around it.

Shape legend: N tokens, H hidden size, E experts, K experts per token (top-k), G expert groups,
S sequences (rows) among the N tokens.

Notable:

* scores in fp32: ``softmax`` (before top-k; or after it, over the chosen logits, with
  ``softmax_after_topk``), ``sigmoid``, ``sqrtsoftplus`` (``sqrt(softplus(z))``);
* the choice uses ``s + bias`` (aux-loss-free balancing, DeepSeek-V3), the combine weights use ``s``,
  renormalised to sum 1 when ``normalize`` and multiplied by ``routed_scaling_factor``;
* group-limited top-k: experts split into ``num_groups`` groups, each scored by the sum of its two best
  ``s + bias``; only the ``topk_groups`` best groups are eligible;
* auxiliary losses for the last call (``aux_losses()``), already scaled: ``aux`` (Switch load balance),
  ``seq_aux`` (the same per sequence, averaged), ``z`` (mean squared logsumexp of the logits);
* the expert bias is an fp32 buffer (in the ``state_dict``, outside the optimizer), moved after the
  optimizer step by ``after_optimizer_step`` (``mcore.protocols.step``) from the step's load summed
  over the ranks that saw distinct tokens (and over ``token_group``, the tp ranks that each routed a share of
  the same tokens);
* capacity (``capacity_factor``): each expert keeps at most ``ceil(factor * N * K / E)`` token slots of the
  call, chosen by weight (``drop_policy = "probs"``) or token order (``"position"``); a dropped slot has
  expert id ``-1`` and weight 0, which this plugin's dispatchers skip. ``None``: dropless.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mcore.errors import ConfigError
from mcore.protocols.dispatcher import RoutingDecision

#: Values of ``score_function``.
SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
#: Values of ``drop_policy``.
DROP_POLICIES = ("probs", "position")
#: Expert id of a token slot dropped by the capacity limit.
DROPPED = -1


@dataclass(kw_only=True, slots=True)
class RouterConfig:
    """The router's settings (part of the ``[model.moe]`` table)."""

    num_experts: int = 8
    """E: routed experts."""
    top_k: int = 2
    """K: experts per token (<= num_experts)."""
    score_function: str = "softmax"
    """'softmax', 'sigmoid' or 'sqrtsoftplus' (computed in fp32)."""
    softmax_after_topk: bool = False
    """softmax only: choose the top-k logits, then softmax over them (Mixtral); else softmax over all experts first."""
    normalize: bool = True
    """Renormalise the top-k weights of a token to sum 1 (ignored by softmax_after_topk, which sums to 1)."""
    routed_scaling_factor: float = 1.0
    """Multiplies the combine weights (DeepSeek-V3: 2.5)."""
    num_groups: int = 1
    """G: expert groups for group-limited routing (divides num_experts); 1: no groups."""
    topk_groups: int = 1
    """Groups each token may choose from (<= num_groups); only used when num_groups > 1."""
    expert_bias: bool = False
    """Aux-loss-free balancing: choose by s + bias, move the bias after each optimizer step."""
    bias_update_rate: float = 1e-3
    """b += rate * sign(mean(load) - load) after each step (expert_bias only)."""
    aux_loss_coeff: float = 0.0
    """Coefficient of the load-balancing loss over the call's tokens (0: off)."""
    seq_aux_loss_coeff: float = 0.0
    """Coefficient of the per-sequence load-balancing loss (DeepSeek-V3; 0: off)."""
    z_loss_coeff: float = 0.0
    """Coefficient of the router z-loss (0: off)."""
    capacity_factor: float | None = None
    """Token slots per expert as a multiple of the even share N*K/E (None: dropless)."""
    drop_policy: str = "probs"
    """Over capacity, keep the highest weights ('probs') or the earliest tokens ('position')."""

    def __post_init__(self) -> None:
        check_router(self)


def _fail(key: str, value: object, allowed: str) -> None:
    raise ConfigError(f"model.moe.{key} = {value!r}: {allowed}")


def check_router(c: RouterConfig) -> None:
    """One-line ``ConfigError`` naming the first wrong key of ``c``."""
    for key in ("num_experts", "top_k", "num_groups", "topk_groups"):
        value = getattr(c, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(key, value, "must be a positive int")
    if c.top_k > c.num_experts:
        _fail("top_k", c.top_k, f"must be at most num_experts = {c.num_experts}")
    if c.score_function not in SCORE_FUNCTIONS:
        _fail("score_function", c.score_function, f"allowed: {', '.join(SCORE_FUNCTIONS)}")
    if c.softmax_after_topk and c.score_function != "softmax":
        _fail("softmax_after_topk", True, f"only with score_function = 'softmax' (got {c.score_function!r})")
    if c.num_experts % c.num_groups:
        _fail("num_groups", c.num_groups, f"must divide num_experts = {c.num_experts}")
    if c.num_groups > 1 and c.topk_groups > c.num_groups:
        _fail("topk_groups", c.topk_groups, f"must be at most num_groups = {c.num_groups}")
    if c.num_groups > 1 and c.top_k > c.topk_groups * (c.num_experts // c.num_groups):
        _fail(
            "top_k",
            c.top_k,
            f"must be at most topk_groups * experts per group = {c.topk_groups * (c.num_experts // c.num_groups)}",
        )
    for key in ("routed_scaling_factor", "bias_update_rate", "aux_loss_coeff", "seq_aux_loss_coeff", "z_loss_coeff"):
        value = getattr(c, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            _fail(key, value, "must be a finite number >= 0")
    if c.capacity_factor is not None and (
        isinstance(c.capacity_factor, bool)
        or not isinstance(c.capacity_factor, (int, float))
        or not math.isfinite(c.capacity_factor)
        or c.capacity_factor <= 0
    ):
        _fail("capacity_factor", c.capacity_factor, "must be a finite number > 0, or none for dropless")
    if c.drop_policy not in DROP_POLICIES:
        _fail("drop_policy", c.drop_policy, f"allowed: {', '.join(DROP_POLICIES)}")


def scores_of(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """``(N, E)`` fp32 logits -> ``(N, E)`` scores."""
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1)
    if score_function == "sigmoid":
        return torch.sigmoid(logits)
    return torch.sqrt(F.softplus(logits))


def group_limited_mask(choice: torch.Tensor, num_groups: int, topk_groups: int) -> torch.Tensor:
    """``(N, E)`` choice scores -> ``(N, E)`` bool: experts in each token's ``topk_groups`` best groups, a group
    scored by the sum of its two best choice scores (its one score when a group holds one expert)."""
    n, e = choice.shape
    grouped = choice.view(n, num_groups, e // num_groups)  # (N, G, E/G)
    group_score = grouped.topk(min(2, e // num_groups), dim=-1).values.sum(-1)  # (N, G)
    best = group_score.topk(topk_groups, dim=-1).indices  # (N, topk_groups)
    keep = torch.zeros(n, num_groups, dtype=torch.bool, device=choice.device).scatter_(1, best, True)
    return keep.unsqueeze(-1).expand(n, num_groups, e // num_groups).reshape(n, e)


def expert_counts(experts: torch.Tensor, num_experts: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``(E,)`` fp32: how many of ``experts``' ids (any shape, each in ``0..E-1``) name each expert, each
    counted with its ``weights`` when given. A scatter-add, not ``bincount``: no data-dependent output
    size, so it runs under fake tensors (``mcore plan``) and never syncs with the host."""
    ids = experts.reshape(-1)
    ones = torch.ones(ids.shape, dtype=torch.float32, device=ids.device) if weights is None else weights.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.float32, device=ids.device).scatter_add_(0, ids, ones.float())


def balance_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch-style load-balancing loss of one set of tokens: ``E * sum_e f_e * P_e`` with ``f_e`` the
    fraction of the ``N * K`` chosen slots that went to ``e`` (no gradient) and ``P_e`` the mean over tokens
    of ``probs[:, e]`` (per-token scores normalised to sum 1). 1 when perfectly balanced."""
    n, k = experts.shape
    counts = expert_counts(experts, num_experts).to(probs.dtype)  # (E,)
    fraction = counts / max(n * k, 1)
    return num_experts * (fraction * probs.mean(0)).sum()


def capacity_keep(
    experts: torch.Tensor, weights: torch.Tensor, capacity: int, num_experts: int, *, by_weight: bool
) -> torch.Tensor:
    """``(N, K)`` bool: the slots each expert keeps, at most ``capacity`` of them, the highest ``weights``
    first (``by_weight``) or in token order."""
    flat = experts.reshape(-1)  # (N*K,) token-major
    order = torch.argsort(weights.detach().reshape(-1), descending=True, stable=True) if by_weight else None
    ranked = flat if order is None else flat[order]
    one_hot = F.one_hot(ranked, num_experts)  # (N*K, E)
    rank = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # (N*K,) place of each slot in its expert's queue
    keep = rank < capacity
    if order is not None:
        keep = torch.empty_like(keep).scatter_(0, order, keep)
    return keep.view_as(experts)


class TopKRouter(nn.Module):
    """Scores ``E`` experts with one ``(E, H)`` matrix (role ``router``) and keeps each token's top ``K``."""

    Config = RouterConfig

    expert_bias: torch.Tensor
    step_load: torch.Tensor

    def __init__(self, config: RouterConfig | None = None, *, hidden_size: int) -> None:
        super().__init__()
        self.config = c = config or RouterConfig()
        self.weight = nn.Parameter(torch.empty(c.num_experts, hidden_size))
        # fp32 bias, saved with the model, never seen by the optimizer; zeros when expert_bias is off
        self.register_buffer("expert_bias", torch.zeros(c.num_experts, dtype=torch.float32))
        # tokens per expert chosen during this optimizer step (not saved: a step never spans a checkpoint)
        self.register_buffer("step_load", torch.zeros(c.num_experts, dtype=torch.float32), persistent=False)
        self._aux: list[tuple[str, torch.Tensor]] = []
        #: ranks that each route a share of this rank's tokens (tp, set by the ``ep`` layout): load summed over them
        self.token_group: Any = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        if not self.weight.is_meta:
            self.weight.copy_(torch.randn(self.weight.shape, generator=generator) * std)
        self.reset_buffers()

    def _apply(self, fn: Callable[..., torch.Tensor], recurse: bool = True) -> TopKRouter:  # type: ignore[override]
        """``.to(dtype)``, ``.half()``... move the buffers but keep them fp32: a bias moved by 1e-3 per step
        would stall in bf16."""
        kept = {name: getattr(self, name) for name in ("expert_bias", "step_load")}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            moved = getattr(self, name)
            if moved.dtype != torch.float32:
                self._buffers[name] = before.to(device=moved.device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def reset_buffers(self) -> None:
        self.expert_bias.zero_()
        self.step_load.zero_()

    # -- routing ---------------------------------------------------------------------------------
    def route(
        self,
        hidden: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        *,
        num_sequences: int = 1,
        inference: bool = False,
    ) -> RoutingDecision:
        """``hidden`` ``(N, H)`` -> the ``RoutingDecision``; ``num_sequences`` rows of ``N / S`` tokens each
        (for the sequence aux loss). Records the call's aux losses and, in training, its load. ``inference``:
        dropless whatever ``capacity_factor`` (no slot dropped), no aux losses, no load counted (no bias update)."""
        c = self.config
        logits = F.linear(hidden.float(), self.weight.float())  # (N, E) fp32
        scores = scores_of(logits, c.score_function)  # (N, E)
        choice = (logits if c.softmax_after_topk else scores).detach()
        if c.expert_bias:
            choice = choice + self.expert_bias
        if c.num_groups > 1:
            eligible = group_limited_mask(choice, c.num_groups, c.topk_groups)
            choice = choice.masked_fill(~eligible, float("-inf"))
        experts = choice.topk(c.top_k, dim=-1).indices  # (N, K)
        if c.softmax_after_topk:
            weights = torch.softmax(logits.gather(1, experts), dim=-1)  # (N, K)
        else:
            weights = scores.gather(1, experts)  # (N, K)
            if c.normalize and c.top_k > 1:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * c.routed_scaling_factor

        if inference:
            self._aux = []
            return RoutingDecision(experts=experts, weights=weights, num_experts=c.num_experts)
        self._aux = self._losses(logits, scores, experts, num_sequences)
        if self.training and torch._C._current_graph_task_id() == -1:  # not a recompute during backward
            self.step_load += expert_counts(experts, c.num_experts)
        if c.capacity_factor is not None:
            capacity = math.ceil(c.capacity_factor * experts.numel() / c.num_experts)
            keep = capacity_keep(experts, weights, capacity, c.num_experts, by_weight=c.drop_policy == "probs")
            experts = experts.masked_fill(~keep, DROPPED)
            weights = weights * keep
        return RoutingDecision(experts=experts, weights=weights, num_experts=c.num_experts)

    def _losses(
        self, logits: torch.Tensor, scores: torch.Tensor, experts: torch.Tensor, num_sequences: int
    ) -> list[tuple[str, torch.Tensor]]:
        c = self.config
        out: list[tuple[str, torch.Tensor]] = []
        if c.aux_loss_coeff or c.seq_aux_loss_coeff:
            full = torch.softmax(logits, dim=-1) if c.score_function == "softmax" else scores
            probs = full / (full.sum(-1, keepdim=True) + 1e-20)  # (N, E), each row sums to 1
        if c.aux_loss_coeff:
            out.append(("aux", c.aux_loss_coeff * balance_loss(probs, experts, c.num_experts)))
        if c.seq_aux_loss_coeff:
            n = probs.shape[0]
            if n % num_sequences:
                raise ValueError(f"router: {n} tokens do not split into {num_sequences} sequences")
            per_seq = [
                balance_loss(p, e, c.num_experts)
                for p, e in zip(probs.split(n // num_sequences), experts.split(n // num_sequences))
            ]
            out.append(("seq_aux", c.seq_aux_loss_coeff * torch.stack(per_seq).mean()))
        if c.z_loss_coeff:
            out.append(("z", c.z_loss_coeff * torch.logsumexp(logits, dim=-1).square().mean()))
        return out

    def aux_losses(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, loss)`` of the last ``route`` call, each already multiplied by its coefficient."""
        return list(self._aux)

    # -- aux-loss-free balancing ---------------------------------------------------------------
    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """``b += rate * sign(mean(load) - load)`` from the step's tokens per expert ``(E,)``."""
        load = load.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.config.bias_update_rate * torch.sign(load.mean() - load)

    @torch.no_grad()
    def after_optimizer_step(self, reduce: Callable[[torch.Tensor], torch.Tensor], *, applied: bool) -> None:
        """Sum the step's load over the ranks that saw distinct tokens (``reduce``) and move the bias (only
        when the step was ``applied``); forget the step's counts either way."""
        if self.config.expert_bias:
            load = reduce(self.step_load.clone())
            if self.token_group is not None:  # the tp ranks each routed a share of the same micro-batches
                from mcore_moe.comm import sum_over_ranks

                load = sum_over_ranks(load, self.token_group)
            if applied:
                self.update_bias(load)
        self.step_load.zero_()
