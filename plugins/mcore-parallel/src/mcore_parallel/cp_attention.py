"""The attention backends the ``cp`` layout puts in ``BlockContext.attention``: this rank's queries against
every rank's keys, with the mask of the zig-zag split.

Each rank holds some tokens of every row (``cp_split.SplitPlan``: chunks ``r`` and ``2 * cp - 1 - r``
of each sequence). Query ``t`` of this rank may see key ``s`` of rank ``j`` when both belong to the
same document, ``s`` does not come later in the row than ``t`` and, with a sliding window, lies
less than ``window`` tokens back; padding sees and is seen by nothing. Three ways to get the keys:

* ``AllGatherAttention`` (``kind = "allgather"``, the Llama-3 way): all-gather K and V over the
  group, attend once; backward reduce-scatters their gradients back.
* ``RingAttention`` (``kind = "ring"``): K/V blocks go around the ring with point-to-point
  transfers (``dist.batch_isend_irecv``), the next block's transfer posted before the partial
  attention on the block in hand; the blocks' results merge exactly by log-sum-exp
  (``lse_merge``). Backward (a custom ``autograd.Function``) sends K/V around again and, behind
  each block, the accumulated dK/dV of that block, which arrive complete at their owner after the
  last hop. Blocks a query chunk cannot see at all are skipped.
* ``AllToAllAttention`` (``kind = "a2a"``, DeepSpeed-Ulysses): an all-to-all turns each rank's
  ``(B, L, nh, hd)`` (its tokens, every head) into ``(B, cp * L, nh / cp, hd)`` (every rank's tokens,
  its share of the heads); one attention with the mask above over all ranks' tokens; the inverse
  all-to-all gives back ``(B, L, nh, hdv)``. Backward (a custom ``autograd.Function``) runs the
  inverse all-to-all of each. Query heads must divide by ``cp``; key/value heads are repeated until
  they do (``nkv < cp``: each rank gets the one its query heads read), their gradients summed back.

The (partial) attention is the fp32 torch reference (``lse_merge``) on every device: exact, not fast;
a fused kernel (returning the log-sum-exp for the ring) is the next step on GPU.

Shape legend: B rows, L tokens per row on one rank, nh query heads, nkv key/value heads, hd head
dim, hdv value head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from mcore.errors import UserError
from mcore.protocols.block import BlockContext
from mcore_parallel.cp_split import SplitPlan
from mcore_parallel.lse_merge import merge_with_lse, partial_attention, partial_attention_backward
from mcore_parallel.token_comm import all_gather_tokens


class _CPAttention:
    """What every backend shares: the group, this rank, the split plan that gives every mask, and the
    masks already built. One instance serves every layer of a micro-batch (the layout makes one per
    ``shard_batch``), so each mask is built once per micro-batch, not once per layer."""

    name: ClassVar[str] = "cp"

    def __init__(self, group: Any, plan: SplitPlan) -> None:
        self.group, self.plan = group, plan
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self._masks: dict[tuple[Any, ...], Any] = {}

    def cached(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """``build()`` the first time ``key`` is asked for, the same object afterwards."""
        if key not in self._masks:
            self._masks[key] = build()
        return self._masks[key]

    def supports(self, q: torch.Tensor, ctx: BlockContext, window: int | None) -> bool:
        return True  # under cp this IS the kernel: a block's local default would see this rank's tokens only

    def mask(self, key_rank: int, window: int | None) -> torch.Tensor:
        """``(B, L, L)`` bool: this rank's queries (rows) against rank ``key_rank``'s keys (columns)."""
        index, docs = self.plan.index[self.rank], self.plan.docs[self.rank]
        return self.cached(("block", key_rank, window), lambda: _allowed(index, docs, key_rank, self.plan, window))


def _allowed(
    q_index: torch.Tensor, q_doc: torch.Tensor, key_rank: int, plan: SplitPlan, window: int | None
) -> torch.Tensor:
    """``(B, Q, L)`` bool: queries at row index ``q_index (B, Q)`` of documents ``q_doc (B, Q)`` against rank
    ``key_rank``'s keys: same document, not later in the row, inside the window; padding sees nothing."""
    q_index, q_doc = q_index[:, :, None], q_doc[:, :, None]  # (B, Q, 1)
    k_index, k_doc = plan.index[key_rank][:, None, :], plan.docs[key_rank][:, None, :]  # (B, 1, L)
    allowed = (q_doc >= 0) & (k_doc == q_doc) & (k_index <= q_index)
    if window is not None:
        allowed = allowed & (q_index - k_index < window)
    return allowed


