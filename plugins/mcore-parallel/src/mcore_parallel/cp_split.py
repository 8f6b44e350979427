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
import math
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
    flat: bool = False
    """Indices into the micro-batch flattened to one row ``(1, B * T)`` (a dynamic plan moves documents
    between rows); every rank then holds one row ``(1, L)``."""
    shared: int | None = None
    """Only the first ``shared`` tokens of each rank's row belong to documents split over several ranks
    (a dynamic plan); the rest are documents the rank holds whole, whose keys no other rank needs.
    ``None``: any token may be needed anywhere."""

    def take(self, rank: int, values: torch.Tensor, fill: int) -> torch.Tensor:
        """``values (B, T)`` at rank ``rank``'s tokens, ``fill`` at its padding: ``(B, L)`` (``(1, L)`` when flat)."""
        index = self.index[rank]
        if self.flat:
            values = values.reshape(1, -1)  # (1, B*T)
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


# -- dynamic CP: each document over as few ranks as its length needs ------------------------------------------
def ranks_per_document(costs: list[float], cp: int) -> list[int]:
    """How many ranks each document is split over at least: the smallest divisor ``s`` of ``cp`` whose share
    ``cost / s`` fits the mean cost per rank of the micro-batch (``cp`` when none does; ``costs`` are tokens, or
    ``document_cost``'s). Short documents stay whole on one rank (data parallel across the group), long ones are
    split over 2, 4, ... ranks."""
    target = mean_share(costs, cp)
    sizes = [d for d in range(1, cp + 1) if cp % d == 0]
    return [next((s for s in sizes if cost <= target * s + 1e-9), cp) for cost in costs]


def mean_share(costs: list[float], cp: int) -> float:
    """What each of ``cp`` ranks should hold: the mean cost, rounded up to a whole token unit (at least 1)."""
    return float(max(1, math.ceil(sum(costs) / cp - 1e-9)))


def document_cost(length: int, attention_tokens: int | None) -> float:
    """A document's work in token units: its tokens, plus, with ``attention_tokens`` (the position at which a
    token's attention costs as much as the rest of its layer, about ``6 * hidden_size``), its causal pairs
    ``length * (length + 1) / 2`` divided by it. Without it: the tokens alone."""
    if attention_tokens is None:
        return float(length)
    return length + length * (length + 1) / (2 * attention_tokens)


