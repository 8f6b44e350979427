"""Where an attention block hands ``q``, ``k``, ``v`` over: the context's backend, else the block's default.

``ctx.attention`` (set by a layout, the inference engine or the run config) wins when it takes the call;
a backend with ``supports(q, ctx, window)`` that answers no (say, a kernel without sliding windows)
leaves the call to the block's default backend (``auto.AutoBackend``).
"""

from __future__ import annotations

import torch

from mcore.protocols.attention import AttentionBackend
from mcore.protocols.block import BlockContext


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ctx: BlockContext,
    scale: float,
    window: int | None,
    default: AttentionBackend,
) -> torch.Tensor:
    """``q (B, T, nh, hd)``, ``k (B, S, nkv, hd)``, ``v (B, S, nkv, hdv)`` -> ``(B, T, nh, hdv)``."""
    backend = ctx.attention
    if backend is None:
        backend = default
    else:
        supports = getattr(backend, "supports", None)
        if supports is not None and not supports(q, ctx, window):
            backend = default
    return backend(q, k, v, ctx=ctx, scale=scale, window=window)
