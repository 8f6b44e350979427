"""SwiGLU activation ``silu(gate) * up`` of the separate gate and up projections: reference + dispatch.

Gate and up are two tensors of the same shape ``(..., F)``, the outputs of the ``gate`` and ``up``
projections (separate parameters, so each shards by rows under tensor parallelism), or one tensor
``(..., 2F)`` of rows ``[gate | up]`` when both ran as one GEMM (``swiglu_packed``: the kernel reads
the halves in place and returns one gradient, no copy or concatenation around it). The clamped
variant (``silu(min(gate, a)) * clamp(up, -a, a)``) lives here too; it has only the reference
implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mcore_models.kernels.dispatch import Dispatched


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up  # (..., F)


def clamped_swiglu_reference(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)  # (..., F)


def swiglu_packed_reference(packed: torch.Tensor) -> torch.Tensor:
    gate, up = packed.chunk(2, dim=-1)  # (..., F) each
    return F.silu(gate) * up  # (..., F)


swiglu = Dispatched("swiglu", swiglu_reference, "mcore_models.kernels.swiglu_triton:swiglu")
swiglu_packed = Dispatched("swiglu_packed", swiglu_packed_reference, "mcore_models.kernels.swiglu_triton:swiglu_packed")
