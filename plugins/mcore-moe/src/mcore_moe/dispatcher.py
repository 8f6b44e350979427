"""Token dispatchers (``mcore.protocols.dispatcher.TokenDispatcher``): routed rows to their experts and back.

Shape legend: N tokens on this rank, H hidden size, K experts per token, E experts, W ranks of the ep
group, E_l = E / W experts per rank, S token slots this rank sends, M rows its experts receive.

Both dispatchers take the ep process group (``None``: every expert is local, no communication) and E;
rank ``r`` owns experts ``r * E_l .. (r + 1) * E_l - 1``. Slots the router dropped (expert id ``-1``,
``mcore_moe.router.DROPPED``) go nowhere and contribute zero. ``combine`` multiplies each expert row by
its routing weight on the rank that owns the token (so the weights' gradient needs no communication
with ``alltoall``) and accumulates the K contributions in fp32. On CUDA with Triton both directions go by
the known permutation (``mcore_moe.permute``): the rows are one gather of the tokens (backward: each token's
rows summed), the combine gathers each token's K rows and sums them in fp32 registers (no ``index_add``, a
deterministic backward); elsewhere the torch path below (advanced indexing, fp32 ``index_add``) is the reference.

* ``allgather``: every rank gathers all tokens of the group (padded to the longest rank) with their
  routing, runs its experts on the rows that chose them, and a sum-scatter returns each rank its tokens'
  outputs. Simple and friendly to expert TP; moves W times the tokens.
* ``alltoall``: the per-expert row counts are exchanged first (one small all-to-all), then one
  all-to-all sends each routed row to its expert's rank; the received rows, in (source rank, local expert)
  order, are permuted to local expert order. ``combine`` runs the inverse.
* ``allgatherv``: ``allgather`` with static shapes and no device-to-host sync (inference, CUDA graphs):
  every rank's tokens padded to ``max_tokens`` (C) rows, gathered, and the slots of local experts sorted
  to the front of a fixed buffer of ``W * C * min(K, E_l)`` rows (the most a rank can receive); the
  counts stay on the device and the buffer's unused rows are padding that ``combine`` ignores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mcore.errors import ConfigError
from mcore.protocols.dispatcher import DispatchResult, RoutingDecision
from mcore_moe.kernel_choice import use_triton
from mcore_moe.permute import combine_rows, permute_rows, slot_positions, slot_positions_padded


def _group_size(group: Any) -> tuple[int, int]:
    """``(world, rank)`` of ``group``; ``(1, 0)`` for ``None``."""
    if group is None:
        return 1, 0
    import torch.distributed as dist

    return dist.get_world_size(group), dist.get_rank(group)


def _experts_per_rank(num_experts: int, world: int) -> int:
    if num_experts % world:
        raise ConfigError(f"moe: num_experts = {num_experts} is not divisible by the ep size {world}")
    return num_experts // world


def local_slots(experts: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots of ``experts`` ``(N, K)`` that chose experts ``first .. first + count - 1``, sorted by expert
    (stable: token order within an expert): ``(slots (M,), tokens_per_expert (count,))``; slot ``s`` is
    token ``s // K``'s choice ``s % K``."""
    flat = experts.reshape(-1)  # (N*K,)
    local = flat - first
    slots = ((local >= 0) & (local < count)).nonzero().squeeze(1)  # (M,)
    local = local[slots]
    order = torch.argsort(local, stable=True)
    counts = torch.zeros(count, dtype=torch.long, device=local.device).scatter_add_(0, local, torch.ones_like(local))
    return slots[order], counts  # (scatter_add: bincount would read the largest id back to the host)


