"""Norms of many tensors at once, for the per-step gradient checks (finiteness, the global norm).

A model has hundreds of gradients; one reduction kernel each costs more in launches than in work
(a profile of the ``bench-0.9b`` step on an H200, 2026-12-05, showed about 300 small kernels per step
for the finiteness check and 150 for the norm). ``torch._foreach_norm`` does them in a few multi-tensor
kernels.
"""

from __future__ import annotations

import torch


def fp32_norms(tensors: list[torch.Tensor], order: float) -> list[torch.Tensor]:
    """Each tensor's ``order``-norm as a 0-d tensor, fp32 for tensors of fp32 or narrower dtypes (accumulated
    in fp32) and in their own dtype for wider ones (fp64); NaN and infinity propagate; tensors may differ in
    dtype and device. An empty tensor's 2-norm is 0 (its infinity norm is not defined)."""
    narrow = [i for i, t in enumerate(tensors) if t.dtype.itemsize <= 4 and not t.is_complex()]
    wide = [i for i in range(len(tensors)) if i not in set(narrow)]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    if narrow:
        group = [tensors[i] for i in narrow]
        try:
            norms = list(torch._foreach_norm(group, order, dtype=torch.float32))
        except TypeError:  # a torch whose _foreach_norm has no dtype argument
            norms = [torch.linalg.vector_norm(t, order, dtype=torch.float32) for t in group]
        for i, norm in zip(narrow, norms, strict=True):
            out[i] = norm
    if wide:
        for i, norm in zip(wide, torch._foreach_norm([tensors[i] for i in wide], order), strict=True):
            out[i] = norm
    return [t for t in out if t is not None]
