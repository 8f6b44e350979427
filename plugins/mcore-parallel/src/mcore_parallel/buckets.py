"""Flat gradient buckets: where each parameter's gradient lives, not when it is reduced.

Why it exists: reducing one gradient at a time costs a collective per parameter; reducing them all
at the end of backward exposes the whole communication. ``ddp`` groups parameters into buckets of
about ``bucket_mb`` MiB, in reverse registration order (the order backward produces gradients), and
gives each bucket one contiguous gradient buffer. A parameter's ``.grad`` is a view into it (torch
DDP's ``gradient_as_bucket_view``, Megatron's grad buffer), so autograd accumulates straight into
the buffer and a bucket is reduced with one collective and no copy.

A ``DTensor`` parameter (``tp`` applied before ``ddp``) contributes its local shard: the bucket
holds the elements this rank has, and its ``.grad`` is a ``DTensor`` with the parameter's mesh and
placements whose local tensor is the view (autograd accumulates into that local tensor in place,
as into a plain view). The reduction over ``dp_replicate`` then sums equal shards: every rank of
the group holds the same part of each parameter.

A bucket holds parameters of one dtype and device. Each parameter starts at a multiple of
``ALIGN`` elements (aligned vector loads on the views); a buffer is padded to a multiple of the
data-parallel size, so it splits into equal ranges for a reduce-scatter (ZeRO-1). When sharded,
each bucket also holds the parameters' values in a flat buffer of the same layout
(``adopt_params``), so the updated ranges are all-gathered with one collective per bucket.

``zero_grad(set_to_none=True)`` drops the views. The next gradient autograd produces for such a
parameter is then a fresh tensor, copied into the view by ``reducer``'s hook (``take``) (one copy, cheaper than
zeroing the buffer and adding into it); ``bind`` puts back the views of parameters that got no
gradient in a step (a ``None`` gradient is zeros). When each happens is ``reducer``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

#: Every parameter's first element in its bucket is a multiple of this (elements).
ALIGN = 64


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def local(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``t``: a ``DTensor``'s local shard, a plain tensor itself."""
    if isinstance(t, DTensor):
        with torch.no_grad():
            return t.to_local()
    return t


def _as_grad(param: nn.Parameter, view: torch.Tensor) -> torch.Tensor:
    """The ``.grad`` a parameter gets for its ``view``: the view, or a ``DTensor`` laid out like the parameter."""
    if not isinstance(param, DTensor):
        return view
    return DTensor.from_local(
        view, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


@dataclass(eq=False)
class Bucket:
    """Parameters sharing one flat gradient buffer; ``offsets[i]`` is where ``params[i]`` starts."""

    index: int
    dtype: torch.dtype
    device: torch.device
    names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    numel: int = 0  # elements used, alignment gaps included
    padded: int = 0  # length of the buffers: numel rounded up to a multiple of the group size
    grad: torch.Tensor | None = None  # (padded,) gradients, in the parameters' dtype
    views: list[torch.Tensor] = field(default_factory=list)  # each parameter's gradient, shaped like its local part
    grads: list[torch.Tensor] = field(default_factory=list)  # each parameter's ``.grad``: its view, or a DTensor of it
    values: torch.Tensor | None = None  # (padded,) parameter values, once ``adopt_params`` ran

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def add(self, name: str, param: nn.Parameter) -> None:
        start = _round_up(self.numel, ALIGN) if self.numel else 0
        self.names.append(name)
        self.params.append(param)
        self.offsets.append(start)
        self.numel = start + local(param).numel()

    def range_of(self, rank: int, size: int) -> tuple[int, int]:
        """The elements ``[lo, hi)`` of the buffers that rank ``rank`` of ``size`` owns when sharded."""
        per = self.padded // size
        return rank * per, (rank + 1) * per

    def allocate(self, multiple: int) -> None:
        """The zeroed gradient buffer (padded to ``multiple``), each parameter's view into it and its ``.grad``."""
        self.padded = _round_up(max(self.numel, 1), multiple)
        self.grad = torch.zeros(self.padded, dtype=self.dtype, device=self.device)
        shapes = [local(p).shape for p in self.params]
        self.views = [self.grad[o : o + s.numel()].view(s) for o, s in zip(self.offsets, shapes)]
        self.grads = [_as_grad(p, view) for p, view in zip(self.params, self.views)]

    def take(self, slot: int) -> None:
        """The parameter at ``slot`` gets its bucket ``.grad`` back: a dropped (``None``) gradient becomes
        zeros, one produced or assigned elsewhere is copied in, the bucket's keeps its values."""
        p, view, grad = self.params[slot], self.views[slot], self.grads[slot]
        g = p.grad
        if g is grad:
            return
        if g is None:
            view.zero_()
        else:
            if isinstance(p, DTensor):
                assert isinstance(g, DTensor), f"{self.names[slot]}: a DTensor parameter got a plain gradient"
                if g.device_mesh != p.device_mesh or g.placements != p.placements:
                    g = g.redistribute(p.device_mesh, p.placements)
                g = g.to_local()
            view.copy_(g)
        p.grad = grad

    def bind(self, slots: list[int]) -> None:
        """``take`` for each of ``slots``."""
        for slot in slots:
            self.take(slot)

    def adopt_params(self) -> None:
        """Move the parameters' values into one flat buffer laid out like the gradients (identity kept;
        plain parameters only: ``ddp`` declines to shard DTensor parameters)."""
        assert self.values is None and self.padded
        assert not any(isinstance(p, DTensor) for p in self.params), "adopt_params: DTensor parameters"
        self.values = torch.zeros(self.padded, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for o, p in zip(self.offsets, self.params):
                view = self.values[o : o + p.numel()]
                view.copy_(p.detach().reshape(-1))
                p.data = view.view(p.shape)


def plan_buckets(named: list[tuple[str, nn.Parameter]], *, cap_bytes: int) -> list[Bucket]:
    """Buckets of about ``cap_bytes`` over ``named`` in reverse order (backward's order), one dtype
    and device per bucket; a bucket closes when the next parameter would take it past the cap (a
    parameter larger than the cap gets a bucket of its own). Numbered in the order they open. A
    ``DTensor`` counts by its local shard."""
    buckets: list[Bucket] = []
    open_: dict[tuple[torch.dtype, torch.device], Bucket] = {}
    for name, p in reversed(named):
        mine = local(p)
        key = (mine.dtype, mine.device)
        bucket = open_.get(key)
        extra = mine.numel() * mine.element_size()
        if bucket is not None and bucket.params and bucket.nbytes + extra > cap_bytes:
            bucket = None
        if bucket is None:
            bucket = open_[key] = Bucket(index=len(buckets), dtype=mine.dtype, device=mine.device)
            buckets.append(bucket)
        bucket.add(name, p)
    return buckets
