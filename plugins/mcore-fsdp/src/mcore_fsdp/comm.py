"""Collectives and streams: the only place that calls ``torch.distributed`` ops.

On CUDA, gathers run on their own stream and reductions on another, so they overlap
compute; the work is queued at once and the compute stream waits on an event only when it
needs the result. On CPU (gloo), collectives are asynchronous work objects and the caller
waits on them when it needs the result.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class Streams:
    """Communication streams on CUDA; every field ``None`` on CPU."""

    gather: torch.cuda.Stream | None = None
    reduce: torch.cuda.Stream | None = None

    @classmethod
    def for_device(cls, device: torch.device) -> Streams:
        if device.type != "cuda":
            return cls()
        return cls(gather=torch.cuda.Stream(device, priority=-1), reduce=torch.cuda.Stream(device, priority=-1))

    @property
    def cuda(self) -> bool:
        return self.gather is not None

    def current(self) -> torch.cuda.Stream | None:
        return torch.cuda.current_stream() if self.cuda else None

    def on(self, stream: torch.cuda.Stream | None) -> AbstractContextManager[Any]:
        return torch.cuda.stream(stream) if stream is not None else nullcontext()


def all_gather(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup) -> Any:
    # out: (N * numel,) ; inp: (numel,)
    return _all_gather(out, inp, group=group, async_op=True)


def fuses_scaling(group: dist.ProcessGroup) -> bool:
    """Whether ``reduce_scatter`` can scale inside the collective (NCCL's ``PREMUL_SUM``)."""
    return dist.get_backend(group) == "nccl" and hasattr(dist, "_make_nccl_premul_sum")


def reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup, scale: float | None = None) -> Any:
    # out: (S,) ; inp: (N * S,); the sum over ranks, times ``scale`` when given (fuses_scaling only)
    op = dist.ReduceOp.SUM if scale is None else dist._make_nccl_premul_sum(scale)
    return _reduce_scatter(out, inp, op=op, group=group, async_op=True)


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup) -> Any:
    return dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True)


def broadcast(t: torch.Tensor, src: int, group: dist.ProcessGroup) -> Any:
    # t: the same shape on every rank; ``src`` is a rank of ``group``
    return dist.broadcast(t, group=group, group_src=src, async_op=True)
