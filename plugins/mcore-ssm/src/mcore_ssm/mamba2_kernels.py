"""Which implementation of Mamba2's chunked scan runs: chosen here, once per call, not in the block.

``auto``: the Triton forward (``mcore_ssm.mamba2_triton``; backward by the torch reference) for CUDA tensors
when Triton imports and the chunk size is a power of two >= 16, outside ``torch.compile`` tracing (the
compiler fuses the reference instead); the torch chunked reference (``mcore_ssm.mamba2_reference``)
everywhere else. ``torch`` always takes the reference; ``triton`` always the kernel (on CPU only under
``TRITON_INTERPRET=1``, Triton's interpreter, for checking it). ``MCORE_SSM_KERNELS=reference`` makes
``auto`` take the reference. CPU calls never import Triton.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from mcore_ssm.mamba2_reference import ssd_chunked

KERNELS: tuple[str, ...] = ("auto", "torch", "triton")


def triton_chunk(chunk_size: int) -> bool:
    """Whether the Triton kernels take this chunk size (a power of two >= 16: ``tl.arange``, ``tl.dot`` sizes)."""
    return chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0


def pick(kernel: str, device: torch.device, chunk_size: int) -> str:
    """``"torch"`` or ``"triton"``: what ``kernel`` (``KERNELS``) means for tensors on ``device``."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel = {kernel!r}; allowed: {', '.join(KERNELS)}")
    if kernel != "auto":
        return kernel
    usable = (
        device.type == "cuda"
        and triton_chunk(chunk_size)
        and os.environ.get("MCORE_SSM_KERNELS", "") != "reference"
        and not torch.compiler.is_compiling()
        and importlib.util.find_spec("triton") is not None
    )
    return "triton" if usable else "torch"


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ssd_chunked``'s arguments and results, computed by the implementation ``kernel`` picks."""
    kwargs = {
        "dt_bias": dt_bias,
        "dt_softplus": dt_softplus,
        "dt_limit": dt_limit,
        "initial_state": initial_state,
        "cu_seqlens": cu_seqlens,
        "chunk_size": chunk_size,
    }
    if pick(kernel, x.device, chunk_size) == "triton":
        from mcore_ssm.mamba2_triton import ssd_chunked_triton

        return ssd_chunked_triton(x, dt, A, B, C, D, **kwargs)  # type: ignore[arg-type]
    return ssd_chunked(x, dt, A, B, C, D, **kwargs)  # type: ignore[arg-type]
