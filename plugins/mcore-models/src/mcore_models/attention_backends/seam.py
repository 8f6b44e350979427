"""Where an attention block hands ``q``, ``k``, ``v`` over: the context's backend, else the block's default.

``ctx.attention`` (set by a layout, the inference engine or the run config) wins when it takes the call;
a backend with ``supports(q, ctx, window)`` that answers no (say, a kernel without sliding windows)
leaves the call to the block's default backend (``auto.AutoBackend``). Under an inference cache
(``ctx.kv_cache``) the default is the ``paged`` backend instead: the keys of the call are only the step's new
tokens, and the training backends (which decline calls under a cache) would attend to them alone.
"""

from __future__ import annotations

import torch

from mcore.protocols.attention import AttentionBackend
from mcore.protocols.block import BlockContext
from mcore_models.attention_backends.paged import PagedBackend

#: The default under a cache (stateless, shared by every block).
PAGED = PagedBackend()


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
    if ctx.kv_cache is not None:
        default = PAGED
    backend = ctx.attention
    if backend is None:
        backend = default
    else:
        supports = getattr(backend, "supports", None)
        if supports is not None and not supports(q, ctx, window):
            backend = default
    return backend(q, k, v, ctx=ctx, scale=scale, window=window)
