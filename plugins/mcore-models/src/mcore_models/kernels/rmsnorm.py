"""RMSNorm: the PyTorch reference and the dispatched entry point (Triton kernel on CUDA).

``y = x / sqrt(mean(x^2) + eps) * (weight + offset)``, computed in fp32 and rounded once to the
input dtype; ``offset = 1`` gives the zero-centred-gamma variant.
"""

from __future__ import annotations

import torch

from mcore_models.kernels.dispatch import Dispatched


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    xf = x.float()  # (..., H)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (weight.float() + offset)).to(x.dtype)


rms_norm = Dispatched("rms_norm", rms_norm_reference, "mcore_models.kernels.rmsnorm_triton:rms_norm")
