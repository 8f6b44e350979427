"""A FlexAttention ``BlockMask`` for packed documents built from block summaries, not from the mask itself.

``create_block_mask`` evaluates ``mask_mod`` on every (query, key) pair of the row: 16.8 M pairs at 4,096
tokens, about 7-9 ms of host and device work on an H200 for each new batch (the step's packed rows
change every step). A document mask is simpler than that: documents are runs of equal ids, so whether
a 128 x 128 tile is empty, partly or fully visible follows from each block's smallest and largest
document id. This module computes the tiles from those summaries, ``(B, N)`` per row and ``(B, N, N)``
per tile with ``N = ceil(T / 128)``, a handful of small kernels.

Exactness: a tile marked full must be fully visible (it runs without ``mask_mod``), so "full" is never
guessed: one document on both sides, strictly below the diagonal, and the whole tile inside the window.
A tile marked partial runs ``mask_mod``, so marking one that turns out empty only costs time; the
document test (the id ranges overlap) is exact for runs of equal ids, the window test is a bound.

Shape legend: B rows, T tokens (queries = keys), N blocks per row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

BLOCK = 128  # FlexAttention's default sparse block size


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tiles (B, N, N)`` bool -> ``(B, 1, N)`` counts and ``(B, 1, N, N)`` key-block indices, the
    marked ones first in increasing order (a stable sort of the unmarked flag)."""
    counts = tiles.sum(-1, dtype=torch.int32)  # (B, N)
    order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # (B, N, N)
    return counts[:, None], order[:, None]


def document_block_mask(
    docs: torch.Tensor | None,
    seq: int,
    window: int | None,
    mask_mod: Callable[..., torch.Tensor],
    device: torch.device,
) -> Any:
    """The ``BlockMask`` of causal attention within documents (``docs (B, T)`` ids, or ``None``: one
    document per row) and an optional sliding ``window``, with queries and keys the same ``seq`` tokens.
    ``mask_mod`` is the exact mask, applied inside the partial tiles."""
    from torch.nn.attention.flex_attention import BlockMask

    n = -(-seq // BLOCK)
    if docs is None:
        docs = torch.zeros((1, seq), dtype=torch.int32, device=device)
    rows = docs.shape[0]
    pad = n * BLOCK - seq
    if pad:  # the last block's missing tokens repeat the last id: no new document, no tile turns full
        docs = torch.cat([docs, docs[:, -1:].expand(rows, pad)], dim=1)
    blocks = docs.view(rows, n, BLOCK)
    low, high = blocks.amin(-1), blocks.amax(-1)  # (B, N)
    q_block = torch.arange(n, device=device).view(n, 1)  # (N, 1)
    k_block = torch.arange(n, device=device).view(1, n)  # (1, N)
    below = k_block < q_block  # (N, N): every key before every query
    overlap = (high[:, None, :] >= low[:, :, None]) & (low[:, None, :] <= high[:, :, None])  # (B, N, N)
    visible = (below | (k_block == q_block)) & overlap
    single = low == high  # (B, N): one document in the block
    full = below & single[:, :, None] & single[:, None, :] & (low[:, :, None] == low[:, None, :])
    if window is not None:
        nearest = q_block * BLOCK - (k_block * BLOCK + BLOCK - 1)  # smallest query - key distance of the tile
        farthest = q_block * BLOCK + BLOCK - 1 - k_block * BLOCK
        visible = visible & (nearest < window)
        full = full & (farthest < window)
    if pad:  # tiles with missing tokens keep the mask (FlexAttention also bounds them by seq_lengths)
        full[:, -1, :] = False
        full[:, :, -1] = False
    partial_counts, partial_indices = _ordered(visible & ~full)
    full_counts, full_indices = _ordered(full)
    return BlockMask.from_kv_blocks(
        partial_counts,
        partial_indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(seq, seq),
    )
