"""Calls the model's post-step hooks (``mcore.protocols.step.AfterOptimizerStep``) with the reduction
over the ranks that saw distinct tokens of the step: every layout's data-parallel group and the
loss group of a layout that splits the sequence."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
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
