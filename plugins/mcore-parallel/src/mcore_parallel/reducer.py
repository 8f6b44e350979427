"""When gradient buckets are reduced: each as soon as its last gradient is ready, overlapped with backward.

Why it exists: ``buckets`` says where gradients live; this module drives their communication. A
``post_accumulate_grad`` hook on every parameter marks it ready once autograd has accumulated its
gradient into the bucket view (a ``DTensor`` parameter's ``.grad`` is a ``DTensor`` over the view:
autograd adds into its local tensor in place, and the hook sees it); when a bucket's last
parameter is ready the bucket's collective is issued asynchronously (``async_op=True``) while
backward goes on with earlier layers. At the end of that backward (a callback queued on the
autograd engine by the first hook, as torch DDP does) whatever is left is issued, everything
waited for and divided by the group size: ``.grad`` is
final when ``backward()`` returns, before any other layout's ``finish_grad_sync`` reads or writes
it (``tp`` sums some plain gradients over its group there, in the same buffers; a collective
still in flight would race with it). ``finish`` does that work itself when no synchronised
backward ran it (``overlap = false``, or no gradient on this rank), then starts the next step.

Rules that keep ranks in step:

* Buckets are issued strictly in bucket order (a ready bucket waits for the ones before it), on
  every rank, so collectives match across ranks even when a parameter is used on one rank and not
  on another; buckets holding a parameter that got no gradient are issued at the end of backward
  or by ``finish`` (its range zeroed first), so nothing hangs.
* Under ``no_grad_sync`` (``sync = False``) nothing is issued: gradients accumulate in the buffers
  and the next synchronised backward reduces the sum.
* A gradient that lands in a bucket already issued in this step (a second backward outside
  ``no_grad_sync``, reentrant activation checkpointing) would be lost or corrupt the collective:
  one-line ``RuntimeError``. (After a synchronised backward every bucket was issued.)

Sharded (ZeRO-1, after ``shard``): the same buckets are reduce-scattered instead of all-reduced;
the end of backward (or ``finish``) leaves in each buffer this rank's range averaged and zeros elsewhere, and
``gather_params`` all-gathers the parameters' flat value buffers after the optimizer's update.

The reduce dtype may differ from the parameters' (bf16 reduction of fp32 gradients, fp32 of bf16
ones): the bucket is cast into a communication buffer of that dtype, kept across steps, and the
result cast back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mcore_parallel.buckets import Bucket

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Reducer:
    """Hooks on the buckets' parameters and the collectives over ``group`` (``size`` ranks)."""

    def __init__(
        self,
        buckets: list[Bucket],
        *,
        rank: int,
        size: int,
        group: Any,
        reduce_dtype: torch.dtype | None,
        overlap: bool,
    ) -> None:
        self.buckets = buckets
        self.rank, self.size, self.group = rank, size, group
        self.reduce_dtype = reduce_dtype
        self.overlap = overlap
        self.sync = True  # False under no_grad_sync
        self.sharded = False
        self._touched = [[False] * len(b.params) for b in buckets]  # holds this step's gradient
        self._ready = [[False] * len(b.params) for b in buckets]  # ready in this synchronised backward
        self._pending = [len(b.params) for b in buckets]
        self._next = 0  # buckets issued in this step
        self._inflight: list[tuple[Bucket, Any, torch.Tensor]] = []
        self._comm: dict[int, torch.Tensor] = {}  # bucket index -> buffer in the reduce dtype
        self._out: dict[int, torch.Tensor] = {}  # bucket index -> this rank's reduce-scattered range
        self._queued = False  # the end-of-backward callback is queued for the running backward
        self._complete = False  # this step's gradients are reduced and averaged
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook(bucket, slot))
            for bucket in buckets
            for slot, p in enumerate(bucket.params)
        ]

    @property
    def issued(self) -> int:
        """Buckets whose collective was issued in the current step (read by tests of overlap)."""
        return self._next

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- backward ------------------------------------------------------------------------------
    def _hook(self, bucket: Bucket, slot: int) -> Any:
        grad = bucket.grads[slot]  # the view, or for a DTensor parameter the DTensor over it
        touched, ready_ = self._touched[bucket.index], self._ready[bucket.index]

        def ready(param: nn.Parameter) -> None:
            if self.sync and bucket.index < self._next:  # checked first: the bucket may be in flight
                raise RuntimeError(
                    f"ddp: parameter {bucket.names[slot]!r} got a gradient after its bucket was reduced in this step; "
                    "allowed: one backward outside no_grad_sync() per finish_grad_sync(), non-reentrant checkpointing"
                )
            if param.grad is not grad:  # dropped (zero_grad) before this backward: .grad is its whole gradient
                assert param.grad is not None
                bucket.take(slot)
            touched[slot] = True
            if not self.sync or ready_[slot]:
                return
            ready_[slot] = True
            self._pending[bucket.index] -= 1
            if not self.overlap:
                return
            if not self._queued:
                self._queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            if self._pending[bucket.index] == 0:
                self._issue_ready()

        return ready

    def _issue_ready(self) -> None:
        while self._next < len(self.buckets) and self._pending[self._next] == 0:
            self._issue(self.buckets[self._next])

    def _issue(self, bucket: Bucket) -> None:
        assert bucket.index == self._next and bucket.grad is not None
        self._next += 1
        if self.size == 1:
            return
        src = bucket.grad
        if self.reduce_dtype is not None and self.reduce_dtype != bucket.dtype:
            src = self._comm.get(bucket.index)  # type: ignore[assignment]
            if src is None:
                src = self._comm[bucket.index] = torch.empty_like(bucket.grad, dtype=self.reduce_dtype)
            src.copy_(bucket.grad)
        if self.sharded:
            out = self._out.get(bucket.index)
            if out is None:
                out = self._out[bucket.index] = torch.empty(
                    bucket.padded // self.size, dtype=src.dtype, device=src.device
                )
            work = _reduce_scatter(out, src, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
            self._inflight.append((bucket, work, out))
        else:
            work = dist.all_reduce(src, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
            self._inflight.append((bucket, work, src))

    # -- end of backward, end of step ----------------------------------------------------------
    def _end_of_backward(self) -> None:
        self._queued = False
        self._reduce_all()

    def finish(self) -> None:
        """This step's gradients reduced and averaged (if the backward did not already), then the next step."""
        if not self._complete:
            self._reduce_all()
        self._complete = self._queued = False  # (a backward that raised never ran its callback)
        self._next = 0
        for bucket in self.buckets:
            self._ready[bucket.index][:] = [False] * len(bucket.params)
            self._touched[bucket.index][:] = [False] * len(bucket.params)  # in place: the hooks hold the lists
            self._pending[bucket.index] = len(bucket.params)

    def _reduce_all(self) -> None:
        """Issue the buckets not issued yet (in order), wait for every collective, average."""
        for bucket in self.buckets[self._next :]:  # a parameter without a gradient in this step: zeros
            bucket.bind([slot for slot, done in enumerate(self._touched[bucket.index]) if not done])
        while self._next < len(self.buckets):
            self._issue(self.buckets[self._next])
        for bucket, work, result in self._inflight:
            work.wait()
            grad = bucket.grad
            assert grad is not None
            if self.sharded:
                lo, hi = bucket.range_of(self.rank, self.size)
                grad[:lo].zero_()
                grad[hi:].zero_()
                grad[lo:hi].copy_(result)
                grad[lo:hi].div_(self.size)
            else:
                if result is not grad:
                    grad.copy_(result)
                grad.div_(self.size)
        self._inflight.clear()
        self._complete = True

    # -- ZeRO-1 --------------------------------------------------------------------------------
    def shard(self) -> None:
        """Reduce-scatter from now on; the parameters move into flat value buffers for the gathers."""
        assert not self._inflight, "shard() between steps only"
        for bucket in self.buckets:
            bucket.adopt_params()
        self.sharded = True

    def gather_params(self) -> None:
        """Every rank's parameters become the owners' values: one all-gather per bucket, all in flight."""
        assert self.sharded, "gather_params() needs shard() first"
        if self.size == 1:
            return
        works = []
        for bucket in self.buckets:
            assert bucket.values is not None
            lo, hi = bucket.range_of(self.rank, self.size)
            mine = bucket.values[lo:hi].clone()  # the input may not alias the output
            works.append((_all_gather(bucket.values, mine, group=self.group, async_op=True), mine))
        for work, _ in works:
            work.wait()
