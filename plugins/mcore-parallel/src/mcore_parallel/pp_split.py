"""How ``pp`` cuts a model's layers into stages, and the one-line refusals of cuts that cannot work.

A run of ``pp`` ranks with ``v`` virtual stages each (interleaved schedules) has ``pp * v`` stages;
stage ``s`` sits on rank ``s % pp`` (looped placement: rank ``r`` holds stages ``r, r + pp, ...``).
``stage_counts`` gives each stage's layer count, from (in this order of precedence) an explicit
``split``, ``first_stage_layers``/``last_stage_layers`` (the first stage also runs the embedding and
the last the loss head and MTP depths, so they are often given fewer layers, as Megatron's
``account_for_embedding``/``account_for_loss`` do) with the rest spread evenly, or an even split
(the earlier stages one layer longer when it does not divide). Every refusal is one ``UserError``
line naming the values and a cut that would work; ``check_run`` raises them before launch.
"""

from __future__ import annotations

from collections.abc import Sequence

from mcore.errors import UserError


def even_counts(layers: int, stages: int) -> list[int]:
    """``layers`` over ``stages``, the first ``layers % stages`` stages one layer longer."""
    base, extra = divmod(layers, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]


def _stages_text(pp: int, virtual: int) -> str:
    if virtual == 1:
        return f"parallel.sizes.pp = {pp} stages"
    return f"parallel.sizes.pp = {pp} x parallel.pp.virtual_stages = {virtual} = {pp * virtual} stages"


def _suggest(layers: int, pp: int, virtual: int) -> str:
    """A stage count that works for ``layers`` (for the messages)."""
    if layers >= pp:
        return f"virtual_stages <= {layers // pp} with pp = {pp}"
    return f"pp <= {layers} (e.g. pp = {max(1, layers)}, virtual_stages = 1)"


def stage_counts(
    layers: int,
    pp: int,
    virtual: int = 1,
    *,
    split: Sequence[int] | None = None,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
) -> list[int]:
    """The layer count of each of the ``pp * virtual`` stages, in stage order (module docstring)."""
    stages = pp * virtual
    if split is not None:
        counts = list(split)
        least = [0 if s in (0, stages - 1) else 1 for s in range(stages)]  # a middle stage needs parameters
        if len(counts) != stages or any(
            isinstance(c, bool) or not isinstance(c, int) or c < low for c, low in zip(counts, least)
        ):
            raise UserError(
                f"parallel.pp.split = {counts} for {_stages_text(pp, virtual)}; allowed: {stages} layer counts "
                f"summing to {layers}, >= 1 except the first and last (>= 0), e.g. {even_counts(layers, stages)}"
            )
        if sum(counts) != layers:
            raise UserError(
                f"parallel.pp.split = {counts} sums to {sum(counts)}, but the model has {layers} layers; allowed: "
                f"{stages} counts summing to {layers}, e.g. {even_counts(layers, stages)}"
            )
        return counts
    if layers < stages:
        raise UserError(
            f"the model's {layers} layers cannot fill {_stages_text(pp, virtual)} (each needs one); allowed: "
            f"{_suggest(layers, pp, virtual)}, or an explicit parallel.pp.split"
        )
    if first_stage_layers is None and last_stage_layers is None:
        return even_counts(layers, stages)
    first, last = first_stage_layers, last_stage_layers
    for key, value in (("first_stage_layers", first), ("last_stage_layers", last)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise UserError(f"parallel.pp.{key} = {value!r}; allowed: a layer count >= 0")
    if stages == 1:
        fixed = first if first is not None else last
        if fixed != layers:
            raise UserError(
                f"parallel.pp first_stage_layers/last_stage_layers = {fixed} with one stage of {layers} layers; "
                f"allowed: leave them out under one stage"
            )
        return [layers]
    middle = stages - (first is not None) - (last is not None)
    rest = layers - (first or 0) - (last or 0)
    if rest < 0 or (middle > 0 and rest < middle) or (middle == 0 and rest != 0):
        want = even_counts(layers, stages)
        raise UserError(
            f"parallel.pp.first_stage_layers = {first}, last_stage_layers = {last} leave {rest} of the model's "
            f"{layers} layers for {middle} other stages of {_stages_text(pp, virtual)}; allowed: values leaving at "
            f"least one layer per other stage (e.g. first_stage_layers = {want[0]}, last_stage_layers = {want[-1]})"
        )
    counts = even_counts(rest, middle) if middle else []
    if first is not None:
        counts.insert(0, first)
    if last is not None:
        counts.append(last)
    return counts


def stage_ranges(counts: Sequence[int]) -> list[range]:
    """Consecutive layer ranges of the given counts."""
    out, start = [], 0
    for count in counts:
        out.append(range(start, start + count))
        start += count
    return out


def rank_stages(rank: int, pp: int, virtual: int) -> list[int]:
    """The stages rank ``rank`` holds under looped placement: ``rank, rank + pp, ...``."""
    return [rank + chunk * pp for chunk in range(virtual)]


def check_micro_batches(micro_batches: int, pp: int, schedule: str) -> None:
    """Interleaved schedules send micro-batches in groups of ``pp``: their count must be a multiple of it."""
    if schedule == "interleaved" and micro_batches % pp:
        low = max(pp, micro_batches // pp * pp)
        raise UserError(
            f"parallel.pp.schedule = 'interleaved' needs micro-batches in groups of parallel.sizes.pp = {pp}, but a "
            f"step has {micro_batches} per pipeline; allowed: a multiple of {pp} (e.g. {low} or {low + pp}: "
            "train.global_batch_size / (data-parallel ranks x train.micro_batch_size))"
        )
