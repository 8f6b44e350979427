"""Collectives over a sequence split by tokens: sequence parallelism's regions, ``cp``'s all-gathered keys, overlap.

Shape legend: B rows, Tl one rank's tokens per row, ``*rest`` the trailing dims (hidden, or heads x head dim).

Under ``torch.compile`` a token gather over a group with torch's symmetric memory enabled (what
``[parallel.tp] async_tp`` enables for the tp group, ``tp_async.py``) is traced in the functional form
that inductor's micro-pipeline pass (``torch/_inductor/fx_passes/micro_pipeline_tp.py``) recognises and fuses
with the GEMMs reading the result (``fused_all_gather_matmul``): ``all_gather_into_tensor`` + ``wait_tensor``
by rows, then the ranks' pieces split and concatenated on the token dim. The in-place form traces to a
gather followed by view/movedim/reshape, which the pass does not match; funcol's own dim-1 gather turns into
a view when ``B = 1`` (no copy needed), which the pass matches but whose GEMMs it does not find behind the
two reshapes that follow (torch 2.13). Both forms give the same tensor; eager runs never take the functional
one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

__all__ = ["all_gather_single", "all_gather_tokens", "fusable_gather", "reduce_scatter_single"]

#: torch 2.13's names of the flat collectives, or the older ones (feature-detected, never pinned)
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
#: the functional gather by rows (``all_gather_tensor`` before torch 2.13)
_functional_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
try:
    from torch.distributed import _symmetric_memory
except ImportError:  # a torch without symmetric memory: no group has it
    _symmetric_memory = None  # type: ignore[assignment]
#: ``group_name -> bool``: whether symmetric memory is enabled for the group (what the micro-pipeline pass asks)
_symm_mem_enabled: Callable[[str], bool] | None = getattr(_symmetric_memory, "is_symm_mem_enabled_for_group", None)


def fusable_gather(group: Any) -> bool:
    """Whether a gather over ``group`` traced now should take the functional form: compiling, with
    symmetric memory enabled for the group (the only case inductor's micro-pipeline pass fuses it)."""
    if not torch.compiler.is_compiling() or group is None or _symm_mem_enabled is None:
        return False
    return bool(_symm_mem_enabled(group.group_name))


def all_gather_tokens(local: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    """``(B, Tl, *rest)`` from each rank -> ``(B, world * Tl, *rest)`` in rank order (functional form when
    ``fusable_gather(group)``: module docstring)."""
    local = local.contiguous()
    if fusable_gather(group):  # (world * B, Tl, *rest) -> the ranks' (B, Tl, *rest) side by side
        return torch.cat(_functional_gather(local, 0, group).chunk(world), dim=1)
    batch, rows, *rest = local.shape
    out = local.new_empty((world * batch, rows, *rest))  # ranks' tensors one after another along dim 0
    all_gather_single(out, local, group=group)
    return out.view(world, batch, rows, *rest).movedim(0, 1).reshape(batch, world * rows, *rest)
