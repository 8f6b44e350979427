"""The attention backends the ``cp`` layout puts in ``BlockContext.attention``: this rank's queries against
every rank's keys, with the mask of the zig-zag split.

Each rank holds some tokens of every row (``cp_split.SplitPlan``: chunks ``r`` and ``2 * cp - 1 - r``
of each sequence). Query ``t`` of this rank may see key ``s`` of rank ``j`` when both belong to the
same document, ``s`` does not come later in the row than ``t`` and, with a sliding window, lies
less than ``window`` tokens back; padding sees and is seen by nothing. Three ways to get the keys:

* ``AllGatherAttention`` (``kind = "allgather"``, the Llama-3 way): all-gather K and V over the
  group, attend once; backward reduce-scatters their gradients back. Under a dynamic plan only each
  rank's prefix of split documents is gathered (``SplitPlan.shared``); its whole documents stay local.
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
* ``HybridAttention`` (``kind = "a2a+ring"``): the two combined for cp spanning nodes: an all-to-all over
  heads inside groups of ``a2a_size`` consecutive cp ranks (a node), then a ring between the groups,
  each rank's ring made of the ranks holding the same share of the heads.

The (partial) attention is ``lse_merge``'s: on CUDA for bf16/fp16, flash-attention for the blocks that are
causal or a fully visible rectangle (the zig-zag ring's, without documents); the fp32 torch reference for
the others (documents, padding, windows; the all-gathered and all-to-all token orders) and on CPU. Each mask is described once per micro-batch (``lse_kernels.describe_mask``, cached with it).

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
from mcore_parallel.lse_kernels import BlockLayout, describe_mask
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
        k_index, k_docs = self.plan.index[key_rank], self.plan.docs[key_rank]
        return self.cached(("block", key_rank, window), lambda: _allowed(index, docs, k_index, k_docs, window))


def _allowed(
    q_index: torch.Tensor, q_doc: torch.Tensor, k_index: torch.Tensor, k_doc: torch.Tensor, window: int | None
) -> torch.Tensor:
    """``(B, Q, K)`` bool: queries at row index ``q_index (B, Q)`` of documents ``q_doc (B, Q)`` against keys
    at ``k_index (B, K)`` of ``k_doc (B, K)``: same document, not later in the row, inside the window;
    padding sees nothing."""
    q_index, q_doc = q_index[:, :, None], q_doc[:, :, None]  # (B, Q, 1)
    k_index, k_doc = k_index[:, None, :], k_doc[:, None, :]  # (B, 1, K)
    allowed = (q_doc >= 0) & (k_doc == q_doc) & (k_index <= q_index)
    if window is not None:
        allowed = allowed & (q_index - k_index < window)
    return allowed


def _layout(mask: torch.Tensor) -> BlockLayout:
    """``mask (B, Q, K)`` described for ``lse_merge``'s kernels (once per micro-batch: callers cache it)."""
    return describe_mask(mask, mask.shape[1], mask.shape[2])


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
        shared = k.shape[1] if self.plan.shared is None else self.plan.shared  # S: tokens other ranks need
        if shared == 0:  # a dynamic plan that split no document (the same on every rank): nothing to exchange
            mask = self.cached(("local", window), lambda: _layout(self.mask(self.rank, window)))
            return partial_attention(q, k, v, scale=scale, mask=mask)[0].to(q.dtype)
        k_all = _GatherTokens.apply(k[:, :shared], self.group)  # (B, cp * S, nkv, hd)
        v_all = _GatherTokens.apply(v[:, :shared], self.group)  # (B, cp * S, nkv, hdv)
        if shared < k.shape[1]:  # a dynamic plan: this rank's whole documents after the gathered prefixes
            k_all, v_all = torch.cat([k_all, k[:, shared:]], dim=1), torch.cat([v_all, v[:, shared:]], dim=1)

        def gathered_mask() -> BlockLayout:  # (B, L, cp * S [+ L - S])
            parts = [self.mask(j, window)[:, :, :shared] for j in range(self.size)]
            if shared < k.shape[1]:
                parts.append(self.mask(self.rank, window)[:, :, shared:])
            return _layout(torch.cat(parts, dim=2))

        mask = self.cached(("gathered", window), gathered_mask)
        out, _ = partial_attention(q, k_all, v_all, scale=scale, mask=mask)  # (B, L, nh, hdv) fp32
        return out.to(q.dtype)


# -- ring -------------------------------------------------------------------------------------------------
class _Ring:
    """Point-to-point neighbours on the ring ``group``: send to ``rank + 1``, receive from ``rank - 1``."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank, self.size = rank, size = dist.get_rank(group), dist.get_world_size(group)
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
    """Ring attention forward and backward; ``masks[j]`` is this rank's mask against ring rank ``j``'s block."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: _Ring, scale: float, masks: Any
    ) -> torch.Tensor:
        size, rank = ring.size, ring.rank
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
        ctx.ring, ctx.scale, ctx.masks = ring, scale, masks
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        ring, masks = ctx.ring, ctx.masks
        size, rank = ring.size, ring.rank
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
        self.ring = _Ring(group)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: BlockContext, scale: float, window: int | None
    ) -> torch.Tensor:
        masks = self.cached(("ring", window), lambda: self._ring_masks(window))
        return _RingFunction.apply(q, k, v, self.ring, scale, masks)  # type: ignore[no-any-return]

    def _ring_masks(self, window: int | None) -> list[BlockLayout | None]:
        """Each key rank's block layout, ``None`` where this rank's queries see nothing of it (skipped)."""
        masks: list[BlockLayout | None] = []
        for j in range(self.size):
            layout = _layout(self.mask(j, window))
            masks.append(layout if j == self.rank or layout.kind != "empty" else None)
        return masks


