"""Recipes ``fp8-current`` and ``fp8-delayed``: per-tensor scaled FP8 GEMMs for the model's matrix linears.

``prepare`` casts the model to ``params`` (bf16 by default; the optimizer keeps fp32 masters) and puts an
``FP8Linear`` (``fp8_linear``) in place of every ``nn.Linear`` whose weight's declared role
(``mcore.params``) is ``matrix``: embedding, head, router and expert weights stay in high precision, and
so do the linears of the first ``first_layers_bf16`` and last ``last_layers_bf16`` layers (the entries of
the model's ``layers`` list). Inputs and weights are quantised to E4M3, output gradients to
``grad_format`` (E5M2 by default, or E4M3).

Scales are per tensor, ``fmax / amax / 2**margin``:

* ``fp8-current``: from each tensor's amax at the moment it is quantised (one extra pass over it, no state);
* ``fp8-delayed``: from an amax history of the last ``amax_history_len`` steps per tensor (weights, inputs,
  gradients of every FP8 linear): ``max`` over the window or the ``most_recent`` step. A step records each
  tensor's amax (the max over its micro-batches) in slot 0 and quantises with the scale computed at the end
  of the previous step (``update``); the first time a tensor is seen its current amax is used. The histories
  and scales are the recipe's state (``state_dict``), so a resumed run quantises exactly as the first one.
  With several ranks, ``update`` first reduces each step's amaxes (max) over all ranks, so every rank holds
  the same histories and scales (and the checkpoint's one copy of them resumes every rank exactly).

A NaN/inf amax is never recorded (the step is skipped by the finiteness check anyway) and never turns
into a scale. Which GEMM path runs (native ``torch._scaled_mm`` or the fp32 emulation) is ``fp8_linear``'s
choice; ``gemm = "emulated"`` forces the emulation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import nn

from mcore.errors import ConfigError
from mcore.params import collect_param_specs
from mcore.precision.basic import PlainRecipe
from mcore_precision.formats import E4M3, FORMATS, FP8Format, amax_to_scale, tensorwise_scale
from mcore_precision.fp8_linear import FP8Linear, Scaler

__all__ = ["CurrentScaler", "DelayedScaler", "FP8Current", "FP8Delayed", "fp8_linear_names"]

_OPERANDS = ("input", "weight", "grad")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


class CurrentScaler:
    """The scale of a tensor from its own amax, every time."""

    def __init__(self, fmt: FP8Format, margin: int) -> None:
        self.fmt, self.margin = fmt, margin

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return tensorwise_scale(x, self.fmt, self.margin)


class DelayedScaler:
    """The scale of a tensor from its amax history (module docstring); ``advance`` ends a step."""

    def __init__(self, fmt: FP8Format, margin: int, history_len: int, algo: str) -> None:
        self.fmt, self.margin, self.algo = fmt, margin, algo
        self.history = torch.zeros(history_len, dtype=torch.float32)  # slot 0: this step
        self.current = torch.ones((), dtype=torch.float32)  # the scale used this step
        self.seen = torch.zeros((), dtype=torch.bool)

    def move_to(self, device: torch.device) -> None:
        if self.history.device != device:
            self.history, self.current, self.seen = (t.to(device) for t in (self.history, self.current, self.seen))

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:  # shape-only runs (memory planning): no state to touch
            return torch.ones((), device=x.device)
        self.move_to(x.device)
        amax = x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
        finite = torch.isfinite(amax)
        self.history[0] = torch.where(finite, torch.maximum(self.history[0], amax), self.history[0])
        # first sight: this amax; afterwards the scale fixed at the end of the previous step
        fresh = torch.where(finite, amax_to_scale(amax, self.fmt, self.margin), self.current)
        self.current = torch.where(self.seen, self.current, fresh)
        self.seen = self.seen | finite
        return self.current

    def advance(self) -> None:
        amax = self.history.amax() if self.algo == "max" else self.history[0]
        usable = self.seen & (amax > 0)
        self.current = torch.where(usable, amax_to_scale(amax, self.fmt, self.margin), self.current)
        self.history = torch.roll(self.history, 1)
        self.history[0] = 0.0

    def state(self) -> dict[str, torch.Tensor]:
        return {"history": self.history.clone(), "scale": self.current.clone(), "seen": self.seen.clone()}

    def load(self, state: dict[str, torch.Tensor], where: str) -> None:
        history = torch.as_tensor(state["history"], dtype=torch.float32)
        if history.shape != self.history.shape:
            raise ValueError(
                f"{where}: amax history of length {history.shape[0]} in the checkpoint, "
                f"amax_history_len = {self.history.shape[0]} now; allowed: the same length"
            )
        device = self.history.device
        self.history = history.to(device).clone()
        self.current = torch.as_tensor(state["scale"], dtype=torch.float32).to(device).clone()
        self.seen = torch.as_tensor(state["seen"], dtype=torch.bool).to(device).clone()


def _layer_count(model: nn.Module) -> int | None:
    count = getattr(model, "stage_layers", None)
    if callable(count):
        return int(count())
    layers = getattr(model, "layers", None)
    return len(layers) if isinstance(layers, (nn.ModuleList, nn.ModuleDict)) else None


def fp8_linear_names(model: nn.Module, *, first_layers_bf16: int = 0, last_layers_bf16: int = 0) -> list[str]:
    """The module paths of the ``nn.Linear``s an fp8 recipe quantises: those whose weight's declared role is
    ``matrix``, outside the first/last N layers."""
    specs = collect_param_specs(model)
    layers = _layer_count(model)
    if (first_layers_bf16 or last_layers_bf16) and layers is None:
        raise ConfigError(
            "precision.first_layers_bf16 / last_layers_bf16 need a model with a 'layers' list; "
            f"{type(model).__name__} has none (allowed: 0 for such a model)"
        )
    keep = set(range(first_layers_bf16)) | set(range((layers or 0) - last_layers_bf16, layers or 0))
    names = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, FP8Linear):
            continue
        spec = specs.get(f"{path}.weight" if path else "weight")
        if spec is None or spec.role != "matrix":
            continue
        layer = _LAYER.search(path)
        if layer is not None and int(layer.group(1)) in keep:
            continue
        names.append(path)
    return names


class _FP8Recipe(PlainRecipe):
    """What ``fp8-current`` and ``fp8-delayed`` share: the swap, the plain loss and gradients, no gather payload."""

    name: ClassVar[str] = "fp8"
    master_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32

    @dataclass(kw_only=True, slots=True)
    class Config:
        params: Literal["bf16", "fp32"] = "bf16"
        """dtype of the parameters (and of everything that is not an FP8 GEMM); masters are fp32."""
        grad_format: Literal["e5m2", "e4m3"] = "e5m2"
        """Format of the output gradients in backward (inputs and weights are always E4M3)."""
        margin: int = 0
        """Scales are ``fmax / amax / 2**margin``: headroom of ``margin`` binades."""
        first_layers_bf16: int = 0
        """The first N layers keep high-precision linears."""
        last_layers_bf16: int = 0
        """The last N layers keep high-precision linears."""
        gemm: Literal["auto", "emulated"] = "auto"
        """'auto': torch._scaled_mm where the card and shapes allow, else emulated; 'emulated': always emulated."""

        def __post_init__(self) -> None:
            _choice("params", self.params, ("bf16", "fp32"))
            _choice("grad_format", self.grad_format, tuple(FORMATS))
            _choice("gemm", self.gemm, ("auto", "emulated"))
            for key in ("margin", "first_layers_bf16", "last_layers_bf16"):
                _count(key, getattr(self, key), 0)

    config: Any

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else type(self).Config()
        self.param_dtype = torch.bfloat16 if self.config.params == "bf16" else torch.float32

    def _scaler(self, fmt: FP8Format) -> Scaler:
        raise NotImplementedError

    def _adopt(self, name: str, scalers: dict[str, Scaler]) -> None:
        """Hook for recipes with state: keep the new linear's scalers under its name."""

    def prepare(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        model = model.to(dtype=self.param_dtype)
        names = fp8_linear_names(model, first_layers_bf16=cfg.first_layers_bf16, last_layers_bf16=cfg.last_layers_bf16)
        grad_fmt = FORMATS[cfg.grad_format]
        for path in names:
            linear = model.get_submodule(path)
            assert isinstance(linear, nn.Linear)
            scalers = {"input": self._scaler(E4M3), "weight": self._scaler(E4M3), "grad": self._scaler(grad_fmt)}
            self._adopt(path, scalers)
            new = FP8Linear.from_linear(linear, **scalers, native=cfg.gemm == "auto")  # type: ignore[arg-type]
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
        return model

    def update(self) -> None:
        return None


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"precision.{key} = {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")


