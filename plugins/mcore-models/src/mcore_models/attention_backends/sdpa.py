"""The ``sdpa`` attention backend: PyTorch's ``scaled_dot_product_attention``, today's path.

Shape legend: B rows, T query tokens, S key tokens, nh query heads, nkv key/value heads, hd head dim.

Plain causal rows take SDPA's causal fast path (cuDNN, then flash, efficient, math on CUDA). Packed
documents, a sliding window or cached keys (``S > T``) fall back to a dense boolean mask
``(B, 1, T, S)`` (``blocks.masking.attention_mask``), built once per call: every layer of a forward
reuses it (``cache.MaskCache``). That mask costs ``B * T * S`` bytes and SDPA still computes the masked
scores, which is why packed rows on CUDA default to the ``flex`` backend.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mcore.errors import UserError
from mcore.protocols.block import BlockContext
from mcore_models.attention_backends.cache import MaskCache
from mcore_models.blocks.masking import attend, attention_mask


class SDPABackend:
    """``__call__(q (B, T, nh, hd), k (B, S, nkv, hd), v (B, S, nkv, hdv), *, ctx, scale, window) -> (B, T, nh, hdv)``."""

    name: ClassVar[str] = "sdpa"

    def __init__(self, *, cache_size: int = 4) -> None:
        self._masks = MaskCache(cache_size)

    def supports(self, q: torch.Tensor, ctx: BlockContext, window: int | None) -> bool:
        return ctx.kv_cache is None  # under an inference cache the keys are in its pages: the paged backend

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
        if ctx.kv_cache is not None:  # its mask would treat the step's new keys as the whole sequence
            raise UserError("sdpa attention called under an inference cache (ctx.kv_cache); a paged backend reads it")
        batch, seq = q.shape[:2]
        offset = k.shape[1] - seq  # cached keys before the new tokens
        if offset < 0:
            raise ValueError(f"sdpa attention: {k.shape[1]} keys for {seq} queries; keys must include the queries")
        mask = None
        if ctx.cu_seqlens is not None or window is not None or offset:
            mask = self.mask(ctx.cu_seqlens, batch, seq, offset, window, q.device)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask=mask, scale=scale)  # (B, nh, T, hdv)
        return out.transpose(1, 2)  # (B, T, nh, hdv): SDPA's output is laid out this way already

    def mask(
        self,
        cu_seqlens: torch.Tensor | None,
        batch: int,
        seq: int,
        offset: int,
        window: int | None,
        device: torch.device,
    ) -> torch.Tensor:
        """``(B or 1, 1, T, offset + T)`` bool, True where a query may see a key; cached per call."""

        def build() -> torch.Tensor:
            return attention_mask(batch, seq, device, cu_seqlens=cu_seqlens, window=window, offset=offset)

        if cu_seqlens is None or torch.compiler.is_compiling():
            return build()  # cheap without documents; traced inline under torch.compile
        return self._masks.get(cu_seqlens, (batch, seq, offset, window, str(device)), build)
