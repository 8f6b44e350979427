"""Which keys each query may see: causal, sliding window, and document boundaries of packed rows.

Shape legend: B rows, T tokens per row, D documents, nh query heads, nkv key/value heads, hd head dim.

``attend`` runs SDPA in the ``(B, nh, T, hd)`` layout: the ``sdpa`` attention backend
(``mcore_models.attention_backends``) and MLA's absorbed decode call it. Plain causal rows use SDPA's
causal path (cuDNN first on CUDA, then flash); a sliding window, packed documents (``cu_seqlens`` over
the flattened ``B * T`` tokens) or cached keys build a boolean mask ``(B, 1, T, S)`` (``attention_mask``)
so no token sees another document. Attention stays within a row: a document that continues into the
next row sees only its part in the current row (``document_ids``, which the ``flex`` backend reads too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_CUDA_ORDER = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def document_ids(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``(B, T)`` index of the document each token belongs to."""
    flat = torch.arange(batch * seq, device=cu_seqlens.device, dtype=cu_seqlens.dtype)  # (B*T,)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), flat, right=True).view(batch, seq)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``(B, T)`` int64 position of each token inside its document."""
    docs = document_ids(cu_seqlens, batch, seq).flatten()
    flat = torch.arange(batch * seq, device=cu_seqlens.device)
    return (flat - cu_seqlens.long()[docs]).view(batch, seq)


def attention_mask(
    batch: int,
    seq: int,
    device: torch.device,
    *,
    cu_seqlens: torch.Tensor | None,
    window: int | None,
    offset: int = 0,
) -> torch.Tensor:
    """``(B or 1, 1, T, offset + T)`` bool, True where query ``i`` may attend key ``j``.

    ``offset`` cached keys precede the ``T`` new ones (decode); query ``i`` sits at key index
    ``offset + i``. ``cu_seqlens`` is only supported without an offset.
    """
    if cu_seqlens is not None and offset:
        raise ValueError(
            f"attention mask: cu_seqlens with {offset} cached keys is not supported; pass one or the other"
        )
    q_idx = torch.arange(seq, device=device)[:, None] + offset  # (T, 1)
    k_idx = torch.arange(offset + seq, device=device)[None, :]  # (1, S)
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (q_idx - k_idx < window)
    allowed = allowed[None]  # (1, T, S)
    if cu_seqlens is not None:
        docs = document_ids(cu_seqlens, batch, seq)  # (B, T)
        allowed = allowed & (docs[:, :, None] == docs[:, None, :])  # (B, T, T)
    return allowed[:, None]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``q (B, nh, T, hd)``, ``k (B, nkv, S, hd)``, ``v (B, nkv, S, hdv)`` -> ``(B, nh, T, hdv)``.

    ``mask`` None means plain causal attention over the row.
    """
    gqa = q.shape[1] != k.shape[1]
    if q.is_cuda:
        with sdpa_kernel(_CUDA_ORDER, set_priority=True):
            return _sdpa(q, k, v, mask, scale, gqa)
    return _sdpa(q, k, v, mask, scale, gqa)


def _sdpa(q, k, v, mask, scale, gqa):  # type: ignore[no-untyped-def]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
