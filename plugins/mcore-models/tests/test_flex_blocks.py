"""``flex_blocks.document_block_mask`` against ``create_block_mask`` (which evaluates every pair).

Without a window the tiles must be the same ones; with a window (whose test is a bound) ours may mark
more tiles partial, never a tile full that is not fully visible, and never skip a visible one. The
attention output through either mask is the same (the forward of the real FlexAttention kernel runs
on CPU).
"""

from __future__ import annotations

import pytest
import torch

from mcore_models.attention_backends.flex import _mask_mod
from mcore_models.attention_backends.flex_blocks import document_block_mask
from mcore_models.blocks.masking import document_ids

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _tiles(counts: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
    """``(B, H, N)`` counts and ``(B, H, N, N)`` indices -> ``(B, N, N)`` bool tiles (head 0)."""
    n = indices.shape[-1] if indices is not None else counts.shape[-1]
    out = torch.zeros((counts.shape[0], counts.shape[2], n), dtype=torch.bool)
    if indices is None:
        return out
    take = torch.arange(indices.shape[-1]) < counts[:, 0, :, None].long()  # (B, N, N): the listed slots
    for b in range(out.shape[0]):
        for q in range(out.shape[1]):
            out[b, q, indices[b, 0, q][take[b, q]].long()] = True
    return out


def _split(mask: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``BlockMask``'s (partial, full) tiles, ``(B, N, N)`` each."""
    partial = _tiles(mask.kv_num_blocks, mask.kv_indices)  # type: ignore[attr-defined]
    full_counts = mask.full_kv_num_blocks  # type: ignore[attr-defined]
    full = _tiles(full_counts, mask.full_kv_indices) if full_counts is not None else torch.zeros_like(partial)  # type: ignore[attr-defined]
    return partial, full


def _case(seed: int, batch: int, seq: int, docs_per_row: int) -> torch.Tensor:
    """Random ``cu_seqlens`` over ``batch`` rows of ``seq`` tokens (short and long documents, padding at the end)."""
    gen = torch.Generator().manual_seed(seed)
    bounds = [0]
    for row in range(batch):
        cuts = sorted(torch.randperm(seq - 1, generator=gen)[: docs_per_row - 1].add(1).tolist())
        end = seq - int(torch.randint(0, seq // 8 + 1, (1,), generator=gen))  # the row's padding
        cuts = [c for c in cuts if c < end]
        bounds += [row * seq + c for c in cuts] + [row * seq + end]
    return torch.tensor(bounds, dtype=torch.int32)


CASES = {
    "one-doc-per-row": (1, 512, 1, None),
    "docs": (2, 1024, 5, None),
    "many-short-docs": (2, 512, 40, None),
    "ragged-length": (2, 700, 4, None),
    "window": (2, 1024, 3, 300),
    "window-small": (1, 640, 6, 64),
    "window-ragged": (2, 333, 3, 100),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("documents", [True, False])
def test_tiles_match_create_block_mask(name: str, documents: bool) -> None:
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    batch, seq, docs_per_row, window = CASES[name]
    docs = document_ids(_case(7, batch, seq, docs_per_row), batch, seq) if documents else None
    mask_mod = _mask_mod(docs, 0, window)
    ours = document_block_mask(docs, seq, window, mask_mod, torch.device("cpu"))
    ref = create_block_mask(mask_mod, batch if documents else None, None, seq, seq, device="cpu")
    (partial, full), (ref_partial, ref_full) = _split(ours), _split(ref)
    dense = create_mask(mask_mod, batch if documents else 1, 1, seq, seq, "cpu")[:, 0]  # (B, T, T)
    n = partial.shape[-1]
    padded = torch.zeros((dense.shape[0], n * 128, n * 128), dtype=torch.bool)
    padded[:, :seq, :seq] = dense
    per_tile = padded.view(-1, n, 128, n, 128)
    any_pair, all_pairs = per_tile.any(4).any(2), per_tile.all(4).all(2)  # (B, N, N)
    assert not (partial & full).any()
    assert torch.equal(full & ~all_pairs, torch.zeros_like(full)), "a tile marked full has masked pairs"
    assert torch.equal(any_pair & ~(partial | full), torch.zeros_like(full)), "a visible tile was skipped"
    assert (full <= ref_full).all() and ((ref_partial | ref_full) <= (partial | full)).all()
    if window is None and seq % 128 == 0:
        assert torch.equal(partial, ref_partial) and torch.equal(full, ref_full)


def test_attention_through_either_mask_is_the_same() -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, seq, window = 2, 384, 150
    docs = document_ids(_case(3, batch, seq, 4), batch, seq)
    mask_mod = _mask_mod(docs, 0, window)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, 2, seq, 16, generator=gen) for _ in range(3))
    ours = flex_attention(q, k, v, block_mask=document_block_mask(docs, seq, window, mask_mod, torch.device("cpu")))
    ref = flex_attention(q, k, v, block_mask=create_block_mask(mask_mod, batch, None, seq, seq, device="cpu"))
    assert torch.isfinite(ours).all()
    assert (ours - ref).norm() / ref.norm() < 1e-6
