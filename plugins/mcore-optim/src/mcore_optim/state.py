"""The state-dict format shared by every optimizer here, and the checks made on load.

Layout (a nested dict that ``torch.distributed.checkpoint`` saves and reshards)::

    {
      "format": 1,
      "algorithm": "adamw" | "muon",          # state of one is meaningless to the other
      "params": {fqn: "4096x2048", ...},      # every model parameter and its global shape
      "groups": {role: {"lr": ..., "initial_lr": ..., "weight_decay": ...}},
      "state": {fqn: {"step": t, "exp_avg": t, ...}},
    }

State is keyed by fully qualified name, never by position, so the same checkpoint loads
into ``adamw``, ``distributed-adamw`` and ``layerwise-distributed`` alike, under any
data-parallel size. Every rank's state dict names every parameter. A state tensor is a
``DTensor`` where the optimizer shards it (laid out like an FSDP parameter; ``distributed-adamw``
and ``layerwise-distributed`` re-shard theirs by rows over the data-parallel group), otherwise
a full tensor; ``load_state_dict`` accepts either form, and keeps this rank's rows by the
parameter's real row split (which may be ragged: ``mcore.ragged``; a saved DTensor split
another way is gathered first). Shapes are strings so the header is plain JSON.

A state tensor may also be saved *flat*: 1-D, the parameter's elements in row-major order.
``distributed-adamw`` on a layout's pieces (ZeRO-1 through ``mcore.protocols.sharded_grads``,
``zero_pieces``) saves its moments and masters so, as row-ragged ``Shard(0)`` DTensors whose
local part is this rank's piece. Every optimizer here loads a flat tensor where it expects the
parameter's shape (``unflatten``: made whole, then reshaped), and ``zero_pieces`` loads the
parameter-shaped form, so checkpoints still move between them and across DP sizes.

Param groups are matched by role. A role the saved state has no group for (a parameter's
declared role changed since: ``gpt``'s head, which a name pattern used to make a ``matrix``)
keeps its configured lr and weight decay, with a warning; the parameters' state still loads by
name, and is refused where its keys differ (a head Muon saved as a matrix has a momentum, not
AdamW's moments).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mcore_optim.dist import counts_of, shards_of, whole
from mcore_optim.roles import NamedParam

FORMAT = 1


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape) or "scalar"


def header(algorithm: str, named: Sequence[NamedParam], groups: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "algorithm": algorithm,
        "params": {n.name: shape_text(n.param.shape) for n in named},
        "groups": {
            g["role"]: {"lr": float(g["lr"]), "initial_lr": float(g["initial_lr"]), "weight_decay": g["weight_decay"]}
            for g in groups
        },
    }


def check(
    state_dict: Mapping[str, Any],
    algorithm: str,
    named: Sequence[NamedParam],
    groups: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Refuse state that was not saved for this model; the error names the first mismatch."""
    missing = [k for k in ("format", "algorithm", "params", "groups", "state") if k not in state_dict]
    if missing:
        raise ValueError(
            f"optimizer state dict lacks key {missing[0]!r}; expected a state dict made by an mcore-optim "
            f"optimizer (keys format, algorithm, params, groups, state), got keys {sorted(state_dict)}"
        )
    if state_dict["format"] != FORMAT:
        raise ValueError(f"optimizer state format = {state_dict['format']!r}; this version reads format {FORMAT}")
    if state_dict["algorithm"] != algorithm:
        raise ValueError(
            f"optimizer state algorithm = {state_dict['algorithm']!r}, but this optimizer is {algorithm!r}; "
            "state of one algorithm cannot resume another"
        )
    saved: Mapping[str, str] = state_dict["params"]
    model = {n.name: shape_text(n.param.shape) for n in named}
    for name, shape in model.items():
        if name not in saved:
            extra = next((s for s in saved if s not in model), None)
            hint = f" (the state has {extra!r}, which the model lacks)" if extra else ""
            raise ValueError(f"model parameter {name!r} has no saved optimizer state{hint}; refusing to load")
        if saved[name] != shape:
            raise ValueError(
                f"model parameter {name!r} has shape {shape}, but its saved optimizer state is for shape "
                f"{saved[name]}; refusing to load"
            )
    for name in saved:
        if name not in model:
            raise ValueError(f"saved optimizer state has parameter {name!r}, which the model lacks; refusing to load")
    missing = [g["role"] for g in groups if g["role"] not in state_dict["groups"]]
    if missing:
        warnings.warn(
            f"saved optimizer state has no param group for role {missing[0]!r} (it has "
            f"{sorted(state_dict['groups'])}): a parameter's declared role changed since it was saved (e.g. gpt's head, "
            "which the old name pattern lm_head|output made a matrix); that group keeps the configured lr and weight decay",
            UserWarning,
            stacklevel=3,
        )


