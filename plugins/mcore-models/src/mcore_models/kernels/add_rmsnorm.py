"""Residual add fused with the RMSNorm after it: the PyTorch reference and the dispatched entry point.

Why it exists: in a decode step every residual ``hidden + delta`` is followed by the next sublayer's (or next
layer's) RMSNorm; at batch 1 each is a launch-bound kernel of its own. ``add_rms_norm`` returns both the new
residual stream and its norm, from one kernel on CUDA (``add_rmsnorm_triton``, forward only: ``GPT`` uses it
with gradients off). ``total`` is exactly the unfused ``hidden + delta`` (the input dtype's add) and ``normed``
is ``rms_norm_reference(total, ...)``, so the fused and unfused paths give the same tokens.
"""

from __future__ import annotations

import torch

from mcore_models.kernels.dispatch import Dispatched
from mcore_models.kernels.rmsnorm import rms_norm_reference


def add_rms_norm_reference(
    hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden + delta, rms_norm(hidden + delta))``, both ``(..., H)`` in the sum's dtype."""
    total = hidden + delta  # (..., H)
    return total, rms_norm_reference(total, weight, eps, offset)


add_rms_norm = Dispatched(
    "add_rms_norm", add_rms_norm_reference, "mcore_models.kernels.add_rmsnorm_triton:add_rms_norm"
)
