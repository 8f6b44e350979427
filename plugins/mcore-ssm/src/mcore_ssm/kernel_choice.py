"""Which implementation of a chunked scan runs (the ``kernel`` setting of the ``gdn`` and ``mamba2`` blocks).

Why: both scans choose the same way, once per call, not in the block; ``gdn_kernels`` and ``mamba2_kernels`` say
only which chunk sizes their Triton kernels take. ``auto``: Triton for CUDA tensors when Triton imports and the
kernel takes the chunk size and ``MCORE_SSM_KERNELS=triton`` opts in, outside ``torch.compile`` tracing (the
compiler fuses the torch reference instead); the torch reference everywhere else. Opt-in: the first timings on a
card (H100, 2026-12-06, ``benchmarks/RESULTS.md``) found GDN's forward 7x slower than fla's and Mamba2's
forward + backward only 1.3x the compiled reference; both were rewritten the same day and have not run on a GPU
since, so they stay opt-in until ``benchmarks/bench_gdn.py`` / ``bench_mamba2.py`` time the rewrites. ``torch``
always takes the reference; ``triton`` always the kernel (on CPU only under ``TRITON_INTERPRET=1``, Triton's
interpreter, for checking it). CPU calls never import Triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch

KERNELS: tuple[str, ...] = ("auto", "torch", "triton")


def check_kernel(kernel: object, key: str = "kernel") -> None:
    """``ValueError`` naming ``key`` unless ``kernel`` is one of ``KERNELS``."""
    if kernel not in KERNELS:
        raise ValueError(f"{key} = {kernel!r}; allowed: {', '.join(KERNELS)}")


def choose(kernel: str, device: torch.device, *, triton_takes: bool) -> str:
    """``"torch"`` or ``"triton"``: what ``kernel`` (``KERNELS``) means for tensors on ``device``, where
    ``triton_takes`` says whether the Triton kernel supports the call's chunk size."""
    check_kernel(kernel)
    if kernel != "auto":
        return kernel
    usable = (
        device.type == "cuda"
        and triton_takes
        and os.environ.get("MCORE_SSM_KERNELS", "") == "triton"  # opt-in until checked on a card (module docstring)
        and not torch.compiler.is_compiling()
        and importlib.util.find_spec("triton") is not None
    )
    return "triton" if usable else "torch"