def take(
    saved: Mapping[str, Any], name: str, key: str, like: torch.Tensor, param: torch.Tensor | None = None
) -> torch.Tensor:
    """This rank's piece of ``saved[name][key]``, checked against ``like`` (the local state tensor).

    ``param`` is given for state laid out like its parameter (moments, master weights): the
    saved tensor must have the parameter's global shape (or be its flat form) and this rank keeps its shard.
    Collective where ``param`` or the saved value is a DTensor (see ``take_all``).
    """
    return take_all(saved, [(name, key, like, param)])[0]


def take_all(
    saved: Mapping[str, Any], wanted: Sequence[tuple[str, str, torch.Tensor, torch.Tensor | None]]
) -> list[torch.Tensor]:
    """``take`` for many ``(name, key, like, param)`` entries: every check first (a refusal raises
    on every rank before any communication), then each rank's pieces by the parameters' real
    row splits in one batched look-up (``dist.shards_of``): every rank passes the same entries
    in the same order."""
    values = [_checked(saved, name, key, like, param) for name, key, like, param in wanted]
    sharded = [i for i, (_, _, _, param) in enumerate(wanted) if param is not None]
    shapes = [param.shape for _, _, _, param in wanted if param is not None]
    for i, value in zip(sharded, unflatten([values[i] for i in sharded], shapes)):  # saved flat: whole, reshaped
        values[i] = value
    pieces = list(values)
    for i, piece in zip(sharded, shards_of([values[i] for i in sharded], [wanted[i][3] for i in sharded])):  # type: ignore[misc]
        pieces[i] = piece
    return [piece.to(device=like.device, dtype=like.dtype) for piece, (_, _, like, _) in zip(pieces, wanted)]


def _checked(
    saved: Mapping[str, Any], name: str, key: str, like: torch.Tensor, param: torch.Tensor | None
) -> torch.Tensor:
    try:
        value = saved[name][key]
    except KeyError:
        raise ValueError(f"saved optimizer state lacks {key!r} for parameter {name!r}; refusing to load") from None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"saved optimizer state {name!r}.{key!r} is a {type(value).__name__}, expected a tensor")
    expected = param.shape if param is not None else like.shape
    if tuple(value.shape) != tuple(expected) and not (param is not None and is_flat(value, param.shape)):
        raise ValueError(
            f"saved optimizer state {name!r}.{key!r} has shape {shape_text(value.shape)}, expected "
            f"{shape_text(expected)}; refusing to load"
        )
    return value


def is_flat(value: torch.Tensor, shape: Sequence[int]) -> bool:
    """Whether ``value`` is the flat form of a state tensor of a parameter of ``shape`` (1-D, the parameter's element
    count, and not the parameter's own shape)."""
    return value.dim() == 1 and tuple(value.shape) != tuple(shape) and value.numel() == math.prod(shape)


def unflatten(values: Sequence[torch.Tensor], shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Each flat value (``is_flat``) made whole and reshaped to its parameter's ``shape``; the others as they are.

    Collective where a flat value is a DTensor (one batched row-count look-up, then a gather each): every rank
    passes the same values in the same order.
    """
    flat = [i for i, (value, shape) in enumerate(zip(values, shapes, strict=True)) if is_flat(value, shape)]
    out = list(values)
    for i, counts in zip(flat, counts_of([values[i] for i in flat])):
        out[i] = whole(values[i], counts).reshape(tuple(shapes[i]))
    return out


def restore_groups(groups: Sequence[dict[str, Any]], saved: Mapping[str, Mapping[str, Any]]) -> None:
    """Put the saved lr (and weight decay) back into the param groups, matched by role (``check`` ran);
    a group the state lacks keeps its configured values."""
    for g in groups:
        s = saved.get(g["role"])
        if s is None:
            continue
        g["lr"], g["initial_lr"], g["weight_decay"] = float(s["lr"]), float(s["initial_lr"]), s["weight_decay"]
