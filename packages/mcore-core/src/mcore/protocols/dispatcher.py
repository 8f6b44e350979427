"""Token dispatchers: moving routed tokens to their experts and back (MoE).

Shape legend: N tokens on this rank, H hidden size, K experts per token (top-k),
E experts in total, E_l experts local to this rank, M rows received for local experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, kw_only=True)
class RoutingDecision:
    """The router's output for N tokens.

    ``experts``: ``(N, K)`` int64 global expert ids (a token never picks an expert twice); ``-1`` marks a
    slot a capacity limit dropped (its weight is 0; dispatchers skip it).
    ``weights``: ``(N, K)`` fp32 combine weights, finite and >= 0 (already normalised as the router decided).
    ``num_experts``: E.
    """

    experts: torch.Tensor
    weights: torch.Tensor
    num_experts: int


@dataclass(frozen=True, kw_only=True)
class DispatchResult:
    """Tokens delivered to this rank's experts.

    ``tokens``: ``(M, H)`` rows grouped contiguously by local expert, in local expert order
    (so a grouped GEMM can consume them directly). A fixed-capacity dispatcher (``allgatherv``:
    static shapes, no host sync) may end with padding rows after the ``tokens_per_expert.sum()``
    real ones: experts may leave anything there (a grouped GEMM leaves them unwritten) and
    ``combine`` ignores them, NaN included.
    ``tokens_per_expert``: ``(E_l,)`` int64 on the tokens' device; rows of expert ``i``
    are ``tokens[offsets[i]:offsets[i + 1]]``. Dispatchers built for inference must not
    force a device-to-host sync to produce it.
    ``weights``: ``(M,)`` fp32 combine weight of each row (for experts that pre-multiply);
    ``handle``: opaque state the same dispatcher's ``combine`` needs (permutation,
    split sizes, async work).
    """

    tokens: torch.Tensor
    tokens_per_expert: torch.Tensor
    weights: torch.Tensor
    handle: Any


@runtime_checkable
class TokenDispatcher(Protocol):
    """Registered under kind ``"dispatcher"`` (``allgather``, ``alltoall``, ``allgatherv``...).

    Contract:
        * Built with the expert-parallel process group (``None`` means no EP: every
          expert is local) and the number of experts E. Rank ``r`` of the group owns the
          contiguous experts ``r * E_l .. (r + 1) * E_l - 1`` with ``E_l = E / ep_size``.
        * ``dispatch(hidden, routing)``: ``hidden`` ``(N, H)``; returns the rows each local
          expert must process. Differentiable: gradients flow back to ``hidden``.
        * ``combine(expert_out, result)``: ``expert_out`` ``(M, H)`` in the order of
          ``result.tokens``; returns ``(N, H)`` where row ``n`` is
          ``sum_k weights[n, k] * expert_{experts[n, k]}(hidden[n])`` (dropped tokens
          contribute zero). Differentiable w.r.t. ``expert_out`` and the routing weights.
        * Equivalence: for any EP size the combined output equals the single-rank result.
    """

    def dispatch(self, hidden: torch.Tensor, routing: RoutingDecision) -> DispatchResult: ...

    def combine(self, expert_out: torch.Tensor, result: DispatchResult) -> torch.Tensor: ...


@runtime_checkable
class Router(Protocol):
    """Registered under kind ``"router"`` (``topk``, ``group-topk``, ``hash``...).

    ``route(hidden, token_ids)``: ``hidden`` ``(N, H)``; ``token_ids`` ``(N,)`` int64 (used by
    hash routing, which takes the experts from a table and only the weights from the logits;
    ``None`` otherwise). Returns a ``RoutingDecision``. Score functions (softmax, sigmoid,
    sqrtsoftplus computed in fp32), expert bias for aux-loss-free balancing (selection uses
    ``score + bias``, weights use ``score``) and top-k renormalisation are the router's
    business. Auxiliary losses (load balance, sequence aux, z-loss) are returned by
    ``aux_losses()`` as ``(name, loss)`` pairs for the last call, already scaled by their
    coefficients; ``update_bias(load)`` applies ``b += rate * sign(mean(load) - load)`` after
    the optimizer step from the per-expert token counts ``(E,)``.
    """

    def route(self, hidden: torch.Tensor, token_ids: torch.Tensor | None) -> RoutingDecision: ...

    def aux_losses(self) -> list[tuple[str, torch.Tensor]]: ...

    def update_bias(self, load: torch.Tensor) -> None: ...
