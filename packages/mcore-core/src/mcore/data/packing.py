"""Rows of packed documents: fixed windows over a token stream, with document boundaries.

Row ``i`` of a shard holds tokens ``[i * T, i * T + T + 1)`` of the shard's stream of
documents (each ending with the end-of-document id): inputs are the first ``T`` tokens,
labels the last ``T``. A document may span two rows; a row holds several documents. For
THD packing each row reports where its documents start, so attention never crosses a
document and positions restart at 0 in each one.

Shape legend: B rows in a micro-batch, T tokens per row, D documents in the micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mcore.data.shards import TokenShards


@dataclass
class PackedRows:
    """A micro-batch as numpy arrays (the pipeline turns them into tensors)."""

    tokens: np.ndarray  # (B, T) int64
    labels: np.ndarray  # (B, T) int64
    cu_seqlens: np.ndarray  # (D + 1,) int32 over the flattened B * T tokens
    positions: np.ndarray  # (B, T) int64, restarting at each document
    max_seqlen: int


class RowDataset:
    """The rows of one prepared dataset, addressable by a global row index."""

    def __init__(self, shards: TokenShards, seq_len: int) -> None:
        self.shards, self.seq_len = shards, seq_len
        self.rows_per_shard = [max(0, (len(s.tokens) - 1) // seq_len) for s in shards.shards]
        self.starts = np.concatenate([[0], np.cumsum(self.rows_per_shard)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(window, starts)``: ``T + 1`` token ids, and document starts inside ``[1, T)``."""
        k = int(np.searchsorted(self.starts, index, side="right") - 1)
        shard = self.shards.shards[k]
        begin = (index - int(self.starts[k])) * self.seq_len
        window = np.asarray(shard.tokens[begin : begin + self.seq_len + 1], dtype=np.int64)  # (T + 1,)
        docs = shard.doc_starts
        lo, hi = np.searchsorted(docs, [begin + 1, begin + self.seq_len])
        starts = np.asarray(docs[lo:hi], dtype=np.int64) - begin  # document starts at row offsets 1..T-1
        return window, starts


def pack(rows: list[tuple[np.ndarray, np.ndarray]], seq_len: int, *, thd: bool) -> PackedRows:
    """Stack rows into a micro-batch; with ``thd`` compute ``cu_seqlens`` and positions."""
    windows = np.stack([w for w, _ in rows])  # (B, T + 1)
    tokens, labels = windows[:, :-1], windows[:, 1:]  # (B, T) each
    B, T = tokens.shape
    if not thd:
        positions = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()  # (B, T)
        cu = np.arange(0, B * T + 1, T, dtype=np.int32)  # (B + 1,) one document per row
        return PackedRows(tokens.copy(), labels.copy(), cu, positions, T)
    bounds = []
    positions = np.empty((B, T), dtype=np.int64)
    for r, (_, starts) in enumerate(rows):
        edges = np.concatenate([[0], starts, [T]])  # (d_r + 1,) document edges of row r
        bounds.append(edges[:-1] + r * T)
        lengths = np.diff(edges)
        positions[r] = np.arange(T) - np.repeat(edges[:-1], lengths)  # (T,) offset inside its document
    cu = np.concatenate([*bounds, [B * T]]).astype(np.int32)  # (D + 1,)
    return PackedRows(tokens.copy(), labels.copy(), cu, positions, int(np.diff(cu).max()))
