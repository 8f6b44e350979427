"""Recipes ``fp32`` and ``bf16``: no quantized GEMMs, no loss scaling.

``bf16`` has two modes: ``params = "bf16"`` (bf16 parameters and GEMMs; the optimizer keeps
fp32 master weights, Megatron's default) and ``params = "fp32"`` (fp32 parameters, bf16
compute under ``torch.autocast``).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from mcore.norms import fp32_norms
from mcore.params import ParamSpec
from mcore.protocols.precision import GatherPayload


def grads_finite(model: nn.Module) -> torch.Tensor:
    """Whether every gradient on this rank is finite: a 0-d bool tensor on the gradients' device, computed
    there (no host sync: the run loop reads it inside its one all-reduce of the step)."""
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    # this rank's part of each gradient (a DTensor's local rows may be none: ragged splits)
    local = [t for g in grads if (t := g.to_local() if hasattr(g, "to_local") else g).numel()]
    if not local:
        return torch.ones((), dtype=torch.bool)
    peaks = fp32_norms(local, math.inf)  # each gradient's largest magnitude; NaN propagates
    return torch.isfinite(torch.stack([t.to(peaks[0].device) for t in peaks])).all()


class PlainRecipe:
    """A recipe that scales nothing and keeps no state: the base of ``fp32``/``bf16``, and of a plugin's recipe,
    which overrides what differs (``prepare`` to swap in its GEMM modules, ``scale_loss``/``update`` to scale,
    ``gather_payload``/``unpack`` to gather quantised weights, ``state_dict`` for its state)."""

    name: ClassVar[str] = "plain"
    param_dtype: torch.dtype = torch.float32
    master_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(dtype=self.param_dtype)

    def autocast(self) -> AbstractContextManager[Any]:
        return nullcontext()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_grads(self, model: nn.Module, *, finite_from_norm: bool = False) -> bool | torch.Tensor:
        """Nothing to unscale: whether this rank's gradients are finite, or ``True`` without looking when the run
        loop judges that from the global gradient norm (``finite_from_norm``: a NaN or Inf element makes the norm
        NaN or Inf, so a scan of its own would be a second pass over every gradient for the same answer)."""
        return True if finite_from_norm else grads_finite(model)

    def update(self) -> None:
        return None

    def gather_payload(
        self, param_shard: torch.Tensor, *, name: str = "", spec: ParamSpec | None = None
    ) -> GatherPayload | None:
        return None

    def unpack(self, gathered: tuple[torch.Tensor, ...], metadata: Any) -> torch.Tensor:
        return gathered[0]

    def after_step(self, model: nn.Module) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            raise ValueError(f"recipe {self.name!r} keeps no state, got keys {sorted(state_dict)}")


class FP32(PlainRecipe):
    """Everything in fp32."""

    name: ClassVar[str] = "fp32"

    def __init__(self, config: Any = None) -> None:
        self.config = config


class BF16(PlainRecipe):
    """bf16 compute with fp32 master weights and fp32 gradient reduction."""

    name: ClassVar[str] = "bf16"

    @dataclass(kw_only=True, slots=True)
    class Config:
        params: Literal["bf16", "fp32"] = "bf16"
        """'bf16': bf16 parameters and GEMMs, fp32 master weights in the optimizer; 'fp32': fp32 parameters, bf16 autocast."""

    def __init__(self, config: BF16.Config | None = None) -> None:
        self.config = config or BF16.Config()
        self.param_dtype = torch.bfloat16 if self.config.params == "bf16" else torch.float32

    def autocast(self) -> AbstractContextManager[Any]:
        if self.config.params == "bf16":
            return nullcontext()
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
