"""Where the documents of a packed batch lie: the one place recurrent mixers read ``cu_seqlens``.

Shape legend: B rows, T tokens per row, N = B * T flattened tokens, D documents (segments), L longest one.

A recurrent mixer (conv window, delta or SSM state) must never carry anything across a document
boundary. ``documents`` turns ``BlockContext.cu_seqlens`` (over the flattened ``B * T`` tokens) into
segments: the documents, each also cut at row ends (as attention does: a document that continues
into the next row starts afresh there), empty ones dropped. Without ``cu_seqlens`` the segments
are the rows. ``to_padded`` / ``from_padded`` move per-token tensors between ``(N, ...)`` and a
zero-padded ``(D, L, ...)`` layout (both differentiable) for code that walks each segment in order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class Segments:
    """The segments of ``N`` flattened tokens (every tensor int64 on the tokens' device).

    Attributes:
        starts: ``(D,)`` first flat token of each segment, increasing.
        lengths: ``(D,)`` tokens of each segment (>= 1).
        seg: ``(N,)`` segment of each token.
        pos: ``(N,)`` position of each token inside its segment.

    ``max_len``, the longest segment (a host int), is read from the device only when asked.
    """

    starts: torch.Tensor
    lengths: torch.Tensor
    seg: torch.Tensor
    pos: torch.Tensor

    @functools.cached_property
    def max_len(self) -> int:
        """The longest segment's length (one host sync, on first use)."""
        return int(self.lengths.max())

    @property
    def count(self) -> int:
        """``D``, the number of segments."""
        return int(self.starts.numel())


def check_cu_seqlens(cu_seqlens: torch.Tensor, tokens: int) -> None:
    """``ValueError`` unless ``cu_seqlens`` is 1-D integer, starts at 0, never decreases and ends at ``tokens``."""
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens of shape {tuple(cu_seqlens.shape)}: expected a 1-D integer tensor (D + 1,)")
    ends = cu_seqlens.long()
    first, last, falls = torch.stack([ends[0], ends[-1], (ends[1:] < ends[:-1]).any().long()]).tolist()  # one sync
    if first != 0 or last != tokens or falls:
        raise ValueError(
            f"cu_seqlens = {cu_seqlens.tolist()}: must start at 0, never decrease and end at B * T = {tokens}"
        )


def documents(batch: int, seq: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> Segments:
    """The segments of a ``(B, T)`` batch: ``cu_seqlens`` documents cut at row ends (rows without it)."""
    tokens = batch * seq
    row_starts = torch.arange(0, tokens, seq, device=device, dtype=torch.int64)  # (B,)
    if cu_seqlens is None:
        starts = row_starts
    else:
        check_cu_seqlens(cu_seqlens, tokens)
        bounds = cu_seqlens.to(device=device, dtype=torch.int64)[:-1]  # (D0,) starts, empty documents repeated
        starts = torch.unique(torch.cat([row_starts, bounds]))  # (D,) sorted, distinct: no empty segment
    ends = torch.cat([starts[1:], starts.new_tensor([tokens])])
    lengths = ends - starts  # (D,)
    flat = torch.arange(tokens, device=device, dtype=torch.int64)  # (N,)
    seg = torch.searchsorted(starts, flat, right=True) - 1  # (N,)
    pos = flat - starts[seg]  # (N,)
    return Segments(starts=starts, lengths=lengths, seg=seg, pos=pos)


def segments_of(
    batch: int, seq: int, cu_seqlens: torch.Tensor | None, device: torch.device, given: Segments | None
) -> Segments:
    """``given`` (the caller's ``documents(batch, seq, cu_seqlens)``, computed once for several calls: it
    checks ``cu_seqlens`` and reads it on the host) or else ``documents(...)``."""
    if given is not None:
        if given.seg.numel() != batch * seq:
            raise ValueError(f"segments cover {given.seg.numel()} tokens; expected B * T = {batch * seq}")
        return given
    return documents(batch, seq, cu_seqlens, device)


def to_padded(x: torch.Tensor, segments: Segments, length: int | None = None) -> torch.Tensor:
    """``x (N, ...)`` -> ``(D, length or L, ...)``: segment ``d``'s tokens in order, zeros after them."""
    size = segments.max_len if length is None else length
    out = x.new_zeros(segments.count, size, *x.shape[1:])  # (D, L, ...)
    return out.index_put((segments.seg, segments.pos), x)


def from_padded(y: torch.Tensor, segments: Segments) -> torch.Tensor:
    """``y (D, L, ...)`` -> ``(N, ...)``: each token's entry (the inverse of ``to_padded``)."""
    return y[segments.seg, segments.pos]


def check_state_count(segments: Segments, states: int, cu_seqlens: torch.Tensor | None, what: str) -> None:
    """``ValueError`` unless per-sequence states (``states`` of them, e.g. ``initial_state.shape[0]``) match the
    segments one to one: one per row without ``cu_seqlens``, else one per document, which then must neither
    be empty nor cross a row end (the engine's packed step: one row, one document per sequence)."""
    whole = cu_seqlens is None or (
        cu_seqlens.numel() - 1 == segments.count
        and bool((cu_seqlens[:-1].to(segments.starts) == segments.starts).all())
    )
    if states != segments.count or not whole:
        docs = "rows" if cu_seqlens is None else "documents in cu_seqlens"
        raise ValueError(
            f"{what} holds {states} states for {segments.count} segments: expected one per {docs}, "
            "documents non-empty and within one row"
        )