def _count(key: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"precision.{key} = {value!r}; allowed: an int >= {low}")


class FP8Current(_FP8Recipe):
    """Per-tensor FP8 with scales from the current amax (module docstring)."""

    name: ClassVar[str] = "fp8-current"

    @dataclass(kw_only=True, slots=True)
    class Config(_FP8Recipe.Config):
        pass

    def _scaler(self, fmt: FP8Format) -> Scaler:
        return CurrentScaler(fmt, self.config.margin)


class FP8Delayed(_FP8Recipe):
    """Per-tensor FP8 with scales from an amax history (module docstring)."""

    name: ClassVar[str] = "fp8-delayed"

    @dataclass(kw_only=True, slots=True)
    class Config(_FP8Recipe.Config):
        amax_history_len: int = 16
        """Steps of amax history kept per tensor."""
        amax_compute_algo: Literal["max", "most_recent"] = "max"
        """'max': the largest amax of the window; 'most_recent': the last step's."""

        def __post_init__(self) -> None:
            _FP8Recipe.Config.__post_init__(self)
            _count("amax_history_len", self.amax_history_len, 1)
            _choice("amax_compute_algo", self.amax_compute_algo, ("max", "most_recent"))

    def __init__(self, config: FP8Delayed.Config | None = None) -> None:
        super().__init__(config)
        self.scalers: dict[str, DelayedScaler] = {}  # "<linear path>.<operand>"
        self._pending: dict[str, dict[str, torch.Tensor]] = {}  # loaded before prepare
        self._checked = False  # the ranks' scaler counts compared (several ranks only)

    def _scaler(self, fmt: FP8Format) -> Scaler:
        cfg = self.config
        return DelayedScaler(fmt, cfg.margin, cfg.amax_history_len, cfg.amax_compute_algo)

    def _adopt(self, name: str, scalers: dict[str, Scaler]) -> None:
        for operand, scaler in scalers.items():
            assert isinstance(scaler, DelayedScaler)
            key = f"{name}.{operand}"
            if key in self._pending:
                scaler.load(self._pending.pop(key), f"recipe 'fp8-delayed', {key}")
            self.scalers[key] = scaler

    def update(self) -> None:
        self._agree_over_ranks()
        for scaler in self.scalers.values():
            scaler.advance()

    def _agree_over_ranks(self) -> None:
        """Every rank ends the step with the same histories: this step's amax of each tensor is the max over the
        ranks that saw it (ranks read different data, sequence parts or pipeline stages), in one all-reduce.

        Then every rank quantises with the same scales from the next step on, and the checkpoint (which keeps
        one copy of the recipe's state) resumes every rank exactly. Every rank prepared the same whole model
        (``prepare`` runs before the layouts), so every rank holds the same scalers, in the same order; the
        first call checks that once. A single process needs none of it.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2 or not self.scalers:
            return
        scalers = list(self.scalers.values())
        device = next((s.history.device for s in scalers if s.history.device.type != "cpu"), torch.device("cpu"))
        if dist.get_backend() == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        if not self._checked:
            counts = torch.tensor([len(scalers), -len(scalers)], dtype=torch.float64, device=device)
            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
            if counts[0].item() != -counts[1].item():
                raise RuntimeError(
                    "fp8-delayed: the ranks hold different numbers of FP8 linears; every rank must prepare the same "
                    "whole model before the layouts"
                )
            self._checked = True
        for scaler in scalers:
            scaler.move_to(device)
        packed = torch.stack([torch.stack([s.history[0], s.seen.float()]) for s in scalers])  # (scalers, 2)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        for scaler, (amax, seen) in zip(scalers, packed.unbind(0)):
            scaler.history[0] = amax
            scaler.seen = seen > 0

    def state_dict(self) -> dict[str, Any]:
        return {f"{key}.{field}": t for key, s in self.scalers.items() for field, t in s.state().items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for full, value in state_dict.items():
            key, _, field = full.rpartition(".")
            if field not in ("history", "scale", "seen") or key.rpartition(".")[2] not in _OPERANDS:
                raise ValueError(f"recipe 'fp8-delayed' state has an unknown key {full!r}")
            grouped.setdefault(key, {})[field] = value
        if self.scalers:  # prepared already: the state must be for these linears
            unknown = sorted(set(grouped) - set(self.scalers))
            if unknown:
                raise ValueError(
                    f"recipe 'fp8-delayed' state names {unknown[0]!r}, which is no FP8 linear of this model "
                    "(allowed: the same model and first/last_layers_bf16 as the checkpoint)"
                )
            for key, state in grouped.items():
                self.scalers[key].load(state, f"recipe 'fp8-delayed', {key}")
        else:
            self._pending = grouped
