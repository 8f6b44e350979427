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
    "load_references",
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
    and imported on first use (the references import the format modules, which call back into here).

    ``traced_on_cpu``: whether a compiled region on CPU traces the reference (inductor fuses it) or runs it
    eagerly (a graph break): inductor's CPU code generator fails on the block reshapes of the 1x128 / 128x128
    and MXFP8 references (``InductorError`` in its loop split, torch 2.13, 2026-12-07), so those run eagerly
    there; on CUDA every reference is traced."""

    def __init__(self, name: str, reference: str, kernel: str, *, traced_on_cpu: bool = True) -> None:
        self.name, self.reference_ref, self.kernel_ref = name, reference, kernel
        self.traced_on_cpu = traced_on_cpu
        self._by_device: dict[str, Callable[..., Any]] = {}
        self._reference: Callable[..., Any] | None = None
        self._eager_reference: Callable[..., Any] | None = None

    @property
    def reference(self) -> Callable[..., Any]:
        """The torch reference, imported once (``load_references`` does it before ``torch.compile`` traces a
        call: dynamo does not trace an import)."""
        if self._reference is None:
            self._reference = _load(self.reference_ref)
        return self._reference

    def implementation(self, device_type: str) -> Callable[..., Any]:
        fn = self._by_device.get(device_type)
        if fn is None:
            usable = device_type == "cuda" and triton_usable()
            fn = _load(self.kernel_ref if usable else self.reference_ref)
            self._by_device[device_type] = fn
        return fn

    def eager_reference(self) -> Callable[..., Any]:
        """The reference wrapped to run outside any compiled region (``traced_on_cpu``), made once; made here,
        not at import, because ``torch.compiler.disable`` imports dynamo, which imports Triton compiled (the
        interpreter tests need Triton's language unbuilt until they build it)."""
        if self._eager_reference is None:
            self._eager_reference = torch.compiler.disable(self.reference)
        return self._eager_reference

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # traced: the reference, which inductor fuses (module docstring)
            if x.device.type == "cpu" and not self.traced_on_cpu:
                return self.eager_reference()(x, *args, **kwargs)
            return self.reference(x, *args, **kwargs)
        return self.implementation(x.device.type)(x, *args, **kwargs)


def load_references() -> None:
    """Import every entry point's reference now (the recipes call it when they prepare a model), so a compiled
    region that quantises (``torch.compile`` traces the references) finds them loaded instead of breaking its
    graph on the import."""
    for entry in (quantize_tensorwise, quantize_rowwise, quantize_blockwise, quantize_mx, quantize_nvfp4):
        entry.reference  # noqa: B018 - the property imports and keeps it


_REF = "mcore_precision.kernels.reference"
quantize_tensorwise = Dispatched(
    "quantize_tensorwise", f"{_REF}:quantize_tensorwise", "mcore_precision.kernels.tensorwise:quantize_tensorwise"
)
quantize_rowwise = Dispatched(
    "quantize_rowwise", f"{_REF}:quantize_rowwise", "mcore_precision.kernels.rowwise:quantize_rowwise"
)
quantize_blockwise = Dispatched(
    "quantize_blockwise",
    f"{_REF}:quantize_blockwise",
    "mcore_precision.kernels.blockwise:quantize_blockwise",
    traced_on_cpu=False,
)
quantize_mx = Dispatched(
    "quantize_mx", f"{_REF}:quantize_mx", "mcore_precision.kernels.mx:quantize_mx", traced_on_cpu=False
)
quantize_nvfp4 = Dispatched("quantize_nvfp4", f"{_REF}:quantize_nvfp4", "mcore_precision.kernels.nvfp4:quantize_nvfp4")