# -- all-gather -------------------------------------------------------------------------------------------
class _GatherTokens(torch.autograd.Function):
    """All-gather along dim 1 (tokens), ranks in group order; backward reduce-scatters the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.rank, ctx.width = group, dist.get_rank(group), x.shape[1]
        return all_gather_tokens(x, group, dist.get_world_size(group))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        parts = [p.contiguous() for p in grad.split(ctx.width, dim=1)]  # rank j's tokens, one part each
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts, group=ctx.group)  # every rank's gradient of this rank's keys, summed
        return out, None


class AllGatherAttention(_CPAttention):
    """``kind = "allgather"``: K and V of every rank gathered, one attention (module docstring)."""

    name: ClassVar[str] = "cp-allgather"

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: BlockContext, scale: float, window: int | None
    ) -> torch.Tensor:
        k_all = _GatherTokens.apply(k, self.group)  # (B, cp * L, nkv, hd)
        v_all = _GatherTokens.apply(v, self.group)  # (B, cp * L, nkv, hdv)
        mask = self.cached(  # (B, L, cp * L)
            ("gathered", window), lambda: torch.cat([self.mask(j, window) for j in range(self.size)], dim=2)
        )
        out, _ = partial_attention(q, k_all, v_all, scale=scale, mask=mask)  # (B, L, nh, hdv) fp32
        return out.to(q.dtype)


# -- ring -------------------------------------------------------------------------------------------------
class _Ring:
    """Point-to-point neighbours on the ring: send to ``rank + 1``, receive from ``rank - 1``."""

    def __init__(self, group: Any, rank: int, size: int) -> None:
        self.group = group
        self.next = dist.get_global_rank(group, (rank + 1) % size)
        self.prev = dist.get_global_rank(group, (rank - 1) % size)

    def start(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[Any]]:
        """Post sending ``tensors`` on and receiving the previous rank's into new buffers."""
        incoming = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in incoming]
        return incoming, dist.batch_isend_irecv(ops)


def _wait(requests: list[Any]) -> None:
    for request in requests:
        request.wait()


