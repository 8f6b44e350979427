"""Rotary position embedding applied to Q and K: the reference and the dispatched entry point.

Half-split ("rotate half") layout, as in Llama/Qwen/Mistral checkpoints: of the ``rd`` rotated
dims of each head, dim ``j < rd/2`` pairs with dim ``j + rd/2``; dims ``>= rd`` pass through
(partial rotary). ``cos``/``sin`` are ``(B, T, rd/2)`` fp32 (any attention factor folded in).
The Triton kernel rotates Q and K of a token in one pass.
"""

from __future__ import annotations

import torch

from mcore_models.kernels.dispatch import Dispatched


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(B, T, n, hd)`` by per-token angles ``cos``/``sin`` ``(B, T, rd/2)``."""
    half = cos.shape[-1]
    c = cos[:, :, None, :]  # (B, T, 1, rd/2)
    s = sin[:, :, None, :]
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)  # (B, T, n, hd)
    return out.to(x.dtype)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return rotate_reference(q, cos, sin), rotate_reference(k, cos, sin)


apply_rope = Dispatched("apply_rope", apply_rope_reference, "mcore_models.kernels.rope_triton:apply_rope")
