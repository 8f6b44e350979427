"""Attention's inner kernel: the one seam that context parallelism and the inference engine replace.

Shape legend: B rows, T query tokens, S key tokens, nh query heads, nkv key/value heads, hd head
dim, hdv value head dim.

An attention block projects, normalises and rotates its queries and keys itself, then hands
``q``, ``k``, ``v`` to an ``AttentionBackend`` which computes ``softmax(q k^T * scale + mask) v``
with the mask the context implies: causal within each row, no token seeing another document of a
packed row (``ctx.cu_seqlens``), and at most ``window`` keys back when the block has a sliding
window. Which backend runs is the context's choice (``BlockContext.attention``), so a layout
(``cp``: ring or all-to-all), the inference engine (paged KV) or the run config (``sdpa``,
``flex``) swaps it without touching the block; a block falls back to its plugin's default when the
context names none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from mcore.protocols.block import BlockContext


@runtime_checkable
class AttentionBackend(Protocol):
    """Registered under kind ``"attention"`` (``sdpa``, ``flex``, ...); instances are called by blocks.

    Contract:
        * ``__call__(q, k, v, *, ctx, scale, window)``: ``q (B, T, nh, hd)``, ``k (B, S, nkv, hd)``,
          ``v (B, S, nkv, hdv)`` -> ``(B, T, nh, hdv)`` in ``q``'s dtype. ``nh`` is a multiple of
          ``nkv`` (grouped-query attention: query head ``i`` reads KV head ``i // (nh // nkv)``);
          the counts are read from the tensors (a tensor-parallel rank holds some heads). Masking:
          query ``t`` sees key ``s`` when ``s <= t`` (keys precede queries by ``S - T`` cached
          tokens), both lie in the same document of ``ctx.cu_seqlens`` (over the flattened
          ``B * T`` tokens; ``None``: one document per row) and, when ``window`` is set,
          ``t - s < window``. ``scale`` multiplies the scores.
        * The result equals the plain softmax reference (``mcore_testing`` checks it on random
          inputs, forward and backward); differentiable in ``q``, ``k`` and ``v``.
        * ``supports(q, ctx, window) -> bool`` (optional): whether this backend handles the call;
          a block falls back to its default backend when it says no (e.g. a kernel without
          sliding windows).
    """

    name: ClassVar[str]

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        ctx: BlockContext,
        scale: float,
        window: int | None,
    ) -> torch.Tensor: ...
