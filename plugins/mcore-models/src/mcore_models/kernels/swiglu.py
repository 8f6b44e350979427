"""SwiGLU activation ``silu(gate) * up`` of the separate gate and up projections: reference + dispatch.

Gate and up are two tensors of the same shape ``(..., F)``, the outputs of the ``gate`` and ``up``
projections (separate parameters, so each shards by rows under tensor parallelism). The clamped
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


swiglu = Dispatched("swiglu", swiglu_reference, "mcore_models.kernels.swiglu_triton:swiglu")
