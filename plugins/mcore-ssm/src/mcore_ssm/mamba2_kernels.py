"""Which implementation of Mamba2's chunked scan runs (``kernel_choice``): the Triton forward
(``mcore_ssm.mamba2_triton``, forward and backward; chunk sizes that are powers of two >= 16) or the
torch chunked reference (``mcore_ssm.mamba2_reference``).
"""

from __future__ import annotations

from typing import Any, Unpack

import torch

from mcore_ssm.kernel_choice import KERNELS, choose
from mcore_ssm.mamba2_reference import CHUNK, ScanOptions, ssd_chunked

__all__ = ["KERNELS", "pick", "ssd_scan", "triton_chunk"]


def triton_chunk(chunk_size: int) -> bool:
    """Whether the Triton kernels take this chunk size (a power of two >= 16: ``tl.arange``, ``tl.dot`` sizes)."""
    return chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0


def pick(kernel: str, device: torch.device, chunk_size: int) -> str:
    """``"torch"`` or ``"triton"``: what ``kernel`` (``KERNELS``) means for tensors on ``device``."""
    return choose(kernel, device, triton_takes=triton_chunk(chunk_size))


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    kernel: str = "auto",
    **options: Unpack[ScanOptions],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ssd_chunked``'s arguments and results, computed by the implementation ``kernel`` picks."""
    if pick(kernel, x.device, options.get("chunk_size", CHUNK)) == "triton":
        return _triton_scan(x, dt, A, B, C, D, **options)
    return ssd_chunked(x, dt, A, B, C, D, **options)


@torch.compiler.disable  # under torch.compile (train.compile = "blocks") the kernels run as they are, between graphs
def _triton_scan(*args: Any, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from mcore_ssm.mamba2_triton import ssd_chunked_triton

    return ssd_chunked_triton(*args, **options)
