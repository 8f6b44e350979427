"""Parameter roles, read from the module structure, and the per-role settings they imply.

Every optimizer here groups parameters by role, one param group per role present:

* ``embedding``: the weight of an ``nn.Embedding``;
* ``head``: a parameter of a module whose qualified name matches ``head_pattern`` (default:
  a path component ``lm_head`` or ``output``), unless it is an embedding (tied weights);
* ``norm`` / ``bias``: 1-D (or 0-D) parameters, ``bias`` when the name ends in ``bias``;
* ``matrix``: every other parameter (2-D and up).

Roles decide weight decay (none on norms, biases and embeddings by default), which
parameters Muon orthogonalises (``matrix`` only), and muP learning-rate scaling: a
``matrix`` parameter's lr is multiplied by ``base_width / width``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Group order in ``param_groups`` (stable, so logs and checkpoints read the same way).
ROLES: tuple[str, ...] = ("embedding", "matrix", "head", "norm", "bias")

DEFAULT_HEAD_PATTERN = r"(^|\.)(lm_head|output)(\.|$)"


@dataclass(frozen=True, slots=True)
class NamedParam:
    """A parameter with its fully qualified name (the key of all state) and its role."""

    name: str
    param: torch.Tensor
    role: str


def classify(model: nn.Module, *, head_pattern: str = DEFAULT_HEAD_PATTERN) -> list[NamedParam]:
    """The model's trainable parameters in ``named_parameters`` order, each with its role."""
    from torch import nn

    try:
        head_re = re.compile(head_pattern)
    except re.error as exc:
        raise ValueError(f"head_pattern = {head_pattern!r} is not a valid regular expression: {exc}") from exc
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module_path = name.rpartition(".")[0]
        if id(p) in embeddings:
            role = "embedding"
        elif head_re.search(module_path) and p.dim() >= 2:
            role = "head"
        elif p.dim() <= 1:
            role = "bias" if name.endswith("bias") else "norm"
        else:
            role = "matrix"
        out.append(NamedParam(name, p, role))
    if not out:
        raise ValueError("the model has no trainable parameters; nothing to optimize")
    return out


def check_roles(key: str, roles: Iterable[str]) -> tuple[str, ...]:
    """Validate a config list of role names."""
    given = roles
    roles = tuple(roles)
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ValueError(f"{key} = {given!r} names unknown role {bad[0]!r}; allowed roles: {list(ROLES)}")
    return roles


def mup_lr_multiplier(role: str, *, base_width: int | None, width: int | None) -> float:
    """muP: hidden (``matrix``) parameters' lr scales by ``base_width / width``; others keep theirs."""
    if base_width is None and width is None:
        return 1.0
    if base_width is None or width is None:
        raise ValueError(
            f"mup_base_width = {base_width!r}, mup_width = {width!r}; muP scaling needs both (positive ints) or neither"
        )
    for key, value in (("mup_base_width", base_width), ("mup_width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} = {value!r}; allowed: a positive int")
    return base_width / width if role == "matrix" else 1.0


def group_by_role(named: Sequence[NamedParam]) -> dict[str, list[NamedParam]]:
    """Parameters bucketed by role, in ``ROLES`` order, roles without parameters left out."""
    buckets: dict[str, list[NamedParam]] = {r: [] for r in ROLES}
    for n in named:
        buckets[n.role].append(n)
    return {r: ps for r, ps in buckets.items() if ps}