def _weighted_sum(rows: torch.Tensor, weights: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """``out[t] = sum of rows[i] * weights[i] over i with tokens[i] == t`` ``(n, H)`` (fp32 accumulation)."""
    out = rows.new_zeros((n, rows.shape[1]), dtype=torch.float32)
    return out.index_add(0, tokens, rows.float() * weights.float().unsqueeze(-1)).to(rows.dtype)


@dataclass(frozen=True)
class _Fused:
    """The permutation for ``mcore_moe.permute`` (set when the Triton path runs)."""

    positions: torch.Tensor  # (N', K) row of each slot, -1 where none (N': the tokens combined)
    weights: torch.Tensor  # (N', K) routing weights in slot order (differentiable)


def _fused(hidden: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> _Fused | None:
    """The permutation of ``slots (M,)`` (the slot of each row) among ``weights (N', K)``'s slots, where Triton runs."""
    if not use_triton(hidden):
        return None
    positions = slot_positions(slots, weights.numel()).view(weights.shape)  # (N', K)
    return _Fused(positions, weights)


def _permute(hidden: torch.Tensor, tokens: torch.Tensor, fused: _Fused | None) -> torch.Tensor:
    """``hidden[tokens]`` ``(M, H)``: by ``permute_rows`` when fused, else advanced indexing (the reference)."""
    return hidden[tokens] if fused is None else permute_rows(hidden, tokens, fused.positions)


@dataclass(frozen=True)
class _GatherHandle:
    tokens: torch.Tensor  # (M,) row of each expert input among the gathered tokens
    weights: torch.Tensor  # (M,) its routing weight (differentiable)
    gathered: int  # rows gathered (W * longest N)
    num_tokens: int  # N on this rank
    longest: int  # longest N of the group
    fused: _Fused | None  # the Triton path's permutation (None: the torch reference)


class _GroupDispatcher:
    """What every dispatcher holds: the ep group (``None``: one rank), its size and rank, E and E_l."""

    def __init__(self, group: Any, num_experts: int) -> None:
        self.group = group
        self.world, self.rank = _group_size(group)
        self.num_experts = num_experts
        self.local_experts = _experts_per_rank(num_experts, self.world)


class AllGatherDispatcher(_GroupDispatcher):
    """``allgather``: gather the group's tokens, compute local experts, sum-scatter the outputs back."""

    def dispatch(self, hidden: torch.Tensor, routing: RoutingDecision) -> DispatchResult:
        n, k = routing.experts.shape
        experts, weights, longest = routing.experts, routing.weights, n
        if self.world > 1:
            from mcore_moe.comm import gather_rows

            longest = int(gather_rows(torch.tensor([n], device=hidden.device), self.group).max())
            pad = longest - n
            if pad:  # padded rows choose no expert
                hidden = torch.cat([hidden, hidden.new_zeros(pad, hidden.shape[1])])
                experts = torch.cat([experts, experts.new_full((pad, k), -1)])
                weights = torch.cat([weights, weights.new_zeros(pad, k)])
            hidden = gather_rows(hidden, self.group)  # (W * longest, H)
            experts = gather_rows(experts, self.group)  # (W * longest, K)
            weights = gather_rows(weights, self.group)
        slots, counts = local_slots(experts, self.rank * self.local_experts, self.local_experts)
        tokens = torch.div(slots, k, rounding_mode="floor")
        fused = _fused(hidden, slots, weights)
        handle = _GatherHandle(tokens, weights.reshape(-1)[slots], hidden.shape[0], n, longest, fused)
        rows = _permute(hidden, tokens, fused)  # (M, H)
        return DispatchResult(tokens=rows, tokens_per_expert=counts, weights=handle.weights, handle=handle)

    def combine(self, expert_out: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        h: _GatherHandle = result.handle
        if h.fused is not None:
            out = combine_rows(expert_out, h.fused.weights, h.fused.positions)  # (W * longest, H)
        else:
            out = _weighted_sum(expert_out, h.weights, h.tokens, h.gathered)  # (W * longest, H)
        if self.world > 1:
            from mcore_moe.comm import scatter_sum_rows

            out = scatter_sum_rows(out, self.group)[: h.num_tokens]  # (N, H)
        return out


@dataclass(frozen=True)
class _AllToAllHandle:
    tokens: torch.Tensor  # (S,) token of each sent slot, in send order
    weights: torch.Tensor  # (S,) its routing weight (differentiable)
    to_expert_order: torch.Tensor | None  # (M,) received row at each expert-ordered place (None: world 1)
    send: list[int]  # rows sent to each rank
    recv: list[int]  # rows received from each rank
    num_tokens: int
    fused: _Fused | None  # the Triton path's permutation of the sent slots (None: the torch reference)


class AllToAllDispatcher(_GroupDispatcher):
    """``alltoall``: counts exchanged first, then the routed rows; expert-order permutation on arrival."""

    def dispatch(self, hidden: torch.Tensor, routing: RoutingDecision) -> DispatchResult:
        n, k = routing.experts.shape
        slots, counts = local_slots(routing.experts, 0, self.num_experts)  # every valid slot, by global expert
        tokens = torch.div(slots, k, rounding_mode="floor")  # (S,)
        weights = routing.weights.reshape(-1)[slots]  # (S,)
        fused = _fused(hidden, slots, routing.weights)
        rows = _permute(hidden, tokens, fused)  # (S, H) in global expert order = destination rank order
        if self.world == 1:
            handle = _AllToAllHandle(tokens, weights, None, [], [], n, fused)
            return DispatchResult(tokens=rows, tokens_per_expert=counts, weights=weights, handle=handle)
        from mcore_moe.comm import all_to_all_rows, exchange_counts

        sent = counts.view(self.world, self.local_experts)  # (W, E_l)
        received = exchange_counts(sent, self.group)  # (W, E_l): rows from each rank for each local expert
        send, recv = sent.sum(1).tolist(), received.sum(1).tolist()  # the one host sync: split sizes
        arrived = all_to_all_rows(rows, send, recv, self.group)  # (M, H) by (source rank, local expert)
        arrived_w = all_to_all_rows(weights.detach(), send, recv, self.group)  # (M,)
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.local_experts, device=hidden.device).repeat(self.world), received.reshape(-1)
        )  # (M,)
        order = torch.argsort(expert_of_row, stable=True)  # (M,) by local expert, then source rank
        handle = _AllToAllHandle(tokens, weights, order, send, recv, n, fused)
        return DispatchResult(
            tokens=arrived[order], tokens_per_expert=received.sum(0), weights=arrived_w[order], handle=handle
        )

    def combine(self, expert_out: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        h: _AllToAllHandle = result.handle
        rows = expert_out
        if h.to_expert_order is not None:
            from mcore_moe.comm import all_to_all_rows

            back = torch.empty_like(h.to_expert_order)
            back[h.to_expert_order] = torch.arange(back.numel(), device=back.device)  # inverse permutation
            rows = all_to_all_rows(expert_out[back], h.recv, h.send, self.group)  # (S, H) in send order
        if h.fused is not None:
            return combine_rows(rows, h.fused.weights, h.fused.positions)  # (N, H)
        return _weighted_sum(rows, h.weights, h.tokens, h.num_tokens)


@dataclass(frozen=True)
class _PaddedHandle:
    tokens: torch.Tensor  # (R,) gathered row of each buffer row (padding rows: any row)
    weights: torch.Tensor  # (R,) its routing weight, 0 on padding rows (differentiable)
    real: torch.Tensor  # (R,) bool: the row holds a routed slot
    gathered: int  # W * C
    num_tokens: int  # N on this rank
    fused: _Fused | None  # the Triton path's permutation (None: the torch reference)


class AllGatherVDispatcher(_GroupDispatcher):
    """``allgatherv``: ``allgather`` into fixed-capacity buffers with device-side counts (no host sync, forward or
    backward).

    ``max_tokens`` (C): the rows every rank's tokens are padded to; ``None`` takes each call's N, which
    must then be the same on every rank of the group (fixed micro-batch shapes). The result has
    ``R = W * C * min(K, E_l)`` rows whatever the routing: the real ones first, grouped by local expert.
    """

    def __init__(self, group: Any, num_experts: int, *, max_tokens: int | None = None) -> None:
        super().__init__(group, num_experts)
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise ConfigError(f"moe: allgatherv max_tokens = {max_tokens!r}: must be an int >= 1 (or none)")
        self.max_tokens = max_tokens

    def dispatch(self, hidden: torch.Tensor, routing: RoutingDecision) -> DispatchResult:
        n, k = routing.experts.shape
        capacity = n if self.max_tokens is None else self.max_tokens
        if n > capacity:
            raise ValueError(f"moe: allgatherv got {n} tokens, more than its max_tokens = {capacity}")
        experts, weights = routing.experts, routing.weights
        if capacity > n:  # padded rows choose no expert
            hidden = torch.cat([hidden, hidden.new_zeros(capacity - n, hidden.shape[1])])
            experts = torch.cat([experts, experts.new_full((capacity - n, k), -1)])
            weights = torch.cat([weights, weights.new_zeros(capacity - n, k)])
        if self.world > 1:
            from mcore_moe.comm import gather_rows

            hidden = gather_rows(hidden, self.group)  # (W * C, H)
            experts = gather_rows(experts, self.group)  # (W * C, K)
            weights = gather_rows(weights, self.group)
        local = experts.reshape(-1) - self.rank * self.local_experts  # (W*C*K,) local expert of each slot
        real_slot = (local >= 0) & (local < self.local_experts)
        key = torch.where(real_slot, local, self.local_experts)  # E_l: not ours (sorted last)
        rows = self.world * capacity * min(k, self.local_experts)  # R: the most slots of ours there can be
        order = torch.argsort(key, stable=True)[:rows]  # (R,) our slots by expert, token order within one
        counts = torch.zeros(self.local_experts + 1, dtype=torch.long, device=key.device)
        counts = counts.scatter_add_(0, key, torch.ones_like(key))[: self.local_experts]  # (E_l,) on the device
        real = real_slot[order]  # (R,)
        tokens = torch.div(order, k, rounding_mode="floor")  # (R,)
        # index_select (backward: an index_add) rather than advanced indexing (backward: index_put with accumulate)
        fused = None
        if use_triton(hidden):  # the row of each slot; padding rows belong to none
            positions = slot_positions_padded(order, real, weights.numel()).view(weights.shape)  # (W * C, K)
            fused = _Fused(positions, weights)
            picked = torch.where(real.unsqueeze(-1), permute_rows(hidden, tokens, positions), 0.0)  # (R, H)
        else:
            picked = torch.where(real.unsqueeze(-1), hidden.index_select(0, tokens), 0.0)  # (R, H), zeros on padding
        w = torch.where(real, weights.reshape(-1).index_select(0, order), 0.0)  # (R,)
        handle = _PaddedHandle(tokens, w, real, hidden.shape[0], n, fused)
        return DispatchResult(tokens=picked, tokens_per_expert=counts, weights=w, handle=handle)

    def combine(self, expert_out: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        h: _PaddedHandle = result.handle
        if h.fused is not None:  # padding rows are never read (they may hold anything, NaN too)
            out = combine_rows(expert_out, h.fused.weights, h.fused.positions, padded=True)  # (W * C, H)
        else:
            rows = torch.where(h.real.unsqueeze(-1), expert_out, 0.0)  # padding rows may hold anything, NaN too
            out = _weighted_sum(rows, h.weights, h.tokens, h.gathered)  # (W * C, H)
        if self.world > 1:
            from mcore_moe.comm import scatter_sum_rows

            out = scatter_sum_rows(out, self.group)
        return out[: h.num_tokens]  # (N, H)