# -- all-to-all (DeepSpeed-Ulysses) -------------------------------------------------------------------------
def _split_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: int, kind: str, over: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refuse query heads that do not split over ``size`` ranks (one line naming ``kind`` and ``over``); repeat
    ``k``/``v`` heads until they split with each rank's query heads reading its own share (``nkv < size``:
    every rank gets the kv head its query heads read; autograd sums the copies' gradients)."""
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % size:
        fits = ", ".join(str(n) for n in range(2, heads + 1) if heads % n == 0) or "none above 1"
        option = "parallel.cp.a2a_size" if kind == "a2a+ring" else "a cp"
        raise UserError(
            f"parallel.cp.kind = {kind!r} splits attention heads over {over}, but the attention has {heads} query "
            f"heads (per tp rank); allowed: {option} dividing {heads} ({fits}), or parallel.cp.kind = 'ring' or "
            "'allgather'"
        )
    copies = size // math.gcd(kv_heads, size)
    if copies > 1:
        k = k.repeat_interleave(copies, dim=2)  # (B, L, nkv * copies, hd)
        v = v.repeat_interleave(copies, dim=2)  # (B, L, nkv * copies, hdv)
    return k, v


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
        size = self.size
        k, v = _split_heads(q, k, v, size, "a2a", f"parallel.sizes.cp = {size}")
        q_all = _AllToAll.apply(q, self.group, size, True)  # (B, cp * L, nh / cp, hd)
        k_all = _AllToAll.apply(k, self.group, size, True)  # (B, cp * L, nkv * copies / cp, hd)
        v_all = _AllToAll.apply(v, self.group, size, True)  # (B, cp * L, nkv * copies / cp, hdv)
        mask = self.cached(("all", window), lambda: _layout(self._all_tokens_mask(window)))  # (B, cp * L, cp * L)
        out, _ = partial_attention(q_all, k_all, v_all, scale=scale, mask=mask)  # (B, cp * L, nh / cp, hdv) fp32
        return _AllToAll.apply(out.to(q.dtype), self.group, size, False)  # type: ignore[no-any-return]  # (B, L, nh, hdv)

    def _all_tokens_mask(self, window: int | None) -> torch.Tensor:
        """``(B, cp * L, cp * L)`` bool: every rank's tokens (group order) against every rank's."""
        index, docs = torch.cat(self.plan.index, dim=1), torch.cat(self.plan.docs, dim=1)  # (B, cp * L)
        return _allowed(index, docs, index, docs, window)


# -- a2a+ring: all-to-all inside groups of a2a_size consecutive cp ranks, ring across them ---------------------
class HybridAttention(_CPAttention):
    """``kind = "a2a+ring"``: cp rank ``g * a + i`` (``a = a2a_size``) is member ``i`` of all-to-all group ``g``
    (ranks ``g * a .. g * a + a - 1``, a node) and rank ``g`` of ring ``i`` (the ranks ``i, a + i, ...``).

    The all-to-all over its group gives each rank ``(B, a * L, nh / a, hd)``: its group's tokens (group order),
    its share ``i`` of the heads; the ring then passes those K/V blocks between the groups (every rank of ring
    ``i`` holds head share ``i``), merged by log-sum-exp as ``RingAttention`` does; the inverse all-to-all
    gives back ``(B, L, nh, hdv)``. Query heads must divide by ``a``; key/value heads are repeated as for
    ``a2a``."""

    name: ClassVar[str] = "cp-a2a+ring"

    def __init__(self, group: Any, plan: SplitPlan, a2a_group: Any, ring_group: Any) -> None:
        super().__init__(group, plan)
        self.a2a_group, self.a2a_size = a2a_group, dist.get_world_size(a2a_group)
        self.ring = _Ring(ring_group)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: BlockContext, scale: float, window: int | None
    ) -> torch.Tensor:
        a, group = self.a2a_size, self.a2a_group
        k, v = _split_heads(q, k, v, a, "a2a+ring", f"parallel.cp.a2a_size = {a}")
        q_g = _AllToAll.apply(q, group, a, True)  # (B, a * L, nh / a, hd)
        k_g = _AllToAll.apply(k, group, a, True)  # (B, a * L, nkv * copies / a, hd)
        v_g = _AllToAll.apply(v, group, a, True)  # (B, a * L, nkv * copies / a, hdv)
        masks = self.cached(("hybrid", window), lambda: self._group_masks(window))
        out = _RingFunction.apply(q_g, k_g, v_g, self.ring, scale, masks)  # (B, a * L, nh / a, hdv)
        return _AllToAll.apply(out, group, a, False)  # type: ignore[no-any-return]  # (B, L, nh, hdv)

    def _group_masks(self, window: int | None) -> list[BlockLayout | None]:
        """``(B, a * L, a * L)`` per ring rank: this group's tokens against that group's, ``None`` where they
        see nothing of it (skipped)."""
        a = self.a2a_size

        def tokens(g: int) -> tuple[torch.Tensor, torch.Tensor]:  # (B, a * L) each, group order
            ranks = range(g * a, (g + 1) * a)
            return torch.cat([self.plan.index[r] for r in ranks], 1), torch.cat([self.plan.docs[r] for r in ranks], 1)

        q_index, q_docs = tokens(self.ring.rank)
        masks: list[BlockLayout | None] = []
        for g in range(self.ring.size):
            layout = _layout(_allowed(q_index, q_docs, *tokens(g), window))
            masks.append(layout if g == self.ring.rank or layout.kind != "empty" else None)
        return masks
