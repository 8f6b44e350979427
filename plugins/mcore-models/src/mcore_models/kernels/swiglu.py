"""SwiGLU activation ``silu(gate) * up`` on a fused ``[gate | up]`` projection: reference + dispatch.

The clamped variant (``silu(min(gate, a)) * clamp(up, -a, a)``) lives here too; it has only the
reference implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mcore_models.kernels.dispatch import Dispatched


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)  # (..., F) each
    return F.silu(gate) * up


def clamped_swiglu_reference(gate_up: torch.Tensor, limit: float) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)  # (..., F) each
    return F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)


swiglu = Dispatched("swiglu", swiglu_reference, "mcore_models.kernels.swiglu_triton:swiglu")
