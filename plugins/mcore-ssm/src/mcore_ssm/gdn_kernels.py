"""Which implementation of the chunked gated delta rule runs: chosen here, once per call, not in the block.

``auto``: the Triton kernels (``mcore_ssm.gdn_triton``, forward and backward) for CUDA tensors
when Triton imports and the chunk is 64, outside ``torch.compile`` tracing (the compiler fuses the
reference instead); the torch chunked reference (``mcore_ssm.gdn_reference``) everywhere else.
``torch`` always takes the reference; ``triton`` always the kernel (on CPU only under ``TRITON_INTERPRET=1``,
Triton's interpreter, for checking it). ``MCORE_SSM_KERNELS=reference`` makes ``auto`` take the reference.
CPU calls never import Triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from mcore_ssm.gdn_reference import chunk_gated_delta_rule
from mcore_ssm.packing import Segments

KERNELS: tuple[str, ...] = ("auto", "torch", "triton")


def pick(kernel: str, device: torch.device, chunk_size: int) -> str:
    """``"torch"`` or ``"triton"``: what ``kernel`` (``KERNELS``) means for tensors on ``device``."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel = {kernel!r}; allowed: {', '.join(KERNELS)}")
    if kernel != "auto":
        return kernel
    usable = (
        device.type == "cuda"
        and chunk_size == 64
        and os.environ.get("MCORE_SSM_KERNELS", "") != "reference"
        and not torch.compiler.is_compiling()
        and importlib.util.find_spec("triton") is not None
    )
    return "triton" if usable else "torch"


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    kernel: str = "auto",
    segments: Segments | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``chunk_gated_delta_rule``'s arguments and results, computed by the implementation ``kernel`` picks."""
    kwargs = {
        "segments": segments,
        "scale": scale,
        "initial_state": initial_state,
        "cu_seqlens": cu_seqlens,
        "output_final_state": output_final_state,
        "chunk_size": chunk_size,
    }
    if pick(kernel, v.device, chunk_size) == "triton":
        from mcore_ssm.gdn_triton import gated_delta_rule_triton

        return gated_delta_rule_triton(q, k, v, g, beta, **kwargs)  # type: ignore[arg-type]
    return chunk_gated_delta_rule(q, k, v, g, beta, **kwargs)  # type: ignore[arg-type]
