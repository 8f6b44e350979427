"""Whether a fused Triton kernel of this package runs for a tensor, or its torch reference.

Why a module: the SwiGLU activation (``swiglu``) and the permutation/combine (``permute``) choose the same way, once
per call: Triton for CUDA tensors with storage (not the fake tensors of ``mcore plan``'s estimate) when Triton
imports, outside ``torch.compile`` tracing (the compiler fuses the torch reference itself); the torch reference
everywhere else (CPU calls never import Triton). ``kernel``: ``auto``
(that rule), ``torch`` (always the reference) or ``triton`` (always the kernel: on the CPU only under
``TRITON_INTERPRET=1``, Triton's interpreter, for checking it).

The experts' gate-and-up grouped GEMM has its own choice (``grouped_gemm``): ``torch._grouped_mm`` then the SwiGLU
kernel (``torch``, the default) or the Triton grouped GEMM with the SwiGLU in its epilogue (``triton``,
``mcore_moe.grouped_swiglu_triton``), named by the environment variable ``MCORE_MOE_GROUPED_GEMM``: opt-in until
a benchmark on a card shows it beats ``torch._grouped_mm``; the Triton one runs only where ``use_triton`` holds.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

import torch

from mcore.errors import UserError

KERNELS: tuple[str, ...] = ("auto", "torch", "triton")
GROUPED_GEMM_ENV = "MCORE_MOE_GROUPED_GEMM"
GROUPED_GEMMS: tuple[str, ...] = ("torch", "triton")


def use_triton(x: torch.Tensor, kernel: str = "auto") -> bool:
    """Whether ``kernel`` (``KERNELS``) means the Triton kernel for ``x``; ``ValueError`` naming it otherwise."""
    if kernel not in KERNELS:
        raise UserError(f"moe: kernel = {kernel!r}; allowed: {', '.join(KERNELS)}")
    if kernel != "auto":
        return kernel == "triton"
    from torch._subclasses.fake_tensor import is_fake

    return (
        x.is_cuda
        and not torch.compiler.is_compiling()
        and not is_fake(x)
        and importlib.util.find_spec("triton") is not None
    )


def grouped_gemm(x: torch.Tensor, environ: Mapping[str, str] | None = None) -> str:
    """The gate-and-up grouped GEMM for rows ``x``: ``triton`` where ``MCORE_MOE_GROUPED_GEMM=triton`` and
    ``use_triton(x)``, else ``torch``; ``ValueError`` naming another value of the variable."""
    value = (os.environ if environ is None else environ).get(GROUPED_GEMM_ENV, "torch") or "torch"
    if value not in GROUPED_GEMMS:
        raise UserError(f"moe: {GROUPED_GEMM_ENV} = {value!r}; allowed: {', '.join(GROUPED_GEMMS)}")
    return "triton" if value == "triton" and use_triton(x) else "torch"
