"""Recipe ``fp16``: fp16 compute with dynamic loss scaling.

fp16 has 5 exponent bits: small gradients underflow to zero unless the loss is multiplied by a large
scale before ``backward`` and the gradients divided by it after. The scale is dynamic:

* ``unscale_grads`` divides every gradient by the scale and answers whether they are all finite, as
  a 0-d bool tensor on the gradients' device (no host sync; the run loop combines it over the ranks
  and skips the optimizer step when any rank saw inf/NaN);
* ``update`` (once per step, skipped or not) multiplies the scale by ``backoff_factor`` after a
  step with inf/NaN gradients, and by ``growth_factor`` after ``growth_interval`` finite steps in a
  row; the scale stays in ``[min_scale, max_scale]``. All of it runs on the device (``torch.where``).
  All ranks change the scale alike: ``update(finite=...)`` takes the step's answer agreed over the ranks;
  without it the ranks' answers are combined in one tiny all-reduce (``_agreed``).

``params = "fp16"`` stores parameters in fp16 (the optimizer keeps fp32 masters);
``params = "fp32"`` keeps fp32 parameters and runs the forward under fp16 autocast (gradients are fp32).
The scale and the count of finite steps are the recipe's state (``state_dict``), so a resumed run
continues with the same scale.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import nn

from mcore.errors import ConfigError
from mcore.precision.basic import PlainRecipe, grads_finite

__all__ = ["FP16"]


def _agreed(finite: torch.Tensor) -> torch.Tensor:
    """This rank's finiteness combined over all ranks of the run.

    Every rank must change its scale alike: gradients scaled differently on different ranks would be
    summed by the layouts' reductions before they are unscaled. Ranks whose gradients differ (fsdp shards,
    pipeline stages) can disagree, so without the agreed answer from the caller (``update(finite=...)``)
    the ranks agree here, in one tiny all-reduce over the run's ranks (every rank calls ``update`` once a
    step). A single process needs none.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return finite
    bad = torch.logical_not(finite).to(torch.float32).reshape(1)
    if dist.get_backend() == "nccl" and bad.device.type != "cuda":
        bad = bad.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return (bad[0] == 0).to(finite.device)


