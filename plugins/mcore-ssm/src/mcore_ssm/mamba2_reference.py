"""Mamba2's state-space scan (SSD) in plain torch: a sequential recurrence (the oracle) and the chunked form.

Shape legend: B rows, T tokens per row, N = B * T tokens, h heads (nh), p head dim (hd), g groups (ng),
n state dim (ds), S sequences (segments: rows, or documents under ``cu_seqlens``; ``mcore_ssm.packing``),
c chunks, Q chunk size.

The recurrence, per head, with ``dt`` discretised (``softplus(dt + dt_bias)`` clamped to ``dt_limit``),
``A < 0`` one scalar per head and ``B``, ``C`` shared by the ``nh / ng`` heads of a group::

    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t (outer) B_t      # (p, n), fp32
    y_t     = state_t @ C_t + D * x_t

Each segment starts from its ``initial_state`` (zeros without one) and nothing crosses a segment
boundary; both functions return the state after each segment's last token, ``(S, h, p, n)`` fp32.

``ssd_chunked`` is the form kernels compute: the tokens are laid out so that every segment starts on a
chunk boundary (chunks never straddle documents: the tail of a segment's last chunk is padding with
``dt = 0``, which leaves the state as it was), then each chunk's output is a masked quadratic form
(``C B^T`` weighted by the decay between the two tokens) plus the state entering the chunk read by
``C``, and the entering states come from the chunks' own final states by one decay-weighted
lower-triangular sum per segment over its scan entries (its initial state, then its chunks: quadratic
in the chunks of a segment, like Mamba2's minimal form; the Triton kernels pass states in a loop).
Decay sums over more than one chunk use the masked cumulative sum (no difference of large running
sums), so the chunked form matches the recurrence to fp32 rounding. Shape legend, scan: M entries
per segment (its initial state, then its chunks), padded to the longest segment's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypedDict, Unpack

import torch
import torch.nn.functional as F

from mcore_ssm.packing import Segments, check_state_count, documents, from_padded, to_padded
from mcore_ssm.segsum import segsum

__all__ = [
    "CHUNK",
    "ChunkLayout",
    "Chunks",
    "ScanOptions",
    "discretize_dt",
    "ssd_chunked",
    "ssd_sequential",
    "to_chunks",
]

#: The default chunk size of the chunked scan.
CHUNK = 64


class ScanOptions(TypedDict, total=False):
    """The chunked scan's keyword arguments (``to_chunks``' signature holds their defaults), as ``ssd_chunked``,
    ``mamba2_triton.ssd_chunked_triton`` and ``mamba2_kernels.ssd_scan`` take and pass them on."""

    dt_bias: torch.Tensor | None
    dt_softplus: bool
    dt_limit: tuple[float, float]
    initial_state: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    chunk_size: int


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (the float64 oracle of tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def discretize_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None = None,
    *,
    softplus: bool = True,
    limit: tuple[float, float] = (0.0, math.inf),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``dt (..., h)`` -> the step size ``(..., h)`` in ``dtype``: ``+ dt_bias``, ``softplus``, clamped to ``limit``."""
    out = dt.to(dtype)
    if dt_bias is not None:
        out = out + dt_bias.to(dtype)
    if softplus:
        out = F.softplus(out)
    if limit != (0.0, math.inf):
        out = out.clamp(min=limit[0], max=limit[1])
    return out


def _check_shapes(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
) -> tuple[int, int]:
    """``(heads, groups)`` after checking the shapes against each other (``ValueError`` naming the mismatch)."""
    if x.ndim != 4:
        raise ValueError(f"ssd: x of shape {tuple(x.shape)}; expected (B, T, heads, head_dim)")
    batch, seq, heads, _ = x.shape
    if B.ndim != 4 or B.shape != C.shape or B.shape[:2] != (batch, seq):
        raise ValueError(
            f"ssd: B {tuple(B.shape)} and C {tuple(C.shape)}; expected both (B, T, groups, d_state) = ({batch}, {seq}, g, n)"
        )
    groups = B.shape[2]
    if heads % groups:
        raise ValueError(f"ssd: {groups} groups do not divide {heads} heads")
    if dt.shape != (batch, seq, heads) or A.shape != (heads,) or (D is not None and D.shape != (heads,)):
        raise ValueError(
            f"ssd: dt {tuple(dt.shape)}, A {tuple(A.shape)}, D {None if D is None else tuple(D.shape)}; "
            f"expected dt ({batch}, {seq}, {heads}), A and D ({heads},)"
        )
    return heads, groups