def plan_dynamic(
    cu_seqlens: torch.Tensor | None,
    batch: int,
    seq: int,
    cp: int,
    device: torch.device,
    *,
    attention_tokens: int | None = None,
) -> SplitPlan:
    """Dynamic CP (Megatron's hybrid data x context parallelism) for one micro-batch the ``cp`` ranks share.

    Each document (each row without ``cu_seqlens``; a document across a row end is one span per row, as in one
    process) goes, longest first, to an aligned sub-group of ``s`` consecutive ranks: the smallest ``s`` from
    ``ranks_per_document``'s up that keeps the sub-group's busiest rank within 5% of the mean share (else the
    ``s`` with the lowest peak; a document of at most a quarter of the mean share always stays whole), the
    sub-group whose busiest rank holds the least (ties: the lowest). Shares are tokens, or with
    ``attention_tokens`` each document's ``document_cost`` (tokens plus causal pairs weighed against the rest of
    the layer: long documents weigh more than their tokens), a split document's spread evenly over its ranks as
    the zig-zag spreads its pairs. A document over ``s > 1`` ranks is split zig-zag over them (padded to a multiple
    of ``2 * s``); one over a single rank stays whole there. Each rank's row is its split documents' tokens
    first, then its whole documents, padded to the longest row: indices into the flattened micro-batch
    (``flat``); ``SplitPlan.shared`` is the longest split part, the prefix of every row the other ranks need.
    Deterministic: every rank computes every rank's part from the batch alone, and a resumed run plans the same
    steps the same way.
    """
    spans = [(r * seq + a, n) for r, row in enumerate(_spans(cu_seqlens, batch, seq)) for a, n in row]
    lengths = [n for _, n in spans]
    costs = [document_cost(n, attention_tokens) for n in lengths]
    sizes = ranks_per_document(costs, cp)
    target = mean_share(costs, cp)
    limit = max(target * 1.05, target + 1)  # a rank may end 5% (at least a token) above the mean share
    divisors = [d for d in range(1, cp + 1) if cp % d == 0]
    load = [0.0] * cp
    split_parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(cp)]  # [rank] -> (index, docs)
    whole_parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(cp)]
    for doc in sorted(range(len(spans)), key=lambda d: (-costs[d], d)):
        start, length = spans[doc]
        options = []  # (peak load, s, first rank of the sub-group) for each size from the document's least
        short = costs[doc] <= target / 4  # a filler: always whole, on the least loaded rank
        for s in (d for d in divisors if d >= sizes[doc] and (d == 1 or not short)):
            padded_tokens = length if s == 1 else -(-length // (2 * s)) * 2 * s  # zig-zag padding included
            share = costs[doc] * padded_tokens / length / s  # per rank
            first = min(range(0, cp, s), key=lambda g: (max(load[g : g + s]), g))  # the sub-group's first rank
            options.append((max(load[first : first + s]) + share, s, first))
            if options[-1][0] <= limit:  # the fewest ranks that keep the busiest one near the mean
                break
        _, s, first = options[-1] if options[-1][0] <= limit else min(options)
        if s == 1:
            whole_parts[first].append((torch.arange(start, start + length), torch.full((length,), doc)))
            load[first] += costs[doc]
            continue
        index, docs, owner = _row_split([(start, length)], doc, s)
        for member in range(s):
            mine = owner == member
            split_parts[first + member].append((index[mine], docs[mine]))
            load[first + member] += costs[doc] / s

    def joined(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        if not parts:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        return torch.cat([i for i, _ in parts]), torch.cat([d for _, d in parts])

    def padded(t: torch.Tensor, width: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.numel()), value=-1)

    split = [joined(p) for p in split_parts]
    whole = [joined(p) for p in whole_parts]
    shared = max(i.numel() for i, _ in split)  # the longest split part: the prefix others need of every row
    width = max(i.numel() + j.numel() for (i, _), (j, _) in zip(split, whole))
    rows_index, rows_docs = [], []
    for r in range(cp):  # a row shorter in split tokens sends a few of its whole documents' too (masked there)
        rows_index.append(padded(torch.cat([split[r][0], whole[r][0]]), width)[None].to(device))
        rows_docs.append(padded(torch.cat([split[r][1], whole[r][1]]), width)[None].to(device))
    return SplitPlan(index=tuple(rows_index), docs=tuple(rows_docs), flat=True, shared=shared)


def split_balance(
    plan: SplitPlan, cu_seqlens: torch.Tensor | None, batch: int, seq: int, *, attention_tokens: int | None = None
) -> dict[str, float]:
    """How evenly ``plan`` spreads a micro-batch, and what it exchanges. Per rank: its real tokens and its
    attention work (each query sees its document's keys up to itself: the sum of ``position + 1``); ``max/mean``
    of each; with ``attention_tokens``, ``max/mean`` of their sum weighed as ``document_cost`` weighs it (the
    work the ``work`` balance evens out); the padding share of the ranks' rows; ``needed_fraction``: the share of real tokens whose keys
    another rank needs (in split documents); ``sent_fraction``: the token slots the all-gather kind sends
    (every rank's row, or its ``shared`` prefix) per real token."""
    positions = document_positions(cu_seqlens, batch, seq, torch.device("cpu")).reshape(-1) + 1  # (B*T,)
    tokens, work = [], []
    for index in plan.index:
        flat = index.reshape(-1).cpu()
        if not plan.flat:  # (B, L) per-row indices -> flat ones
            rows = torch.arange(index.shape[0]).repeat_interleave(index.shape[1])
            flat = torch.where(flat >= 0, flat + rows * seq, -1)
        real = flat[flat >= 0]
        tokens.append(real.numel())
        work.append(int(positions[real].sum()))
    holders: dict[int, int] = {}  # document -> ranks holding part of it
    for docs in plan.docs:
        for d in docs.reshape(-1).unique().tolist():
            if d >= 0:
                holders[d] = holders.get(d, 0) + 1
    doc_tokens: dict[int, int] = {}
    for docs in plan.docs:
        for d, n in zip(*docs.reshape(-1).unique(return_counts=True)):
            doc_tokens[int(d)] = doc_tokens.get(int(d), 0) + int(n)
    needed = sum(n for d, n in doc_tokens.items() if d >= 0 and holders[d] > 1)
    total = sum(tokens)
    width = plan.index[0].numel() if plan.shared is None else plan.shared * plan.index[0].shape[0]
    mean_tokens, mean_work = total / len(tokens), sum(work) / len(work)
    slots = sum(int(i.numel()) for i in plan.index)
    extra = {}
    if attention_tokens is not None:
        cost = [n + w / attention_tokens for n, w in zip(tokens, work)]
        extra["max_over_mean_cost"] = round(max(cost) / (sum(cost) / len(cost)), 4) if total else 0.0
    return extra | {
        "max_over_mean_tokens": round(max(tokens) / mean_tokens, 4) if total else 0.0,
        "max_over_mean_work": round(max(work) / mean_work, 4) if total else 0.0,
        "padding_fraction": round(1 - total / slots, 4) if slots else 0.0,
        "needed_fraction": round(needed / total, 4) if total else 0.0,
        "sent_fraction": round(len(plan.index) * width / total, 4) if total else 0.0,
    }
