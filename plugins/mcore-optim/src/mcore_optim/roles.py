"""Parameter roles, as the model declares them, and the per-role settings they imply.

Every optimizer here groups parameters by role, one param group per role present. The roles
come from the model (``mcore.params.collect_param_specs``: what its blocks and the model
declare, and the structural fallback for the rest: an ``nn.Embedding`` weight is
``embedding``, 0-D/1-D parameters are ``norm`` or ``bias``, the rest ``matrix``), then the
user's ``role_overrides`` (``{regex on the parameter name: role}``). No name is guessed here:
a model that names its head ``head`` or ``lm_head`` declares it.

Roles decide weight decay (none on norms, biases and embeddings by default), which
parameters Muon orthogonalises (``matrix`` and ``expert``), and muP learning-rate scaling:
a hidden (``matrix`` or ``expert``) parameter's lr is multiplied by ``base_width / width``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mcore.params import ROLES as PARAM_ROLES
from mcore.params import ParamSpec, apply_role_overrides, collect_param_specs

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Group order in ``param_groups`` (stable, so logs and checkpoints read the same way).
ROLES: tuple[str, ...] = ("embedding", "matrix", "expert", "router", "head", "norm", "bias")
assert sorted(ROLES) == sorted(PARAM_ROLES), "every declared role has a param group"

#: Hidden matrices: muP scales their lr; Muon orthogonalises them.
HIDDEN_ROLES: tuple[str, ...] = ("matrix", "expert")


@dataclass(frozen=True, slots=True)
class NamedParam:
    """A parameter with its fully qualified name (the key of all state) and its declared spec."""

    name: str
    param: torch.Tensor
    spec: ParamSpec

    @property
    def role(self) -> str:
        return self.spec.role


def classify(model: nn.Module, *, role_overrides: Mapping[str, str] | None = None) -> list[NamedParam]:
    """The model's trainable parameters in ``named_parameters`` order, each with its declared spec."""
    specs = collect_param_specs(model)
    if role_overrides:
        specs = apply_role_overrides(specs, role_overrides)
    elif not any(callable(getattr(m, "param_specs", None)) for m in model.modules()):
        warnings.warn(
            f"model {type(model).__name__} declares no parameter roles (no module defines param_specs(), see "
            "mcore.params): roles come from structure alone, so an output head is treated as a hidden matrix; "
            "declare them, or set optimizer.role_overrides (e.g. {'^lm_head\\.': 'head'})",
            UserWarning,
            stacklevel=3,
        )
    out = [NamedParam(name, p, specs[name]) for name, p in model.named_parameters() if p.requires_grad]
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


def check_role_overrides(overrides: Mapping[str, str]) -> None:
    """``role_overrides`` of a config: valid patterns and known roles (``ValueError`` naming the bad one)."""
    apply_role_overrides({}, overrides)


def mup_lr_multiplier(role: str, *, base_width: int | None, width: int | None) -> float:
    """muP: hidden (``matrix``, ``expert``) parameters' lr scales by ``base_width / width``; others keep theirs."""
    if base_width is None and width is None:
        return 1.0
    if base_width is None or width is None:
        raise ValueError(
            f"mup_base_width = {base_width!r}, mup_width = {width!r}; muP scaling needs both (positive ints) or neither"
        )
    for key, value in (("mup_base_width", base_width), ("mup_width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} = {value!r}; allowed: a positive int")
    return base_width / width if role in HIDDEN_ROLES else 1.0


def group_by_role(named: Sequence[NamedParam]) -> dict[str, list[NamedParam]]:
    """Parameters bucketed by role, in ``ROLES`` order, roles without parameters left out."""
    buckets: dict[str, list[NamedParam]] = {r: [] for r in ROLES}
    for n in named:
        buckets[n.role].append(n)
    return {r: ps for r, ps in buckets.items() if ps}