def _check_state(x: torch.Tensor, initial_state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    heads, head_dim = x.shape[2:]
    if initial_state.ndim != 4 or initial_state.shape[1:3] != (heads, head_dim):
        raise ValueError(
            f"ssd: initial_state of shape {tuple(initial_state.shape)}; expected (S, {heads}, {head_dim}, d_state)"
        )
    return initial_state.to(dtype)


def _segments_and_state(
    x: torch.Tensor, cu_seqlens: torch.Tensor | None, initial_state: torch.Tensor | None, dtype: torch.dtype
) -> tuple[Segments, torch.Tensor | None]:
    batch, seq = x.shape[:2]
    segments = documents(batch, seq, cu_seqlens, x.device)
    if initial_state is None:
        return segments, None
    check_state_count(segments, initial_state.shape[0], cu_seqlens, "ssd initial_state")
    return segments, _check_state(x, initial_state, dtype)


def ssd_sequential(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence, one token at a time (the test oracle; see the module docstring).

    ``x (B, T, h, p)``, ``dt (B, T, h)`` (before ``dt_bias`` and softplus), ``A (h,)`` (negative),
    ``B``, ``C (B, T, g, n)``, ``D (h,)``, ``dt_bias (h,)``, ``initial_state (S, h, p, n)``.
    Returns ``y (B, T, h, p)`` in ``x``'s dtype and the final state ``(S, h, p, n)`` (fp32; fp64 inputs: fp64).
    """
    heads, groups = _check_shapes(x, dt, A, B, C, D)
    dtype = _compute_dtype(x)
    batch, seq, _, head_dim = x.shape
    segments, state0 = _segments_and_state(x, cu_seqlens, initial_state, dtype)
    rep = heads // groups
    step = discretize_dt(dt, dt_bias, softplus=dt_softplus, limit=dt_limit, dtype=dtype).reshape(batch * seq, heads)
    # per segment in order; the padding after a segment has dt = 0: its state is left unchanged
    xs = to_padded(x.reshape(batch * seq, heads, head_dim).to(dtype), segments)  # (S, L, h, p)
    dts = to_padded(step, segments)  # (S, L, h)
    Bs = to_padded(B.reshape(batch * seq, groups, -1).to(dtype), segments).repeat_interleave(rep, dim=2)  # (S, L, h, n)
    Cs = to_padded(C.reshape(batch * seq, groups, -1).to(dtype), segments).repeat_interleave(rep, dim=2)  # (S, L, h, n)
    d_state = B.shape[-1]
    state = xs.new_zeros(segments.count, heads, head_dim, d_state) if state0 is None else state0  # (S, h, p, n)
    decay = torch.exp(dts * A.to(dtype))  # (S, L, h)
    ys = []
    for t in range(segments.max_len):
        inject = (dts[:, t, :, None] * xs[:, t])[..., None] * Bs[:, t, :, None, :]  # (S, h, p, n)
        state = state * decay[:, t, :, None, None] + inject
        ys.append(torch.einsum("shpn,shn->shp", state, Cs[:, t]))  # (S, h, p)
    y = from_padded(torch.stack(ys, dim=1), segments)  # (N, h, p)
    if D is not None:
        y = y + x.reshape(batch * seq, heads, head_dim).to(dtype) * D.to(dtype)[:, None]
    return y.reshape(batch, seq, heads, head_dim).to(x.dtype), state


@dataclass(frozen=True, kw_only=True)
class ChunkLayout:
    """Where the tokens go when every segment starts on a chunk boundary: segment ``s`` holds chunks
    ``[first[s], first[s] + nchunks[s])``; token ``t`` lies at ``place[t]`` of the ``(total * Q)`` slots."""

    chunk_size: int
    nchunks: torch.Tensor  # (S,) int64
    first: torch.Tensor  # (S,) int64
    place: torch.Tensor  # (N,) int64
    total: int  # chunks
    longest: int  # chunks of the longest segment
    identity: bool = False  # place is 0..N-1 (rows that are whole chunks): no copies

    @property
    def count(self) -> int:
        """``S``, the number of segments."""
        return int(self.nchunks.numel())

    def chunked(self, t: torch.Tensor) -> torch.Tensor:
        """``t (N, ...)`` -> ``(c, Q, ...)``, zeros where no token lies (differentiable)."""
        if self.identity:
            return t.reshape(self.total, self.chunk_size, *t.shape[1:])
        out = t.new_zeros(self.total * self.chunk_size, *t.shape[1:])
        return out.index_put((self.place,), t).view(self.total, self.chunk_size, *t.shape[1:])

    def tokens(self, y: torch.Tensor) -> torch.Tensor:
        """``y (c, Q, ...)`` -> ``(N, ...)``, each token's entry (the inverse of ``chunked``)."""
        if self.identity:
            return y.reshape(self.total * self.chunk_size, *y.shape[2:])
        return y.reshape(self.total * self.chunk_size, *y.shape[2:])[self.place]


@dataclass(frozen=True, kw_only=True)
class Chunks:
    """The scan's inputs checked, discretised and laid out in chunks (``to_chunks``), in the compute dtype."""

    layout: ChunkLayout
    x: torch.Tensor  # (c, Q, h, p)
    dt: torch.Tensor  # (c, Q, h) discretised; 0 on padding
    B: torch.Tensor  # (c, Q, g, n)
    C: torch.Tensor  # (c, Q, g, n)
    initial_state: torch.Tensor | None  # (S, h, p, n)
    skip: torch.Tensor | None  # (N, h, p): D * x
    shape: tuple[int, ...]  # x's (B, T, h, p)
    dtype: torch.dtype  # x's

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """The chunked output ``y (c, Q, h, p)`` back to ``(B, T, h, p)`` in x's dtype, with the ``D`` skip."""
        out = self.layout.tokens(y)  # (N, h, p)
        if self.skip is not None:
            out = out + self.skip
        return out.reshape(self.shape).to(self.dtype)


def chunk_layout(
    x: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    chunk_size: int,
    state_dtype: torch.dtype,
) -> tuple[ChunkLayout, torch.Tensor | None]:
    """Where each token of ``x`` ``(B, T, h, p)`` lands in the chunks (rows, or the packed segments of
    ``cu_seqlens``: chunks never straddle a segment) and the checked initial state in ``state_dtype``; the
    tensors themselves are not laid out (``to_chunks`` does that, the Triton kernels read them as they come)."""
    batch, seq = x.shape[:2]
    if cu_seqlens is None:  # rows: the layout follows from the shapes (no host sync, no graph break)
        if initial_state is not None and initial_state.shape[0] != batch:
            raise ValueError(f"ssd initial_state holds {initial_state.shape[0]} states for {batch} rows")
        state0 = None if initial_state is None else _check_state(x, initial_state, state_dtype)
        per_row = -(-seq // chunk_size)
        rows = torch.arange(batch, device=x.device)
        place = rows[:, None] * (per_row * chunk_size) + torch.arange(seq, device=x.device)  # (B, T)
        layout = ChunkLayout(
            chunk_size=chunk_size,
            nchunks=torch.full((batch,), per_row, dtype=torch.int64, device=x.device),
            first=rows * per_row,
            place=place.reshape(batch * seq),
            total=batch * per_row,
            longest=per_row,
            identity=seq % chunk_size == 0,
        )
        return layout, state0
    segments, state0 = _segments_and_state(x, cu_seqlens, initial_state, state_dtype)
    nchunks = (segments.lengths + chunk_size - 1) // chunk_size  # (S,)
    first = torch.cumsum(nchunks, 0) - nchunks  # (S,)
    layout = ChunkLayout(
        chunk_size=chunk_size,
        nchunks=nchunks,
        first=first,
        place=first[segments.seg] * chunk_size + segments.pos,
        total=int(nchunks.sum()),
        longest=int(nchunks.max()),
    )
    return layout, state0


def to_chunks(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = CHUNK,
) -> Chunks:
    """Check the scan's arguments (``ssd_sequential``'s) and lay them out in chunks (``Chunks``)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size = {chunk_size!r}; allowed: a positive int")
    heads, groups = _check_shapes(x, dt, A, B, C, D)
    dtype = _compute_dtype(x)
    batch, seq, _, head_dim = x.shape
    tokens = batch * seq
    layout, state0 = chunk_layout(x, cu_seqlens, initial_state, chunk_size, dtype)
    step = discretize_dt(dt, dt_bias, softplus=dt_softplus, limit=dt_limit, dtype=dtype)  # (B, T, h)
    flat_x = x.reshape(tokens, heads, head_dim).to(dtype)  # (N, h, p)
    return Chunks(
        layout=layout,
        x=layout.chunked(flat_x),
        dt=layout.chunked(step.reshape(tokens, heads)),
        B=layout.chunked(B.reshape(tokens, groups, -1).to(dtype)),
        C=layout.chunked(C.reshape(tokens, groups, -1).to(dtype)),
        initial_state=state0,
        skip=None if D is None else flat_x * D.to(dtype)[:, None],
        shape=tuple(x.shape),
        dtype=x.dtype,
    )


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    **options: Unpack[ScanOptions],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD form (module docstring); same arguments and results as ``ssd_sequential``, plus
    ``chunk_size`` (``ScanOptions``, keyword-only; defaults as ``to_chunks``')."""
    chunks = to_chunks(x, dt, A, B, C, D, **options)
    xc, dtc, Bc, Cc, state0 = chunks.x, chunks.dt, chunks.B, chunks.C, chunks.initial_state
    layout, dtype = chunks.layout, xc.dtype
    total, count, nchunks, first = layout.total, layout.count, layout.nchunks, layout.first
    _, _, heads, head_dim = xc.shape
    groups, d_state = Bc.shape[2], Bc.shape[3]
    rep = heads // groups
    a = (dtc * A.to(dtype)).transpose(1, 2)  # (c, h, Q) log-decay of each token
    cum = torch.cumsum(a, dim=-1)  # (c, h, Q) inclusive, from the chunk's start

    # intra-chunk: y_i = sum_{j <= i} (C_i . B_j) exp(sum_{j < k <= i} a_k) dt_j x_j
    scores = torch.einsum("cign,cjgn->cgij", Cc, Bc).repeat_interleave(rep, dim=1)  # (c, h, Q, Q)
    between = segsum(a)  # (c, h, Q, Q): [i, j] = sum_{j < k <= i} a_k, -inf for j > i
    weights = scores * torch.exp(between)  # (c, h, Q, Q)
    dtx = xc * dtc[..., None]  # (c, Q, h, p)
    y = torch.einsum("chij,cjhp->cihp", weights, dtx)  # (c, Q, h, p)

    # each chunk's final state from a zero start: sum_j exp(sum_{j < k <= last} a_k) dt_j x_j B_j^T
    to_end = torch.exp(between[..., -1, :])  # (c, h, Q): exp(cum_last - cum_j), summed, not differenced
    Bh = Bc.repeat_interleave(rep, dim=2)  # (c, Q, h, n)
    chunk_states = torch.einsum("cjhp,chj,cjhn->chpn", dtx, to_end, Bh)  # (c, h, p, n)

    # state passing, per segment over its entries: its initial state, then its chunks (padded to the longest
    # segment: padding entries hold zeros and no decay). after_e = sum_{f <= e} exp(sum_{f < k <= e} decay_k) V_f
    # is the state after entry e, so entry k (chunk k - 1 of the segment) is entered with after_{k-1}
    entries = layout.longest + 1
    owner = torch.repeat_interleave(torch.arange(count, device=x.device), nchunks, output_size=total)  # (c,)
    entry = torch.arange(total, device=x.device) - first[owner] + 1  # (c,) entry of each chunk in its segment
    values = chunk_states.new_zeros(count, entries, heads, head_dim, d_state)
    values = values.index_put((owner, entry), chunk_states)  # (S, M, h, p, n)
    if state0 is not None:
        values = values.index_put((torch.arange(count, device=x.device), torch.zeros_like(nchunks)), state0)
    decays = a.new_zeros(count, entries, heads).index_put((owner, entry), cum[..., -1])  # (S, M, h)
    mix = torch.exp(segsum(decays.transpose(1, 2)))  # (S, h, M, M)
    after = torch.einsum("shef,sfhpn->sehpn", mix, values)  # (S, M, h, p, n): the state after each entry
    entering = after[owner, entry - 1]  # (c, h, p, n)
    final = after[torch.arange(count, device=x.device), nchunks]  # (S, h, p, n): after the last chunk

    # inter-chunk: the entering state decayed to each token, read by C
    Ch = Cc.repeat_interleave(rep, dim=2)  # (c, Q, h, n)
    y = y + torch.einsum("cihn,chpn,chi->cihp", Ch, entering, torch.exp(cum))  # (c, Q, h, p)

    return chunks.output(y), final