class _RingFunction(torch.autograd.Function):
    """Ring attention forward and backward; ``masks[j]`` is this rank's mask against rank ``j``'s block."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: RingAttention, scale: float, masks: Any
    ) -> torch.Tensor:
        ring, size, rank = backend.ring, backend.size, backend.rank
        parts = []
        block = [k.contiguous(), v.contiguous()]
        for step in range(size):
            source = (rank - step) % size
            incoming, requests = ring.start(block) if step < size - 1 else (block, [])
            if masks[source] is not None:  # the transfer runs while this block is computed
                parts.append(partial_attention(q, block[0], block[1], scale=scale, mask=masks[source]))
            _wait(requests)
            block = incoming
        out, lse = merge_with_lse(parts)  # (B, L, nh, hdv), (B, nh, L): every rank sees at least its own block
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.backend, ctx.scale, ctx.masks = backend, scale, masks
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        backend, masks = ctx.backend, ctx.masks
        ring, size, rank = backend.ring, backend.size, backend.rank
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        block = [k.contiguous(), v.contiguous()]
        acc = [torch.zeros(k.shape, dtype=torch.float32, device=k.device), torch.zeros_like(v, dtype=torch.float32)]
        for step in range(size):
            source = (rank - step) % size  # ``block`` and ``acc`` belong to rank ``source``
            incoming, requests = ring.start(block) if step < size - 1 else (block, [])
            if masks[source] is not None:
                bq, bk, bv = partial_attention_backward(
                    q, block[0], block[1], out, lse, grad, scale=ctx.scale, mask=masks[source]
                )
                dq += bq
                acc = [acc[0] + bk, acc[1] + bv]
            acc, acc_requests = ring.start(acc)  # on to the next rank; the last hop lands it at its owner
            _wait(requests + acc_requests)
            block = incoming
        return dq.to(q.dtype), acc[0].to(k.dtype), acc[1].to(v.dtype), None, None, None


class RingAttention(_CPAttention):
    """``kind = "ring"``: K/V blocks passed around the ring, merged by log-sum-exp (module docstring)."""

    name: ClassVar[str] = "cp-ring"

    def __init__(self, group: Any, plan: SplitPlan) -> None:
        super().__init__(group, plan)
        self.ring = _Ring(group, self.rank, self.size)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: BlockContext, scale: float, window: int | None
    ) -> torch.Tensor:
        masks = self.cached(("ring", window), lambda: self._ring_masks(window))
        return _RingFunction.apply(q, k, v, self, scale, masks)  # type: ignore[no-any-return]

    def _ring_masks(self, window: int | None) -> list[torch.Tensor | None]:
        """Each key rank's block mask, ``None`` where this rank's queries see nothing of it (skipped)."""
        masks: list[torch.Tensor | None] = []
        for j in range(self.size):
            mask = self.mask(j, window)
            masks.append(mask if j == self.rank or bool(mask.any()) else None)
        return masks


# -- all-to-all (DeepSpeed-Ulysses) -------------------------------------------------------------------------
def _heads_to_tokens(x: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """``(B, L, H, d)`` (this rank's tokens, every head) -> ``(B, cp * L, H / cp, d)`` (every rank's tokens in
    group order, this rank's share of the heads)."""
    batch, width, heads, dim = x.shape
    send = x.reshape(batch, width, size, heads // size, dim).permute(2, 0, 1, 3, 4).contiguous()  # (cp, B, L, H/cp, d)
    recv = torch.empty_like(send)  # (cp, B, L, H/cp, d): part i is rank i's tokens
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(batch, size * width, heads // size, dim)


def _tokens_to_heads(x: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """The inverse of ``_heads_to_tokens``: ``(B, cp * L, h, d)`` -> ``(B, L, cp * h, d)``."""
    batch, tokens, heads, dim = x.shape
    send = x.reshape(batch, size, tokens // size, heads, dim).transpose(0, 1).contiguous()  # (cp, B, L, h, d)
    recv = torch.empty_like(send)  # (cp, B, L, h, d): part j is rank j's heads of this rank's tokens
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(batch, tokens // size, size * heads, dim)


class _AllToAll(torch.autograd.Function):
    """Heads scattered and tokens gathered (``to_tokens``), or back; the backward is the other direction."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, size: int, to_tokens: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.size, ctx.to_tokens = group, size, to_tokens
        return (_heads_to_tokens if to_tokens else _tokens_to_heads)(x, group, size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        inverse = _tokens_to_heads if ctx.to_tokens else _heads_to_tokens
        return inverse(grad, ctx.group, ctx.size), None, None, None


class AllToAllAttention(_CPAttention):
    """``kind = "a2a"`` (DeepSpeed-Ulysses): heads scattered, every token gathered, one attention (module docstring)."""

    name: ClassVar[str] = "cp-a2a"

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: BlockContext, scale: float, window: int | None
    ) -> torch.Tensor:
        heads, kv_heads, size = q.shape[2], k.shape[2], self.size
        if heads % size:
            fits = ", ".join(str(n) for n in range(2, heads + 1) if heads % n == 0) or "none above 1"
            raise UserError(
                f"parallel.cp.kind = 'a2a' splits attention heads over parallel.sizes.cp = {size}, but the attention "
                f"has {heads} query heads (per tp rank); allowed: a cp dividing {heads} ({fits}), or parallel.cp.kind "
                "= 'ring' or 'allgather'"
            )
        # kv heads repeated until they split over cp with each rank's query heads reading its own share
        # (nkv < cp: every rank gets the kv head its query heads read); autograd sums the copies' gradients
        copies = size // math.gcd(kv_heads, size)
        if copies > 1:
            k = k.repeat_interleave(copies, dim=2)  # (B, L, nkv * copies, hd)
            v = v.repeat_interleave(copies, dim=2)  # (B, L, nkv * copies, hdv)
        q_all = _AllToAll.apply(q, self.group, size, True)  # (B, cp * L, nh / cp, hd)
        k_all = _AllToAll.apply(k, self.group, size, True)  # (B, cp * L, nkv * copies / cp, hd)
        v_all = _AllToAll.apply(v, self.group, size, True)  # (B, cp * L, nkv * copies / cp, hdv)
        mask = self.cached(("all", window), lambda: self._all_tokens_mask(window))  # (B, cp * L, cp * L)
        out, _ = partial_attention(q_all, k_all, v_all, scale=scale, mask=mask)  # (B, cp * L, nh / cp, hdv) fp32
        return _AllToAll.apply(out.to(q.dtype), self.group, size, False)  # type: ignore[no-any-return]  # (B, L, nh, hdv)

    def _all_tokens_mask(self, window: int | None) -> torch.Tensor:
        """``(B, cp * L, cp * L)`` bool: every rank's tokens (group order) against every rank's."""
        index, docs = torch.cat(self.plan.index, dim=1), torch.cat(self.plan.docs, dim=1)  # (B, cp * L)
        return torch.cat([_allowed(index, docs, j, self.plan, window) for j in range(self.size)], dim=2)
