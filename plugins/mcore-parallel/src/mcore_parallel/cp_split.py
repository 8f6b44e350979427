"""Zig-zag split of a micro-batch over the ``cp`` ranks: which tokens each rank computes.

Under causal attention the later tokens of a sequence do more work; cutting every sequence into
``2 * cp`` equal chunks and giving rank ``r`` chunks ``r`` and ``2 * cp - 1 - r`` balances it (each
rank holds one early and one late chunk). A sequence here is one document's span inside a row: a
row of one document (``cu_seqlens`` is ``None``) is one sequence, whose length must divide by
``2 * cp``; a packed row (``cu_seqlens``) holds several, each split on its own after being padded to
a multiple of ``2 * cp`` (padding tokens have label ``-100`` and attend to nothing), and the rows'
local lengths are padded to the longest.

``plan_split`` returns a ``SplitPlan``: for every rank the index into the row of each of its tokens
(``-1``: padding) and the document each belongs to. Every rank computes the plan of every rank
without communication (all read the same batch), so the attention backends know which global token
each key of another rank is. Positions stay global (taken from the row before splitting), so rotary
embeddings are right.

Shape legend: B rows, T tokens per row, L tokens per row on one rank.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from mcore.errors import UserError


def check_seq_len(seq_len: int, cp: int) -> None:
    """Rows of one document: ``seq_len`` must divide into ``2 * cp`` chunks (one-line ``UserError``)."""
    if seq_len % (2 * cp):
        raise UserError(
            f"train.seq_len = {seq_len} does not split into 2 * cp = {2 * cp} zig-zag chunks under parallel.sizes.cp "
            f"= {cp}; allowed: a multiple of {2 * cp} (e.g. {seq_len + (-seq_len) % (2 * cp)}), or packed rows "
            "(data.packing = 'thd'), whose documents are padded"
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class SplitPlan:
    """Which tokens of each row every rank computes (module docstring).

    ``index[r]``: ``(B, L)`` int64 index into the row of rank ``r``'s tokens, ``-1`` for padding;
    ``docs[r]``: ``(B, L)`` int64 id of each token's document (``-1`` for padding). Ids are unique
    across rows, so one comparison tells whether two tokens may see each other.
    """

    index: tuple[torch.Tensor, ...]
    docs: tuple[torch.Tensor, ...]

    def take(self, rank: int, values: torch.Tensor, fill: int) -> torch.Tensor:
        """``values (B, T)`` at rank ``rank``'s tokens, ``fill`` at its padding: ``(B, L)``."""
        index = self.index[rank]
        taken = values.gather(1, index.clamp(min=0))
        return torch.where(index >= 0, taken, torch.full_like(taken, fill))


def document_positions(cu_seqlens: torch.Tensor | None, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """``(B, T)`` int64 position of each token inside its document (``0..T-1`` per row without documents)."""
    if cu_seqlens is None:
        return torch.arange(seq, device=device).expand(batch, seq)
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    flat = torch.arange(batch * seq, device=device)  # (B*T,)
    docs = torch.searchsorted(cu[1:].contiguous(), flat, right=True)
    return (flat - cu[docs]).view(batch, seq)


def labels_ahead(labels: torch.Tensor, positions: torch.Tensor, depth: int) -> torch.Tensor:
    """``(B, T)``: ``labels[i + depth]`` where that token is still in token ``i``'s document (its position
    ``depth`` further), ``-100`` elsewhere: multi-token prediction depth ``depth``'s labels of the whole row."""
    ahead = torch.full_like(labels, -100)
    same_doc = positions[:, depth:] == positions[:, :-depth] + depth  # (B, T - depth)
    ahead[:, :-depth] = torch.where(same_doc, labels[:, depth:], -100)
    return ahead


def _spans(cu_seqlens: torch.Tensor | None, batch: int, seq: int) -> list[list[tuple[int, int]]]:
    """Each row's sequences as ``(start, length)`` in the row: documents cut at row ends."""
    if cu_seqlens is None:
        return [[(0, seq)] for _ in range(batch)]
    bounds = sorted(set(cu_seqlens.tolist()) | {r * seq for r in range(batch + 1)})
    rows: list[list[tuple[int, int]]] = [[] for _ in range(batch)]
    for a, b in itertools.pairwise(bounds):
        if b > a:
            rows[a // seq].append((a % seq, b - a))
    return rows


def _row_split(
    spans: list[tuple[int, int]], first_doc: int, cp: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row's sequences, each padded to a multiple of ``2 * cp``, laid end to end: for every padded
    token its index in the row (``-1``: padding), its document id and the rank that holds it."""
    starts = torch.tensor([a for a, _ in spans], dtype=torch.int64)  # (n,)
    lengths = torch.tensor([n for _, n in spans], dtype=torch.int64)  # (n,)
    padded = lengths + (-lengths) % (2 * cp)  # (n,)
    seg = torch.repeat_interleave(torch.arange(len(spans)), padded)  # (P,) the sequence of each padded token
    offset = torch.arange(int(padded.sum())) - (torch.cumsum(padded, 0) - padded)[seg]  # (P,) place in it
    chunk = offset // (padded // (2 * cp))[seg]  # (P,) which of its 2 * cp chunks
    owner = torch.where(chunk < cp, chunk, 2 * cp - 1 - chunk)  # zig-zag: chunks r and 2 * cp - 1 - r on rank r
    real = offset < lengths[seg]
    index = torch.where(real, starts[seg] + offset, -1)
    docs = torch.where(real, first_doc + seg, -1)
    return index, docs, owner


def plan_split(cu_seqlens: torch.Tensor | None, batch: int, seq: int, cp: int, device: torch.device) -> SplitPlan:
    """The zig-zag split of ``batch`` rows of ``seq`` tokens over ``cp`` ranks; rows of one document need
    ``seq % (2 * cp) == 0`` (``check_seq_len``), packed documents are padded."""
    if cu_seqlens is None:
        check_seq_len(seq, cp)
    index: list[list[torch.Tensor]] = [[] for _ in range(cp)]  # [rank][row] -> (L_row,)
    docs: list[list[torch.Tensor]] = [[] for _ in range(cp)]
    first_doc = 0
    for spans in _spans(cu_seqlens, batch, seq):
        row_index, row_docs, owner = _row_split(spans, first_doc, cp)
        first_doc += len(spans)
        for rank in range(cp):
            mine = owner == rank  # in row order: chunk r before chunk 2 * cp - 1 - r
            index[rank].append(row_index[mine])
            docs[rank].append(row_docs[mine])
    width = max(int(t.numel()) for per_rank in index for t in per_rank)  # every rank's rows padded alike

    def stack(rows: list[torch.Tensor]) -> torch.Tensor:  # (B, L), -1 past a row's end
        return torch.stack([torch.nn.functional.pad(r, (0, width - r.numel()), value=-1) for r in rows]).to(device)

    return SplitPlan(index=tuple(stack(index[r]) for r in range(cp)), docs=tuple(stack(docs[r]) for r in range(cp)))
