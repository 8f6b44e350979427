"""The quantisation kernels: each entry point runs its Triton kernel on CUDA tensors when Triton imports, and its
torch reference (``reference``) everywhere else. Every kernel equals its reference byte for byte on the card
(``test_kernels_gpu``: 62 cases on an H100, torch 2.11, Triton 3.6, 2026-12-06, after the FP8 rounding moved off
the card's conversion, ``_common.HW_CVT_ON_CUDA``) and is 2x to 37x faster than the eager reference
(``benchmarks/bench_quant.py``, same card and date: ``benchmarks/RESULTS.md``), so they are the default on CUDA.
The choice is made once per device type, not with ``if`` chains in the schemes; CPU calls never import Triton.

Entry points (signatures and results in ``reference``; every kernel equals its reference byte for byte):
``quantize_tensorwise`` (``tensorwise``: amax, then one fused cast + transpose; or cast with a given scale
and the amax in the same pass), ``quantize_rowwise`` (``rowwise``), ``quantize_blockwise`` (``blockwise``:
1x128 / 128x128), ``quantize_mx`` (``mx``: 1x32 E8M0), ``quantize_nvfp4`` (``nvfp4``: E2M1 values, E4M3 block
and fp32 tensor scales, nearest or stochastic rounding with the reference's draws).

``MCORE_PRECISION_KERNELS=reference`` forces the references everywhere (debugging, the eager baselines of
``benchmarks/bench_quant.py``); ``triton`` (or unset) lets the kernels run on CUDA; any other value is an error. Inside a region ``torch.compile`` traces the reference runs (inductor fuses
it; dynamo does not trace a raw Triton launch).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

from mcore.errors import UserError

__all__ = [
    "Dispatched",
    "quantize_blockwise",
    "quantize_mx",
    "quantize_nvfp4",
    "quantize_rowwise",
    "quantize_tensorwise",
    "triton_usable",
]


#: Values of ``MCORE_PRECISION_KERNELS`` (unset is ``triton``).
CHOICES = ("triton", "reference")


def triton_usable() -> bool:
    """Whether Triton kernels may run: not forced off (``MCORE_PRECISION_KERNELS=reference``), CUDA present, Triton
    importable. ``UserError`` (one line from the CLI) naming the variable for a value outside ``CHOICES``."""
    choice = os.environ.get("MCORE_PRECISION_KERNELS", "") or "triton"
    if choice not in CHOICES:
        raise UserError(f"MCORE_PRECISION_KERNELS = {choice!r}; allowed: {', '.join(CHOICES)} (unset: triton)")
    if choice == "reference":
        return False
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def _load(ref: str) -> Callable[..., Any]:
    module, _, attr = ref.partition(":")
    fn: Callable[..., Any] = getattr(importlib.import_module(module), attr)
    return fn


class Dispatched:
    """A function with a torch reference and a Triton kernel for CUDA tensors, both named ``"module:function"``
    and imported on first use (the references import the format modules, which call back into here)."""

    def __init__(self, name: str, reference: str, kernel: str) -> None:
        self.name, self.reference_ref, self.kernel_ref = name, reference, kernel
        self._by_device: dict[str, Callable[..., Any]] = {}

    @property
    def reference(self) -> Callable[..., Any]:
        return _load(self.reference_ref)

    def implementation(self, device_type: str) -> Callable[..., Any]:
        fn = self._by_device.get(device_type)
        if fn is None:
            usable = device_type == "cuda" and triton_usable()
            fn = _load(self.kernel_ref if usable else self.reference_ref)
            self._by_device[device_type] = fn
        return fn

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # traced: the reference, which inductor fuses (module docstring)
            return self.reference(x, *args, **kwargs)
        return self.implementation(x.device.type)(x, *args, **kwargs)


_REF = "mcore_precision.kernels.reference"
quantize_tensorwise = Dispatched(
    "quantize_tensorwise", f"{_REF}:quantize_tensorwise", "mcore_precision.kernels.tensorwise:quantize_tensorwise"
)
quantize_rowwise = Dispatched(
    "quantize_rowwise", f"{_REF}:quantize_rowwise", "mcore_precision.kernels.rowwise:quantize_rowwise"
)
quantize_blockwise = Dispatched(
    "quantize_blockwise", f"{_REF}:quantize_blockwise", "mcore_precision.kernels.blockwise:quantize_blockwise"
)
quantize_mx = Dispatched("quantize_mx", f"{_REF}:quantize_mx", "mcore_precision.kernels.mx:quantize_mx")
quantize_nvfp4 = Dispatched("quantize_nvfp4", f"{_REF}:quantize_nvfp4", "mcore_precision.kernels.nvfp4:quantize_nvfp4")
