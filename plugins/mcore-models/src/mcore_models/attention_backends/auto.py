"""The ``auto`` attention backend: the default attention blocks fall back to when the context names none.

With ``flex_on_cuda`` (the default): ``flex`` where its block-sparse mask pays (packed documents or a
sliding window, on CUDA, when FlexAttention runs there and the call has no cached keys), ``sdpa``
everywhere else: plain causal rows (SDPA's cuDNN/flash causal path is as fast), decoding with a
cache, and the CPU (no compile, CI speed). Measured on one H200 (2026-12-05, torch 2.11): the
bench-0.9b ``mcore train`` step on packed documents (byte-level stdlib text, 2 x 4096 tokens) took
126 ms (medians of two runs: 125.7, 126.8) with ``flex`` against 144 ms (144.0, 146.3) with the
dense-mask SDPA that was the default before; ``flex_on_cuda=False`` restores that.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mcore.protocols.attention import AttentionBackend
from mcore.protocols.block import BlockContext
from mcore_models.attention_backends.flex import FlexBackend
from mcore_models.attention_backends.sdpa import SDPABackend


class AutoBackend:
    """``__call__(q (B, T, nh, hd), k (B, S, nkv, hd), v (B, S, nkv, hdv), *, ctx, scale, window) -> (B, T, nh, hdv)``."""

    name: ClassVar[str] = "auto"

    def __init__(self, *, flex_on_cuda: bool = True) -> None:
        self.sdpa = SDPABackend()
        self.flex = FlexBackend()
        self.flex_on_cuda = flex_on_cuda

    def supports(self, q: torch.Tensor, ctx: BlockContext, window: int | None) -> bool:
        return ctx.kv_cache is None  # under an inference cache the keys are in its pages: the paged backend

    def choose(self, q: torch.Tensor, k: torch.Tensor, ctx: BlockContext, window: int | None) -> AttentionBackend:
        """The backend this call runs on."""
        masked = ctx.cu_seqlens is not None or window is not None
        if (
            self.flex_on_cuda
            and masked
            and q.is_cuda
            and k.shape[1] == q.shape[1]
            and self.flex.supports(q, ctx, window)
        ):
            return self.flex
        return self.sdpa

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        ctx: BlockContext,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        return self.choose(q, k, ctx, window)(q, k, v, ctx=ctx, scale=scale, window=window)
