"""Which implementation of the chunked gated delta rule runs (``kernel_choice``): the Triton kernels
(``mcore_ssm.gdn_triton``, forward and backward; chunk 64 only) or the torch chunked reference
(``mcore_ssm.gdn_reference``).
"""

from __future__ import annotations

from typing import Any, Unpack

import torch

from mcore_ssm.gdn_reference import CHUNK, ChunkRuleOptions, chunk_gated_delta_rule
from mcore_ssm.kernel_choice import KERNELS, choose

__all__ = ["KERNELS", "gated_delta_rule", "pick"]


def pick(kernel: str, device: torch.device, chunk_size: int) -> str:
    """``"torch"`` or ``"triton"``: what ``kernel`` (``KERNELS``) means for tensors on ``device``."""
    return choose(kernel, device, triton_takes=chunk_size == CHUNK)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    kernel: str = "auto",
    **options: Unpack[ChunkRuleOptions],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``chunk_gated_delta_rule``'s arguments and results, computed by the implementation ``kernel`` picks."""
    if pick(kernel, v.device, options.get("chunk_size", CHUNK)) == "triton":
        return _triton_rule(q, k, v, g, beta, **options)
    return chunk_gated_delta_rule(q, k, v, g, beta, **options)


@torch.compiler.disable  # under torch.compile (train.compile = "blocks") the kernels run as they are, between graphs
def _triton_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, **options: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    from mcore_ssm.gdn_triton import gated_delta_rule_triton

    return gated_delta_rule_triton(q, k, v, g, beta, **options)
