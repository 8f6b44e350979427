"""One step's micro-batches through the layouts: batch sharding, the schedule, or the plain loop.

The run loop hands a step's micro-batches here. Each one first goes through every
``BatchShardingLayout`` in the order of ``[parallel] layouts`` (``shard_batch``: this rank's part
and a matching context), and gets the loss-splitting layout's ``loss_group`` in its context, so
the model divides its loss sum by the label count over the group (``BlockContext.label_count``).
Then a ``ScheduledLayout`` runs forward and backward in its own schedule, or, without one, the
plain loop does: forward under the recipe's autocast, backward of the scaled loss divided by the
number of micro-batches, every layout's ``no_grad_sync`` held for all but the last one.

The loss a rank returns is its share: the sum over the step's micro-batches of ``loss / n``. The
mean over the whole batch is the sum of the shares over all ranks divided by the number of
copies of each share (``loss_copies``): ranks of one loss group hold different parts, every other
rank a copy (data-parallel ranks hold different batches, and the loop's world mean divides them).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mcore.errors import ConfigError
from mcore.protocols.block import BlockContext

MicroBatch = tuple[torch.Tensor, torch.Tensor, BlockContext]


@dataclass(frozen=True)
class StepLayouts:
    """The run's layouts by what they do to a step (``classify``)."""

    layouts: tuple[Any, ...]
    sharding: tuple[Any, ...]
    """Layouts with ``shard_batch``, in the run's order."""
    scheduled: Any | None
    """The layout with ``forward_backward`` (at most one)."""

    def loss_group(self) -> Any | None:
        """The one group over which a micro-batch's loss is split (``None``: not split)."""
        groups = [g for layout in self.sharding if (g := layout.loss_group()) is not None]
        return groups[0] if groups else None

    def loss_group_size(self) -> int:
        group = self.loss_group()
        return 1 if group is None else dist.get_world_size(group)

    @contextlib.contextmanager
    def no_grad_sync(self) -> Iterator[None]:
        """Every layout's ``no_grad_sync`` at once (gradient accumulation)."""
        with contextlib.ExitStack() as stack:
            for layout in self.layouts:
                stack.enter_context(layout.no_grad_sync())
            yield


def classify(layouts: Sequence[Any], names: Sequence[str]) -> StepLayouts:
    """Sort ``layouts`` (named ``names``) by role; ``ConfigError`` when two claim what one may."""
    sharding = tuple(layout for layout in layouts if callable(getattr(layout, "shard_batch", None)))
    scheduled = [
        (n, layout) for n, layout in zip(names, layouts) if callable(getattr(layout, "forward_backward", None))
    ]
    if len(scheduled) > 1:
        raise ConfigError(
            f"parallel.layouts = {list(names)}: {scheduled[0][0]!r} and {scheduled[1][0]!r} both run the step's "
            "schedule (forward_backward); keep one"
        )
    splitting = [n for n, layout in zip(names, layouts) if layout in sharding and layout.loss_group() is not None]
    if len(splitting) > 1:
        raise ConfigError(
            f"parallel.layouts = {list(names)}: {splitting[0]!r} and {splitting[1]!r} both split the loss of a "
            "micro-batch (loss_group); at most one may"
        )
    return StepLayouts(tuple(layouts), sharding, scheduled[0][1] if scheduled else None)


def shard(batch: MicroBatch, step_layouts: StepLayouts) -> MicroBatch:
    """``batch`` through every batch-sharding layout, with the loss group in its context."""
    tokens, labels, ctx = batch
    for layout in step_layouts.sharding:
        tokens, labels, ctx = layout.shard_batch(tokens, labels, ctx)
    group = step_layouts.loss_group()
    if group is not None:
        ctx = dataclasses.replace(ctx, loss_group=group)
    return tokens, labels, ctx


def _mean_share(losses: list[torch.Tensor]) -> torch.Tensor:
    """The micro-batches' mean loss as a 0-d fp64 tensor on their device: summed there, never read by the host
    (a ``float()`` per micro-batch stopped the host until the GPU caught up, leaving it idle while the next
    micro-batch was launched)."""
    return torch.stack([loss.detach().double() for loss in losses]).sum() / len(losses)


def forward_backward(
    model: nn.Module, batches: Sequence[MicroBatch], step_layouts: StepLayouts, precision: Any
) -> torch.Tensor:
    """Forward and backward of every micro-batch (already ``shard``-ed); this rank's loss share, a 0-d fp64
    tensor on the device (no host sync)."""
    if step_layouts.scheduled is not None:
        loss = step_layouts.scheduled.forward_backward(
            model, batches, precision=precision, no_grad_sync=step_layouts.no_grad_sync
        )
        return loss.detach().double()
    losses = []
    for i, (tokens, labels, ctx) in enumerate(batches):
        with step_layouts.no_grad_sync() if i < len(batches) - 1 else contextlib.nullcontext():
            with precision.autocast():
                loss = model(tokens, labels=labels, ctx=ctx)
            precision.scale_loss(loss / len(batches)).backward()
        losses.append(loss)
    return _mean_share(losses)


def forward_only(
    model: nn.Module, batches: Sequence[MicroBatch], step_layouts: StepLayouts, precision: Any
) -> torch.Tensor:
    """The loss share of ``batches`` without backward (evaluation): a 0-d fp64 tensor on the device."""
    if step_layouts.scheduled is not None:
        return step_layouts.scheduled.forward_only(model, batches, precision=precision).detach().double()
    losses = []
    for tokens, labels, ctx in batches:
        with precision.autocast():
            losses.append(model(tokens, labels=labels, ctx=ctx))
    return _mean_share(losses)
