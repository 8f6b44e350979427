"""Calls the model's post-step hooks (``mcore.protocols.step.AfterOptimizerStep``) with the reduction
over the ranks that saw distinct tokens of the step: every layout's data-parallel group and the
loss group of a layout that splits the sequence; and, on logged steps, the modules' ``step_metrics``
(``mcore.protocols.step.ReportsStepMetrics``: MoE expert loads) with the same reduction."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mcore.errors import ConfigError
from mcore.train.microbatch import StepLayouts


def token_groups(layouts: Sequence[Any], names: Sequence[str], step_layouts: StepLayouts) -> list[Any]:
    """The process groups a post-step reduction sums over (distinct tokens), each once."""
    groups: list[Any] = []
    for name, layout in zip(names, layouts):
        info = layout.data_parallel()
        if info.size > 1:
            if info.group is None:
                raise ConfigError(
                    f"parallel.layouts: layout {name!r} splits the data {info.size} ways but names no data-parallel "
                    "group (DataParallelInfo.group); it cannot run with this model's post-step state"
                )
            groups.append(info.group)
    loss_group = step_layouts.loss_group()
    if loss_group is not None and all(loss_group is not g for g in groups):
        groups.append(loss_group)
    return groups


def post_step_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` with ``after_optimizer_step``, in ``model.modules()`` order (found once)."""
    return [m for m in model.modules() if callable(getattr(m, "after_optimizer_step", None))]


def after_optimizer_step(
    modules: list[nn.Module], reduce: Callable[[torch.Tensor], torch.Tensor], *, applied: bool
) -> None:
    """Call ``after_optimizer_step`` on each of ``modules`` (``post_step_modules``)."""
    for module in modules:
        module.after_optimizer_step(reduce, applied=applied)  # type: ignore[operator]


def metric_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` with ``step_metrics`` (``ReportsStepMetrics``), in ``model.modules()`` order."""
    return [m for m in model.modules() if callable(getattr(m, "step_metrics", None))]


def step_metrics(
    modules: list[nn.Module], reduce: Callable[[torch.Tensor], torch.Tensor], *, gather: bool
) -> dict[str, float]:
    """Every module's ``step_metrics`` merged (called on every rank). ``gather``: ranks hold different
    modules (pipeline stages), so each rank's numbers are gathered and merged on every rank."""
    merged: dict[str, float] = {}
    for module in modules:
        merged.update(module.step_metrics(reduce))  # type: ignore[operator]
    if gather and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, merged)
        for part in parts:
            merged.update(part)
    return merged
