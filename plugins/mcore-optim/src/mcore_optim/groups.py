"""Param groups (one per role) and the bookkeeping every optimizer here shares.

A group is a dict with ``role``, ``params``, ``names``, ``lr`` (what schedules write),
``initial_lr`` (the role's base lr after muP scaling; a schedule sets
``lr = initial_lr * multiplier``) and ``weight_decay``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mcore_optim.roles import NamedParam, group_by_role


def make_groups(named: Sequence[NamedParam], settings: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """One group per role present in ``named``; ``settings[role]`` gives its lr and weight decay."""
    groups = []
    for role, members in group_by_role(named).items():
        lr = float(settings[role]["lr"])
        groups.append(
            {
                "role": role,
                "params": [n.param for n in members],
                "names": [n.name for n in members],
                "lr": lr,
                "initial_lr": lr,
                "weight_decay": float(settings[role]["weight_decay"]),
            }
        )
    return groups


def zero_grad(groups: Sequence[Mapping[str, Any]], set_to_none: bool = True) -> None:
    for g in groups:
        for p in g["params"]:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()


def set_lr_multiplier(optimizer: Any, multiplier: float) -> None:
    """What a training loop does with a schedule: ``lr = initial_lr * schedule(step)`` per group."""
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * multiplier
