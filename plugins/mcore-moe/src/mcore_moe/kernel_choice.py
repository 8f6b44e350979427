"""Whether a fused Triton kernel of this package runs for a tensor, or its torch reference.

Why a module: the SwiGLU activation (``swiglu``) and the permutation/combine (``permute``) choose the same way, once
per call: Triton for CUDA tensors with storage (not the fake tensors of ``mcore plan``'s estimate) when Triton
imports, outside ``torch.compile`` tracing (the compiler fuses the torch reference itself); the torch reference
everywhere else (CPU calls never import Triton). ``kernel``: ``auto``
(that rule), ``torch`` (always the reference) or ``triton`` (always the kernel: on the CPU only under
``TRITON_INTERPRET=1``, Triton's interpreter, for checking it).
"""

from __future__ import annotations

import importlib.util

import torch

KERNELS: tuple[str, ...] = ("auto", "torch", "triton")


def use_triton(x: torch.Tensor, kernel: str = "auto") -> bool:
    """Whether ``kernel`` (``KERNELS``) means the Triton kernel for ``x``; ``ValueError`` naming it otherwise."""
    if kernel not in KERNELS:
        raise ValueError(f"moe: kernel = {kernel!r}; allowed: {', '.join(KERNELS)}")
    if kernel != "auto":
        return kernel == "triton"
    from torch._subclasses.fake_tensor import is_fake

    return (
        x.is_cuda
        and not torch.compiler.is_compiling()
        and not is_fake(x)
        and importlib.util.find_spec("triton") is not None
    )
