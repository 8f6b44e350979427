"""Small helpers the recurrent blocks share: per-channel parameters, local shards, fused projections, init, checks.

Why: plugins never import each other, so what ``mcore_models.blocks.base`` gives its blocks (drawing the
declared inits from a CPU generator, one GEMM for several projections) is re-done here in a few lines.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mcore.params import collect_param_specs


class PerChannel(nn.Linear):
    """Parameters with one row per channel or head (a depthwise conv filter ``(C, K)``, a per-head decay
    ``(h, 1)``), held as an ``nn.Linear``'s ``weight`` so the ``tp`` layout splits their rows over the ranks
    exactly like the column-parallel projection they belong to (it splits only ``nn.Linear`` weights).
    Never called as a linear: the block reads ``local_weight()``."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__(cols, rows, bias=False)

    def local_weight(self) -> torch.Tensor:
        """``(rows held, cols)``: this rank's rows: its shard of a split weight, or the rows ``[lo, hi)`` of a
        whole one when the layout gives this rank one head of fewer heads than ranks (it then sets ``rows``,
        as on the projection of those heads, and sums the weight's gradients over the group)."""
        weight = local(self.weight)
        rows = getattr(self, "rows", None)
        return weight if rows is None else weight[rows[0] : rows[1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("PerChannel holds parameters; read its weight instead of calling it")


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a layout's ``DTensor`` (differentiable), else ``tensor`` itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _plain(weight: torch.Tensor) -> bool:
    return type(weight) is nn.Parameter or type(weight) is torch.Tensor


def project(hidden: torch.Tensor, linears: tuple[nn.Linear, ...]) -> list[torch.Tensor]:
    """``[linear(hidden) for linear in linears]`` (``(..., H) -> (..., out_i)``), as one GEMM while every
    weight is a plain tensor (a layout's ``DTensor`` or a quantised weight: one call per linear)."""
    weights = [linear.weight for linear in linears]
    if not all(_plain(w) for w in weights):
        return [linear(hidden) for linear in linears]
    fused = F.linear(hidden, torch.cat(weights))  # (..., sum of out_i)
    outs = list(fused.split([w.shape[0] for w in weights], dim=-1))
    return [out if linear.bias is None else out + linear.bias for out, linear in zip(outs, linears, strict=True)]


@torch.no_grad()
def draw_declared_(module: nn.Module, generator: torch.Generator | None) -> None:
    """Set every parameter under ``module`` from its declared ``init`` (``param_specs``), drawing in fp32 on
    the CPU from ``generator`` (code that builds a block by hand; runs use ``mcore.construct``, whose values
    do not depend on the layout). Parameters on the meta device, sharded, or without a declared init are left alone."""
    for name, spec in collect_param_specs(module).items():
        param, init = module.get_parameter(name), spec.init
        if param.is_meta or init is None or not _plain(param):  # a layout's shard: mcore.construct fills it
            continue
        values = torch.empty(param.shape, dtype=torch.float32)
        if init.kind == "normal":
            values.normal_(init.mean or 0.0, float(init.std or 1.0), generator=generator)
        elif init.kind == "trunc_normal":
            low, high = init.bounds
            nn.init.trunc_normal_(values, init.mean or 0.0, float(init.std or 1.0), low, high, generator=generator)
        elif init.kind == "uniform":
            low, high = init.bounds
            values.uniform_(low, high, generator=generator)
        else:
            values.fill_({"zeros": 0.0, "ones": 1.0}.get(init.kind, init.value or 0.0))
        param.copy_(values)


def check_positive_int(key: str, value: object, *, allow_none: bool = False) -> None:
    """``ValueError`` naming ``key`` unless ``value`` is an int >= 1 (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{key} = {value!r}; allowed: {allowed}")


def check_positive_float(key: str, value: object) -> None:
    """``ValueError`` naming ``key`` unless ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{key} = {value!r}; allowed: a finite number > 0")
