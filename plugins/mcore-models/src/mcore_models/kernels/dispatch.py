"""Pick a kernel or its PyTorch reference once per device type, not with ``if`` chains in models.

A ``Dispatched`` function looks at the device type of its first tensor argument, resolves the
implementation for that type on the first call (Triton on CUDA when it imports, the reference
everywhere else) and remembers it. CPU calls never import Triton. ``MCORE_MODELS_KERNELS=reference``
forces the references everywhere (for debugging and for the eager baselines of the benchmarks).

Inside a region ``torch.compile`` traces (``train.compile = "blocks"``) the reference runs: dynamo
cannot trace a raw Triton launch inside an ``autograd.Function`` (torch 2.11 fails with an
assertion in ``overwrite_tensor_vt_proxy`` on our RoPE), and inductor fuses the references into
kernels of its own, as fast as ours (RESULTS.md, "compiled" column).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch


def triton_usable() -> bool:
    """Whether Triton kernels may run: CUDA present, Triton importable, not disabled by the env."""
    if os.environ.get("MCORE_MODELS_KERNELS", "") == "reference":
        return False
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


class Dispatched:
    """A function with a reference implementation and an optional Triton one for CUDA tensors."""

    def __init__(self, name: str, reference: Callable[..., Any], triton_ref: str) -> None:
        self.name = name
        self.reference = reference
        self.triton_ref = triton_ref  # "module:function", imported on first CUDA call
        self._by_device: dict[str, Callable[..., Any]] = {}

    def implementation(self, device_type: str) -> Callable[..., Any]:
        fn = self._by_device.get(device_type)
        if fn is None:
            fn = self.reference
            if device_type == "cuda" and triton_usable():
                module_name, _, attr = self.triton_ref.partition(":")
                fn = getattr(importlib.import_module(module_name), attr)
            self._by_device[device_type] = fn
        return fn

    def __call__(self, first: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # traced: the reference, which inductor fuses (module docstring)
            return self.reference(first, *args, **kwargs)
        return self.implementation(first.device.type)(first, *args, **kwargs)
