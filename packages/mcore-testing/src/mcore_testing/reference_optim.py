"""``reference-adamw``: ``torch.optim.AdamW`` behind the optimizer protocol, for tests.

Its state dict is keyed by parameter name and records shapes, so runtime tests in the
core's own environment (which holds no optimizer plugin) can checkpoint and resume. It reports
its state size (``OptimizerStateSize``) for ``mcore plan``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mcore.params import ParamSpec


class NamedAdamW:
    """A ``MeshOptimizer``: AdamW with name-keyed, shape-checked state."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> None:
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.inner = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, betas=betas, foreach=False)
        self.param_groups = self.inner.param_groups
        for group in self.param_groups:
            group["role"] = "all"

    def step(self) -> None:
        self.inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state = {}
        for name, p in zip(self.names, self.params):
            s = self.inner.state.get(p, {})
            state[name] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
        return {
            "state": state,
            "shapes": {n: list(p.shape) for n, p in zip(self.names, self.params)},
            "lr": [g["lr"] for g in self.param_groups],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        shapes = state_dict["shapes"]
        for name, p in zip(self.names, self.params):
            if name not in shapes:
                raise ValueError(f"optimizer state has no entry for parameter {name!r}")
            if list(shapes[name]) != list(p.shape):
                raise ValueError(
                    f"optimizer state for {name!r} has shape {shapes[name]}, parameter has {list(p.shape)}"
                )
            for key in ("exp_avg", "exp_avg_sq"):  # torch's AdamW keeps its moments in the parameter's dtype
                saved = state_dict["state"].get(name, {}).get(key)
                if torch.is_tensor(saved) and saved.dtype != p.dtype:
                    raise ValueError(
                        f"optimizer state {key!r} of {name!r} is {saved.dtype}, the parameter is {p.dtype} "
                        "(the run's parameter dtype changed); allowed: the dtype it was saved with"
                    )
        extra = set(shapes) - set(self.names)
        if extra:
            raise ValueError(f"optimizer state has parameters the model lacks: {sorted(extra)[:3]}")
        for name, p in zip(self.names, self.params):
            s = state_dict["state"].get(name, {})
            if s:
                self.inner.state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
        for group, lr in zip(self.param_groups, state_dict["lr"]):
            group["lr"] = lr


class ReferenceAdamW:
    """Factory registered as optimizer ``reference-adamw`` by ``mcore_testing.plugin``."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        lr: float = 1e-3
        weight_decay: float = 0.0
        beta1: float = 0.9
        beta2: float = 0.95

    def __init__(self, config: ReferenceAdamW.Config | None = None) -> None:
        self.config = config or ReferenceAdamW.Config()

    def build(self, model: nn.Module, *, mesh: Any, layouts: Sequence[Any]) -> NamedAdamW:
        c = self.config
        return NamedAdamW(model, c.lr, c.weight_decay, (c.beta1, c.beta2))

    def state_bytes(self, shape: tuple[int, ...], spec: ParamSpec, *, param_dtype: torch.dtype) -> int:
        """``torch.optim.AdamW``'s: a 0-d fp32 step and two moments in the parameter's dtype."""
        return 4 + 2 * math.prod(shape) * param_dtype.itemsize

    def shards_state_over_dp(self, *, sharded_params: bool) -> bool:
        return False
