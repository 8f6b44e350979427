"""Norms of many tensors at once, for the per-step gradient checks (finiteness, the global norm).

A model has hundreds of gradients; one reduction kernel each costs more in launches than in work
(a profile of the ``bench-0.9b`` step on an H200, 2026-12-05, showed about 300 small kernels per step
for the finiteness check and 150 for the norm). ``torch._foreach_norm`` does them in a few multi-tensor
kernels.
"""

from __future__ import annotations

import torch


def fp32_norms(tensors: list[torch.Tensor], order: float) -> list[torch.Tensor]:
    """Each tensor's ``order``-norm as a 0-d fp32 tensor (NaN and infinity propagate); tensors may
    differ in dtype and device. An empty tensor's 2-norm is 0 (its infinity norm is not defined)."""
    if not tensors:
        return []
    try:
        return list(torch._foreach_norm(tensors, order, dtype=torch.float32))
    except TypeError:  # a torch whose _foreach_norm has no dtype argument
        return [torch.linalg.vector_norm(t, order, dtype=torch.float32) for t in tensors]
