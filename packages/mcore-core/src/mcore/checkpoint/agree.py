"""One small all-reduce so that every rank of a save or load reaches the same verdict.

A check that fails on one rank only (a corrupt block that rank verified, a non-finite shard
it holds, a directory it could not create) must make every rank raise the same error, or the
others wait forever in the next collective. Each check reduces a few integers with ``MIN``
over the group the checkpoint is saved or loaded with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def _device(group: Any) -> torch.device:
    backend = str(dist.get_backend(group))
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())  # an NCCL-only group reduces device tensors


def all_min(values: Sequence[int], *, group: Any, world_size: int) -> list[int]:
    """The element-wise minimum of ``values`` over the ranks of ``group`` (one collective).

    With ``world_size == 1`` (or no process group at all) the values come back unchanged.
    """
    if world_size <= 1 or not dist.is_initialized():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.int64, device=_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return [int(v) for v in t.tolist()]