def _local(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_local() if hasattr(grad, "to_local") else grad  # a DTensor's own rows


class FP16(PlainRecipe):
    """fp16 with dynamic loss scaling (module docstring)."""

    name: ClassVar[str] = "fp16"
    master_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32

    @dataclass(kw_only=True, slots=True)
    class Config:
        params: Literal["fp16", "fp32"] = "fp16"
        """'fp16': fp16 parameters and GEMMs, fp32 masters in the optimizer; 'fp32': fp32 parameters, fp16 autocast."""
        initial_scale: float = 2.0**16
        """The loss scale of the first step."""
        growth_interval: int = 2000
        """Finite steps in a row after which the scale grows."""
        growth_factor: float = 2.0
        """What the scale is multiplied by after ``growth_interval`` finite steps (> 1)."""
        backoff_factor: float = 0.5
        """What the scale is multiplied by after a step with inf/NaN gradients (in (0, 1))."""
        min_scale: float = 1.0
        """The scale never goes below this."""
        max_scale: float = 2.0**24
        """The scale never grows beyond this."""

        def __post_init__(self) -> None:
            if self.params not in ("fp16", "fp32"):
                raise ConfigError(f"precision.params = {self.params!r}; allowed: 'fp16', 'fp32'")
            for key in ("initial_scale", "min_scale", "max_scale", "growth_factor", "backoff_factor"):
                value = getattr(self, key)
                if (
                    isinstance(value, bool)
                    or not isinstance(value, (int, float))
                    or not math.isfinite(value)
                    or value <= 0
                ):
                    raise ConfigError(f"precision.{key} = {value!r}; allowed: a finite number > 0")
            if not self.growth_factor > 1:
                raise ConfigError(f"precision.growth_factor = {self.growth_factor!r}; allowed: a number > 1")
            if not self.backoff_factor < 1:
                raise ConfigError(f"precision.backoff_factor = {self.backoff_factor!r}; allowed: a number in (0, 1)")
            if not self.min_scale <= self.initial_scale <= self.max_scale:
                raise ConfigError(
                    f"precision.initial_scale = {self.initial_scale!r} with min_scale = {self.min_scale!r}, "
                    f"max_scale = {self.max_scale!r}; allowed: min_scale <= initial_scale <= max_scale"
                )
            interval = self.growth_interval
            if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
                raise ConfigError(f"precision.growth_interval = {interval!r}; allowed: an int >= 1")

    def __init__(self, config: FP16.Config | None = None) -> None:
        self.config = config or FP16.Config()
        self.param_dtype = torch.float16 if self.config.params == "fp16" else torch.float32
        self.scale = torch.tensor(float(self.config.initial_scale), dtype=torch.float32)
        self.good_steps = torch.zeros((), dtype=torch.int64)  # finite steps since the scale last changed
        self._finite: torch.Tensor | None = None  # this step's answer of unscale_grads, read by update

    # -- model and forward ------------------------------------------------------------------------
    def autocast(self) -> AbstractContextManager[Any]:
        if self.config.params == "fp16":
            return nullcontext()
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device_type=device_type, dtype=torch.float16)

    # -- scaling ----------------------------------------------------------------------------------
    def _on(self, device: torch.device) -> None:
        if self.scale.device != device:
            self.scale = self.scale.to(device)
            self.good_steps = self.good_steps.to(device)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        self._on(loss.device)
        return loss.float() * self.scale

    def unscale_grads(self, model: nn.Module, *, finite_from_norm: bool = False) -> torch.Tensor:
        """Divide every gradient by the scale in place; whether all are finite (0-d bool tensor, no host sync).
        The answer is always looked for (``finite_from_norm`` or not): ``update`` without the run loop's agreed
        finiteness backs off from it."""
        grads = [_local(p.grad.detach()) for p in model.parameters() if p.grad is not None]
        grads = [g for g in grads if g.numel()]
        if grads:
            self._on(grads[0].device)
            inverse = self.scale.double().reciprocal().float()
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for g in grads:
                by_device.setdefault(g.device, []).append(g)
            for device, group in by_device.items():
                torch._foreach_mul_(group, inverse.to(device))
        self._finite = grads_finite(model)
        return self._finite

    def update(self, finite: bool | torch.Tensor | None = None) -> None:
        """Back off after a step with inf/NaN gradients, grow after ``growth_interval`` finite ones.

        ``finite``: the step's finiteness agreed over all ranks, when the caller has it; else the answers
        of the last ``unscale_grads`` of all ranks, combined here (``_agreed``; no call since: nothing to
        update)."""
        seen = self._finite if finite is None else finite
        self._finite = None
        if seen is None:
            return
        if finite is None:
            seen = _agreed(torch.as_tensor(seen, device=self.scale.device))
        cfg = self.config
        ok = torch.as_tensor(seen, device=self.scale.device).to(torch.bool)
        count = torch.where(ok, self.good_steps + 1, torch.zeros_like(self.good_steps))
        grow = count >= cfg.growth_interval
        factor = torch.where(ok, torch.where(grow, cfg.growth_factor, 1.0), cfg.backoff_factor)
        self.scale = (self.scale * factor).clamp(cfg.min_scale, cfg.max_scale)
        self.good_steps = torch.where(grow, torch.zeros_like(count), count)

    # -- FSDP gather, steps, checkpoints ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale.detach().clone(), "good_steps": self.good_steps.detach().clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"scale", "good_steps"}:
            raise ValueError(f"recipe 'fp16' state has keys {sorted(state_dict)}; expected ['good_steps', 'scale']")
        self.scale = torch.as_tensor(state_dict["scale"], dtype=torch.float32).detach().clone()
        self.good_steps = torch.as_tensor(state_dict["good_steps"], dtype=torch.int64).detach().clone()
        self._finite = None
