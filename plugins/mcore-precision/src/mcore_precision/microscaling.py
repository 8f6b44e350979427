"""Recipes ``mxfp8`` and ``nvfp4``: microscaled GEMMs for the model's matrix linears (formats in ``mx`` and
``nvfp4``; which linears are swapped, and the first/last N layers kept high precision, as for ``fp8-*``).

* ``mxfp8``: every operand of every GEMM in 1x32 blocks along the GEMM's reduction dim with E8M0
  power-of-two scales (``scale_rounding``: ``up``, NVIDIA's rule, no element saturates; ``floor``, the OCP
  rule); inputs and weights E4M3, gradients ``grad_format``. Each GEMM layout is quantised from the
  high-precision tensor (the row- and column-wise copies).
* ``nvfp4``: E2M1 elements with E4M3 scales per 1x16 block (16x16 for weights) and an fp32 per-tensor scale
  applied in fp32; the random Hadamard transform on both weight-gradient operands (``hadamard``) and
  stochastic rounding of the gradients only (``stochastic_rounding``), its draws from ``seed`` (each linear
  its own stream: ``seed`` plus the linear's index), so a run is repeatable; where each stream stands is the
  recipe's state (``state_dict``), so a resumed run draws what the uninterrupted one would have.

``mxfp8`` also takes MoE's grouped expert GEMMs (``grouped_linear``); ``nvfp4`` leaves them to the reference.
The GEMMs are emulated on every device here (quantise, dequantise exactly, multiply in fp32): the native
block-scaled kernels are Blackwell's (not written yet); accumulation differs from the hardware's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from mcore.errors import ConfigError
from mcore_precision.formats import FORMATS
from mcore_precision.fp8 import _choice, _count, _QuantizedRecipe
from mcore_precision.scaling import MXScheme, NVFP4Scheme, Scheme

__all__ = ["MXFP8", "NVFP4"]


class MXFP8(_QuantizedRecipe):
    """MXFP8 (module docstring)."""

    name: ClassVar[str] = "mxfp8"

    @dataclass(kw_only=True, slots=True)
    class Config(_QuantizedRecipe.Config):
        grad_format: Literal["e4m3", "e5m2"] = "e4m3"
        """Format of the output gradients' elements (inputs and weights are E4M3)."""
        scale_rounding: Literal["up", "floor"] = "up"
        """'up': NVIDIA's E8M0 scale (rounded up, nothing saturates); 'floor': the OCP spec's."""

        def __post_init__(self) -> None:
            _QuantizedRecipe.Config.__post_init__(self)
            _choice("grad_format", self.grad_format, tuple(FORMATS))
            _choice("scale_rounding", self.scale_rounding, ("up", "floor"))

    def _scheme(self, path: str) -> Scheme:
        return MXScheme(FORMATS[self.config.grad_format], self.config.scale_rounding)

    def _grouped_scheme(self) -> Scheme | None:
        return self._scheme("")


class NVFP4(_QuantizedRecipe):
    """NVFP4 (module docstring)."""

    name: ClassVar[str] = "nvfp4"

    @dataclass(kw_only=True, slots=True)
    class Config(_QuantizedRecipe.Config):
        hadamard: bool = True
        """The random Hadamard transform on the weight-gradient GEMM's operands."""
        stochastic_rounding: bool = True
        """Gradients rounded stochastically (inputs and weights always to nearest)."""
        seed: int = 0
        """Seed of the Hadamard signs and of the stochastic rounding draws."""

        def __post_init__(self) -> None:
            _QuantizedRecipe.Config.__post_init__(self)
            for key in ("hadamard", "stochastic_rounding"):
                if not isinstance(getattr(self, key), bool):
                    raise ConfigError(f"precision.{key} = {getattr(self, key)!r}; allowed: true, false")
            _count("seed", self.seed, 0)

    def __init__(self, config: NVFP4.Config | None = None) -> None:
        super().__init__(config)
        self.schemes: dict[str, NVFP4Scheme] = {}  # by linear path
        self._pending: dict[str, torch.Tensor] = {}  # loaded before prepare

    def _scheme(self, path: str) -> Scheme:
        cfg = self.config
        scheme = NVFP4Scheme(
            seed=cfg.seed + len(self.schemes) + 1, hadamard=cfg.hadamard, stochastic=cfg.stochastic_rounding
        )
        if path in self._pending:
            scheme.load_rng_state(self._pending.pop(path))
        self.schemes[path] = scheme
        return scheme

    def state_dict(self) -> dict[str, Any]:
        """Where each linear's stochastic-rounding draws stand (``<path>.rng``; none before the first draw)."""
        states = {f"{path}.rng": scheme.rng_state() for path, scheme in self.schemes.items()}
        return {key: state for key, state in states.items() if state is not None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            path, _, field = key.rpartition(".")
            if field != "rng":
                raise ValueError(f"recipe 'nvfp4' state has an unknown key {key!r} (allowed: '<linear path>.rng')")
            if self.schemes and path not in self.schemes:
                raise ValueError(
                    f"recipe 'nvfp4' state names {path!r}, which is no NVFP4 linear of this model "
                    "(allowed: the same model and first/last_layers_bf16 as the checkpoint)"
                )
            states[path] = value
        if self.schemes:
            for path, state in states.items():
                self.schemes[path].load_rng_state(state)
        else:
            self._pending = states
