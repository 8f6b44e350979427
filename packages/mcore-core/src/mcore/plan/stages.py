"""Per-rank memory of a pipeline (``mcore plan`` under a layout with ``stage_plan``, e.g. ``pp``).

Pipeline ranks hold different things: the first stage the embedding, the last the final norm, output
weight and MTP depths, the middle ones only layers, and each keeps the activations of as many
micro-batches as its schedule has in flight (1F1B: ``pp - rank`` on rank ``rank``). The layout says
what each rank holds and keeps (``ScheduledLayout.stage_plan``, from its config alone); the model says
what each part weighs (``StagedModel.pipeline_stage`` of one layer, of the embedding alone, of the loss
head alone, built on the meta device), so neither side needs to know the other.

Shape of the numbers: per rank, parameters/gradients/optimizer state of the parameters it holds
(divided by the other sharding dims as the whole plan is), activations = in-flight (micro-batch, chunk)
forwards x the largest chunk's kept bytes per micro-batch (an upper bound for zero-bubble schedules,
whose pending weight gradients keep only the linear layers' inputs) + the head's activations on the
last rank, and the peak as the whole plan takes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mcore.config import RunConfig
from mcore.protocols.layout import StagePlan
from mcore.train.build import build_model


@dataclass
class StageMemory:
    """One pipeline rank's share (bytes)."""

    rank: int
    layers: str
    in_flight: int
    params: int
    grads: int
    optimizer: int
    activations: int
    peak: int


@dataclass(frozen=True)
class StageNumels:
    """Trainable elements of each stage layer, of the first stage's extras and of the last stage's."""

    layers: tuple[int, ...]
    first: int
    last: int


def stage_numels(config: RunConfig, host: Any) -> StageNumels | None:
    """Element counts from the model's own stages (meta device); ``None`` if it cannot be cut."""
    model, _ = build_model(config, host, "meta")
    cut, count = getattr(model, "pipeline_stage", None), getattr(model, "stage_layers", None)
    if not callable(cut) or not callable(count):
        return None
    layers = int(count())

    def numel(part: Any) -> int:
        return sum(p.numel() for p in part.parameters() if p.requires_grad)

    return StageNumels(
        layers=tuple(numel(cut(range(i, i + 1), first=False, last=False)) for i in range(layers)),
        first=numel(cut(range(0, 0), first=True, last=False)),
        last=numel(cut(range(layers, layers), first=False, last=True)),
    )


def _span(chunk: Sequence[int]) -> str:
    return f"{chunk[0]}-{chunk[-1]}" if len(chunk) > 1 else (str(chunk[0]) if chunk else "-")


def stage_memory(
    plans: Sequence[StagePlan],
    numels: StageNumels,
    *,
    bytes_per_param: float,
    optimizer_bytes_per_param: float,
    kept_per_layer: Sequence[int],
    head_activations: int,
    transient: int,
    seq_split: int,
) -> list[StageMemory]:
    """Each rank's memory: ``bytes_per_param`` / ``optimizer_bytes_per_param`` already divided by the other
    sharding dims (per element), ``kept_per_layer`` the bytes each layer keeps for backward per micro-batch
    (after recompute), ``head_activations`` what the embedding/head/loss keep (on the last rank)."""
    out = []
    for plan in plans:
        numel = sum(numels.layers[i] for chunk in plan.chunks for i in chunk)
        numel += (numels.first if plan.first else 0) + (numels.last if plan.last else 0)
        params = int(numel * bytes_per_param)
        optimizer = int(numel * optimizer_bytes_per_param)
        per_chunk = max((sum(kept_per_layer[i] for i in chunk) for chunk in plan.chunks), default=0)
        acts = (plan.in_flight * per_chunk + (head_activations if plan.last else 0)) // seq_split
        peak = params + optimizer + max(acts + transient, params + transient)
        layers = ",".join(_span(chunk) for chunk in plan.chunks)
        out.append(StageMemory(plan.rank, layers, plan.in_flight, params, params, optimizer, acts, peak))
    return out
