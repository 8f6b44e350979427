"""Static-shape decode steps and their CUDA graphs.

Why it exists: a decode step of a small model is hundreds of tiny kernels, and launching them costs more than
running them. A step whose every sequence brings one token can run with STATIC shapes and no host work inside
the model call: persistent device buffers hold the step's inputs (tokens, positions, the flat page slot of each
new token, a block table padded to ``M`` blocks of ``max_model_len``, the lengths), the batch is padded up to
one of a few sizes with rows that write and read only the cache's scratch block, and attention masks by the
lengths rather than slicing by them. Such a call can be captured once per padded size as a CUDA graph and
replayed; with graphs off the same static call runs eagerly (the CPU tests check it against the plain step).
Hybrid models (recurrent layers beside attention) too: the buffers also hold each row's recurrent state slot
(the padding rows: the cache's scratch state slot), through which the recurrent layers gather and write back
their states (``PagedKVCache.recurrent_state`` / ``set_recurrent_state`` in a static step).

The host side of a step (which blocks its tokens take, the lengths) is ``PagedKVCache.begin_static_decode``;
this module copies it into the buffers (one pinned staging tensor per dtype on CUDA, copied without a sync),
runs or replays the call and hands back the real rows' logits. The sampler runs after, outside the graph.

Shape legend: R rows of the largest padded size, Bp rows of a step's padded size, S real sequences (<= Bp),
M blocks of ``max_model_len``, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from mcore.errors import UserError
from mcore.protocols.block import LOGIT_ROWS, AttentionCacheSpec, BlockContext, LayerCacheSpec, RecurrentStateSpec
from mcore_inference.grad import no_grad


@dataclass(frozen=True)
class StaticStep:
    """Device views of one padded decode step of ``rows`` rows (slices of ``DecodeBuffers``: the same memory
    for every step of that size, so a captured graph reads each step's inputs). A speculative step
    (``static_speculative.py``) brings ``queries`` tokens per row (q below; 1 for decode)."""

    rows: int
    tokens: torch.Tensor  # (Bp * q,) int64
    positions: torch.Tensor  # (Bp * q,) int64
    slots: torch.Tensor  # (Bp * q,) int64 flat page slot of each new token
    seq_lens: torch.Tensor  # (Bp,) int32 each row's length with its new tokens
    block_table: torch.Tensor  # (Bp, M) int32, -1 past a row's last block
    cu_seqlens: torch.Tensor  # (Bp + 1,) int32: 0, q, ..., Bp * q
    logit_rows: torch.Tensor  # (Bp,) int64: 0, 1, ..., Bp - 1 (a speculative step: its own rows)
    queries: int = 1
    state_slots: torch.Tensor | None = None  # (Bp,) int64 each row's recurrent state slot; None: none held


T = TypeVar("T")


def checked_sizes(
    batch_sizes: Sequence[int], caches: Sequence[Any], cuda_graphs: bool, what: str, *, recurrent: bool = False
) -> list[int]:
    """The sorted padded sizes of a static runner over ``caches`` (refused in one line: sizes that are not positive
    ints, a cache that cannot serve static steps, or has recurrent layers unless ``recurrent``, graphs off CUDA);
    ``what`` names the runner in the messages."""
    sizes = sorted(set(batch_sizes))
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise UserError(f"graph_batch_sizes = {tuple(batch_sizes)!r}: must be positive ints, at least one")
    if not all(c.static_decode_ok for c in caches):
        raise UserError(f"{what} need caches of one attention group (at most one sliding window) with a scratch block")
    if not recurrent and any(c.has_recurrent_state for c in caches):
        raise UserError(
            f"{what} need caches without recurrent layers: rolling back inside a step needs per-token states, which "
            "static steps do not keep"
        )
    device = caches[0].device
    if cuda_graphs and device.type != "cuda":
        raise UserError(f"cuda_graphs=True needs the model on a CUDA device; it is on {device}")
    return sizes


def capture_graphs(
    sizes: Sequence[int],
    device: torch.device,
    pad: Callable[[int], None],
    call: Callable[[int], T],
    end: Callable[[], None],
    warmup: int = 2,
) -> dict[int, tuple[torch.cuda.CUDAGraph, T]]:
    """One CUDA graph of ``call(rows)`` per size, largest first, sharing one memory pool. ``pad(rows)`` writes
    padding-only inputs (so nothing but the scratch block is written) and ``end()`` closes the cache's static step
    after each call; warm-up calls first, on a side stream (kernel compilation, cuBLAS workspaces)."""
    graphs: dict[int, tuple[torch.cuda.CUDAGraph, T]] = {}
    pool = None
    for rows in sorted(sizes, reverse=True):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                pad(rows)
                call(rows)
                end()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        pad(rows)
        with torch.cuda.graph(graph, pool=pool):
            out = call(rows)
        end()
        pool = graph.pool()
        graphs[rows] = (graph, out)
    torch.cuda.synchronize(device)
    return graphs


class WeightAddresses:
    """Where ``module``'s parameters and buffers lay when its graphs were captured. A CUDA graph reads them by
    address, so one that moved since (``model.to(dtype)``, a load that assigns ``.data``, a repack) would be
    replayed over freed memory: wrong tokens, or an illegal access later. ``check()`` before each replay looks at
    a few parameters (first, middle, last: what ``.to()`` or a full reload moves) and at every tensor on the first
    replay and every ``every``-th after (a few microseconds, amortised), and refuses in one line."""

    def __init__(self, module: nn.Module, every: int = 64) -> None:
        self.module = module
        self.addresses = self._addresses()
        params = list(module.parameters())
        picked = {id(p): p for p in (params[0], params[len(params) // 2], params[-1])} if params else {}
        self.sample = [(p, p.data_ptr()) for p in picked.values()]  # looked at before every replay
        self.every, self.replays = every, 0

    def _addresses(self) -> list[int]:  # (buffers are replaced by new tensors on .to(): read them anew each time)
        return [t.data_ptr() for t in (*self.module.parameters(), *self.module.buffers())]

    def check(self) -> None:
        """Raise ``UserError`` if a tensor moved."""
        self.replays += 1
        if (self.replays - 1) % self.every and all(p.data_ptr() == a for p, a in self.sample):
            return
        now = self._addresses()
        moved = sum(a != b for a, b in zip(now, self.addresses)) + abs(len(now) - len(self.addresses))
        if moved:
            raise UserError(
                f"CUDA graphs of this engine read the model's weights where they were at capture, and {moved} "
                "tensors moved since (model.to(), a load assigning .data): create the engine after changing the model"
            )


class DecodeBuffers:
    """Persistent inputs for decode steps of up to ``max_rows`` rows over tables of ``max_blocks`` blocks, and
    host staging for them (pinned on CUDA: the copies do not wait for the device).

    The inputs are typed views of ONE byte buffer (tokens, positions, slots and recurrent state slots int64, then
    the lengths and the block table int32), so a step's inputs travel in one host-to-device copy. The staging
    remembers each table row it holds: a step rewrites only the rows whose table changed (a new block, another
    sequence in the row)."""

    def __init__(self, max_rows: int, max_blocks: int, device: torch.device) -> None:
        self.max_rows, self.max_blocks, self.device = max_rows, max_blocks, device
        pin = device.type == "cuda"
        lens_at = 4 * max_rows * 8  # byte offsets: int64 (4, R), then int32 (R,), then int32 (R, M) 8-aligned
        self._table_at = table_at = lens_at + -(-max_rows * 4 // 8) * 8
        self._row_bytes = max_blocks * 4
        size = table_at + max_rows * self._row_bytes
        raw = torch.zeros(size, dtype=torch.uint8, device=device)
        self._host_raw = torch.zeros(size, dtype=torch.uint8, pin_memory=pin)
        self._raw = raw
        self.ints = raw[:lens_at].view(torch.int64).view(4, max_rows)  # tokens, positions, slots, state slots
        self.lens = raw[lens_at : lens_at + max_rows * 4].view(torch.int32)
        self.table = raw[table_at:].view(torch.int32).view(max_rows, max_blocks)
        self.cu = torch.arange(max_rows + 1, dtype=torch.int32, device=device)
        self.rows = torch.arange(max_rows, dtype=torch.int64, device=device)
        host = self._host_raw.numpy()
        self._np_ints = host[:lens_at].view(np.int64).reshape(4, max_rows)
        self._np_lens = host[lens_at : lens_at + max_rows * 4].view(np.int32)
        self._np_table = host[table_at:].view(np.int32).reshape(max_rows, max_blocks)
        self._np_lens[:] = 1
        self._np_table[:] = -1
        self.lens.fill_(1)
        self.table.fill_(-1)
        self._held: list[list[int]] = [[] for _ in range(max_rows)]  # the table each staging row holds (-1 after)
        self._views: dict[int, StaticStep] = {}
        # the last staging copy (CUDA): the next fill waits for it before rewriting the staging
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self._copy_pending = False

    def step(self, rows: int) -> StaticStep:
        """The views of a ``rows``-row step (made once per size)."""
        view = self._views.get(rows)
        if view is None:
            view = self._views[rows] = self._make_step(rows)
        return view

    def _make_step(self, rows: int) -> StaticStep:
        return StaticStep(
            rows=rows,
            tokens=self.ints[0, :rows],
            positions=self.ints[1, :rows],
            slots=self.ints[2, :rows],
            seq_lens=self.lens[:rows],
            block_table=self.table[:rows],
            cu_seqlens=self.cu[: rows + 1],
            logit_rows=self.rows[:rows],
            state_slots=self.ints[3, :rows],
        )

    def fill(
        self,
        rows: int,
        tokens: Sequence[int] | torch.Tensor,
        tables: Sequence[Sequence[int]],
        lens: Sequence[int],
        slots: Sequence[int],
        scratch: int,
        block_size: int,
        state_slots: Sequence[int] = (),
        scratch_state: int = 0,
    ) -> None:
        """Write the step's ``S`` sequences into rows ``0..S-1`` and padding into the rest of ``rows``: token 0 at
        position 0, written to and read from the scratch block (length 1) and the recurrent state slot
        ``scratch_state``; ``state_slots`` (empty: the cache holds no recurrent state) each sequence's state slot.
        ``tokens`` on the device ((S,) int64: an overlapped step's inputs, the previous step's sampled tokens) are
        copied there after the staging copy.
        The copy from the staging tensors does not wait on CUDA; the next ``fill`` waits for it (an event) before
        rewriting the staging, which under overlapped decode is still queued behind the step before."""
        real = len(tokens)
        if real > rows:
            raise UserError(f"static decode step of {real} sequences in {rows} rows: too many sequences")
        if self._copied is not None and self._copy_pending:
            self._copied.synchronize()
        ints, host_lens = self._np_ints, self._np_lens  # numpy views: cheap writes
        if real:
            if not isinstance(tokens, torch.Tensor):
                ints[0, :real] = tokens
            positions = ints[1, :real]
            positions[:] = lens
            positions -= 1  # the new token's position
            ints[2, :real] = slots
            if state_slots:
                ints[3, :real] = state_slots
            host_lens[:real] = lens
        if real < rows:
            ints[:2, real:rows] = 0
            ints[2, real:rows] = scratch * block_size
            ints[3, real:rows] = scratch_state
            host_lens[real:rows] = 1
        held = self._held
        for i, table in enumerate(tables):
            if held[i] != table:  # a new block or another sequence: rewrite the row
                self._write_row(i, table)
        padding = [scratch]
        for i in range(real, rows):
            if held[i] != padding:
                self._write_row(i, padding)
        # the inputs and this step's table rows in one pinned, asynchronous copy (rows past ``rows``: no view of it)
        end = self._table_at + rows * self._row_bytes
        self._raw[:end].copy_(self._host_raw[:end], non_blocking=self._copied is not None)
        if self._copied is not None:
            self._copied.record()
            self._copy_pending = True
        if isinstance(tokens, torch.Tensor) and real:
            self.ints[0, :real].copy_(tokens)  # (S,) on the device, after the staging's stale tokens

    def _write_row(self, i: int, table: Sequence[int]) -> None:
        """Staging row ``i`` := ``table``, then -1 (refused in one line: more blocks than the buffers hold)."""
        n, before = len(table), len(self._held[i])
        if n > self.max_blocks:
            raise UserError(
                f"static decode: a sequence holds {n} blocks, the buffers {self.max_blocks} (max_model_len)"
            )
        row = self._np_table[i]
        if before > n:
            row[n:before] = -1
        row[:n] = table
        self._held[i] = list(table)  # a copy: the cache's lists grow


def static_decode_supported(specs: Mapping[int, LayerCacheSpec]) -> bool:
    """Whether a cache over ``specs`` serves static decode: attention layers all with one window (at least one),
    any recurrent layers beside them."""
    attention = [s for s in specs.values() if isinstance(s, AttentionCacheSpec)]
    others = [s for s in specs.values() if not isinstance(s, (AttentionCacheSpec, RecurrentStateSpec))]
    return bool(attention) and not others and len({s.window for s in attention}) == 1


def default_graph_sizes(max_rows: int) -> tuple[int, ...]:
    """1, 2, 4, then every multiple of 8 up to ``max_rows`` (and ``max_rows``)."""
    sizes = {s for s in (1, 2, 4) if s <= max_rows} | set(range(8, max_rows + 1, 8)) | {max_rows}
    return tuple(sorted(sizes))


class StaticDecoder:
    """Runs pure-decode steps of ``model`` over ``cache`` with static shapes, padded up to the next of
    ``batch_sizes``; with ``cuda_graphs`` each size is captured once (``capture``) and replayed."""

    def __init__(
        self,
        model: nn.Module,
        cache: Any,
        attention: Any,
        *,
        batch_sizes: Sequence[int],
        max_model_len: int,
        cuda_graphs: bool,
    ) -> None:
        sizes = checked_sizes(batch_sizes, [cache], cuda_graphs, "static decode / CUDA graphs", recurrent=True)
        device = cache.device
        self.model, self.cache, self.attention = model, cache, attention
        self.sizes, self.cuda_graphs = sizes, cuda_graphs
        self.buffers = DecodeBuffers(sizes[-1], math.ceil(max_model_len / cache.block_size), device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.weights: WeightAddresses | None = None  # set at capture
        self.num_replays = 0  # steps served by a graph
        self.num_static = 0  # steps served by the static path (graph or eager)

    @property
    def max_rows(self) -> int:
        return self.sizes[-1]

    def padded(self, num_seqs: int) -> int | None:
        """The smallest size that holds ``num_seqs`` rows (None: more than the largest)."""
        return next((s for s in self.sizes if s >= num_seqs), None)

    def forward(self, step: StaticStep) -> torch.Tensor:
        """The model call on ``step``'s buffers: logits ``(Bp, V)`` (the cache in static mode already)."""
        ctx = BlockContext(
            positions=step.positions[None],
            cu_seqlens=step.cu_seqlens,
            max_seqlen=1,
            kv_cache=self.cache,
            attention=self.attention,
            extra={LOGIT_ROWS: step.logit_rows},
        )
        logits = self.model(step.tokens[None], ctx=ctx)  # (1, Bp, V)
        return logits[0]

    @torch.no_grad()
    def capture(self, warmup: int = 2) -> None:
        """Capture one graph per size, largest first, sharing one memory pool; padding rows only, so nothing but
        the scratch block is written. Warm-up calls first (kernel compilation, cuBLAS workspaces)."""
        if not self.cuda_graphs:
            return
        self.weights = WeightAddresses(self.model)
        self.graphs = capture_graphs(
            self.sizes,
            self.cache.device,
            lambda rows: self._padding_only(self.buffers.step(rows)),
            lambda rows: self.forward(self.buffers.step(rows)),
            self.cache.end_static_decode,
            warmup,
        )

    @no_grad
    def run(self, tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The step scheduled last (``cache.schedule``: one new token per sequence, ``tokens`` in its order, host
        ints or (S,) int64 on the device): logits ``(S, V)`` of its sequences."""
        rows = self.padded(len(tokens))
        if rows is None:
            raise UserError(f"static decode of {len(tokens)} sequences: the largest size is {self.max_rows}")
        step = self.buffers.step(rows)
        cache = self.cache
        tables, lens, slots = cache.begin_static_decode(step)
        assert cache.scratch_block is not None
        state_slots, scratch_state = cache.static_state_slots(), cache.scratch_state or 0
        self.buffers.fill(
            rows, tokens, tables, lens, slots, cache.scratch_block, cache.block_size, state_slots, scratch_state
        )
        self.num_static += 1
        captured = self.graphs.get(rows)
        if captured is None:
            return self.forward(step)[: len(tokens)]
        graph, out = captured
        if self.weights is not None:
            self.weights.check()
        graph.replay()
        self.num_replays += 1
        return out[: len(tokens)]

    def _padding_only(self, step: StaticStep) -> None:
        cache = self.cache
        cache.begin_static_decode(step)
        assert cache.scratch_block is not None
        scratch_state = cache.scratch_state or 0
        self.buffers.fill(step.rows, [], [], [], [], cache.scratch_block, cache.block_size, (), scratch_state)
