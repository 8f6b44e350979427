"""Static-shape verification and draft steps of MTP speculative decoding, and their CUDA graphs.

Why it exists: speculation turns a decode step into a verification call of ``k + 1`` tokens per sequence and
``k`` small draft calls, each hundreds of kernel launches, which a captured graph replays at once. In steady
state every running sequence brings exactly ``k + 1`` tokens (its pending token and ``k`` drafts), so:

* verification (``StaticSpeculation.verify``): the main model's ``forward_with_hidden`` over ``Bp * (k + 1)``
  tokens, the batch padded up to the next of the sizes (padding rows of ``k + 1`` tokens write and read only the
  cache's scratch block), every token's logits and hidden state out;
* draft depth ``s`` (``StaticSpeculation.depth``): in steady state depth ``s``'s cache ends ``s`` positions before
  the sequence's ``T_prev`` known tokens of the last step, and after a verification that accepted ``m`` drafts it
  must compute ``m + s`` positions (``speculative.py``). The static call computes ``k + s`` per sequence, whatever
  ``m``: the first ``m + 1`` are committed, ``m + s - 1`` gives the draft, the rest (inputs past the known tokens:
  drafts not made yet, or zeros) are rolled out of the draft cache at once, as the eager pass rolls back its
  speculative entries. Its inputs: the previous depth's stash and outputs (the verification's hidden states for
  depth 1), and token ``i + s`` at each position ``i``: the known tokens from the host, the drafts of the lower
  depths scattered in on the device (no host sync between depths).

Attention takes the ``q`` tokens of each sequence as ``q`` decode queries over the same pages
(``attention.QUERIES_PER_SEQUENCE``): static shapes, the device's decode kernel. What stays eager around the calls:
the host bookkeeping (blocks, lengths, rollbacks), rejection sampling and the draws (``rejection.py``; no host
sync inside), and the one read of the step's accepted tokens and drafts.

Shape legend: R rows of the largest size, Bp rows of a step's padded size, S real sequences (<= Bp), q tokens
per row (``k + 1`` for verification, ``k + s`` for draft depth ``s``), M blocks of ``max_model_len``, H hidden,
V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mcore.errors import UserError
from mcore.protocols.block import LOGIT_ROWS, BlockContext
from mcore_inference.attention import QUERIES_PER_SEQUENCE
from mcore_inference.static_decode import StaticStep, WeightAddresses, capture_graphs, checked_sizes

Outputs = tuple[torch.Tensor, torch.Tensor]


class SpecBuffers:
    """Persistent inputs of static steps of ``queries`` tokens per row over up to ``max_rows`` rows and tables of
    ``max_blocks`` blocks, and host staging for them (pinned on CUDA: the copies do not wait for the device).
    ``all_logits``: logits of every token (verification), else of one host-chosen token per row (a draft depth)."""

    def __init__(self, max_rows: int, queries: int, max_blocks: int, device: torch.device, *, all_logits: bool) -> None:
        self.max_rows, self.queries, self.max_blocks, self.device = max_rows, queries, max_blocks, device
        self.all_logits = all_logits
        pin = device.type == "cuda"
        n = max_rows * queries
        self.ints = torch.zeros(3, n, dtype=torch.int64, device=device)  # tokens, positions, slots
        self.lens = torch.full((max_rows,), queries, dtype=torch.int32, device=device)
        self.table = torch.full((max_rows, max_blocks), -1, dtype=torch.int32, device=device)
        self.cu = torch.arange(max_rows + 1, dtype=torch.int32, device=device) * queries
        self.rows = torch.arange(n if all_logits else max_rows, dtype=torch.int64, device=device)
        self._host_ints = torch.zeros(3, n, dtype=torch.int64, pin_memory=pin)
        self._host_lens = torch.full((max_rows,), queries, dtype=torch.int32, pin_memory=pin)
        self._host_table = torch.full((max_rows, max_blocks), -1, dtype=torch.int32, pin_memory=pin)
        self._host_rows = self.rows.cpu().pin_memory() if pin else self.rows.clone()
        self._width = 1  # the widest table row written so far
        self._views: dict[int, StaticStep] = {}

    def step(self, rows: int) -> StaticStep:
        """The views of a ``rows``-row step (made once per size)."""
        view = self._views.get(rows)
        if view is None:
            q = self.queries
            view = self._views[rows] = StaticStep(
                rows=rows,
                tokens=self.ints[0, : rows * q],
                positions=self.ints[1, : rows * q],
                slots=self.ints[2, : rows * q],
                seq_lens=self.lens[:rows],
                block_table=self.table[:rows],
                cu_seqlens=self.cu[: rows + 1],
                logit_rows=self.rows[: rows * q] if self.all_logits else self.rows[:rows],
                queries=q,
            )
        return view

    def tokens(self, rows: int) -> torch.Tensor:
        """The token buffer of a ``rows``-row step as ``(Bp, q)``."""
        return self.ints[0, : rows * self.queries].view(rows, self.queries)

    def fill(
        self,
        rows: int,
        tokens: Sequence[Sequence[int]],
        tables: Sequence[Sequence[int]],
        lens: Sequence[int],
        slots: Sequence[int],
        scratch: int,
        block_size: int,
        logit_rows: Sequence[int] = (),
        starts: Sequence[int] = (),
    ) -> None:
        """Write the step's ``S`` sequences into rows ``0..S-1`` (``tokens[i]``: up to ``q`` ids, zeros after; their
        positions end at ``starts[i] + lens[i] - 1``, ``starts`` the position of each cache's first entry, 0 when
        not given; ``slots``: ``q`` per sequence) and padding into the rest of ``rows`` (tokens 0 at positions
        ``0..q-1`` of the scratch block); without ``all_logits``, ``logit_rows[i]`` is the token of row ``i`` whose
        logits come out. The caller syncs between steps (the engine reads the accepted
        tokens) before the next ``fill`` rewrites the staging."""
        real, q = len(lens), self.queries
        if real > rows:
            raise UserError(f"static speculative step of {real} sequences in {rows} rows: too many sequences")
        widest = max((len(t) for t in tables), default=1)
        if widest > self.max_blocks:
            raise UserError(
                f"static speculative step: a sequence holds {widest} blocks, the buffers {self.max_blocks} "
                "(max_model_len)"
            )
        host = self._host_ints.numpy()  # numpy views: cheap writes
        host_lens, host_table = self._host_lens.numpy(), self._host_table.numpy()
        ids, positions, where = (host[c, : rows * q].reshape(rows, q) for c in range(3))  # (Bp, q) views
        ids[:] = 0
        for i, row in enumerate(tokens):
            ids[i, : len(row)] = row
        offsets = list(range(q))
        for i, length in enumerate(lens):
            first = (starts[i] if starts else 0) + length - q
            positions[i] = [first + j for j in offsets]
        if real:
            where[:real] = [slots[i * q : (i + 1) * q] for i in range(real)]
        positions[real:] = offsets
        where[real:] = [scratch * block_size + j % block_size for j in offsets]
        host_lens[:real] = lens
        host_lens[real:rows] = q
        if self._width < widest:
            self._width = widest
        host_table[:rows, : self._width] = -1  # columns past it are -1 from the start
        for i, table in enumerate(tables):
            host_table[i, : len(table)] = table
        host_table[real:rows, 0] = scratch
        if not self.all_logits:
            host_rows = self._host_rows.numpy()
            host_rows[:rows] = [i * q + (logit_rows[i] if i < real else q - 1) for i in range(rows)]
        pin = self.device.type == "cuda"
        self.ints.copy_(self._host_ints, non_blocking=pin)
        self.lens.copy_(self._host_lens, non_blocking=pin)
        self.table[:rows].copy_(self._host_table[:rows], non_blocking=pin)
        if not self.all_logits:
            self.rows.copy_(self._host_rows, non_blocking=pin)


class _Runner:
    """One kind of static call over ``cache`` (verification, or one draft depth): ``call(step)`` on ``buffers``'
    views, run eagerly or, once captured, replayed from one CUDA graph per padded size."""

    def __init__(self, cache: Any, buffers: SpecBuffers, call: Callable[[StaticStep], Outputs]) -> None:
        self.cache, self.buffers, self.call = cache, buffers, call
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Outputs]] = {}
        self.weights: WeightAddresses | None = None  # the model's, shared by the runners (set at capture)

    def begin(self, rows: int) -> tuple[StaticStep, list[list[int]], list[int], list[int]]:
        """The step scheduled last on the cache, in static mode over the ``rows``-row views."""
        step = self.buffers.step(rows)
        tables, lens, slots = self.cache.begin_static_decode(step)
        return step, tables, lens, slots

    def fill(
        self, rows: int, tokens: Sequence[Sequence[int]], logit_rows: Sequence[int] = (), starts: Sequence[int] = ()
    ) -> None:
        """``begin`` and write the step's inputs (the padding only with no step scheduled)."""
        _, tables, lens, slots = self.begin(rows)
        scratch = self.cache.scratch_block
        assert scratch is not None
        self.buffers.fill(rows, tokens, tables, lens, slots, scratch, self.cache.block_size, logit_rows, starts)

    def run(self, rows: int) -> Outputs:
        """The call on the filled ``rows``-row step: replayed when captured, else eager."""
        captured = self.graphs.get(rows)
        if captured is None:
            return self.call(self.buffers.step(rows))
        graph, out = captured
        if self.weights is not None:
            self.weights.check()
        graph.replay()
        return out

    def capture(self, sizes: Sequence[int], warmup: int = 2) -> None:
        """One graph per size, largest first, sharing one memory pool; padding rows only, so nothing but the
        scratch block is written. Warm-up calls first (kernel compilation, cuBLAS workspaces)."""
        self.graphs = capture_graphs(
            sizes,
            self.cache.device,
            lambda rows: self.fill(rows, []),
            lambda rows: self.call(self.buffers.step(rows)),
            self.cache.end_static_decode,
            warmup,
        )


class StaticSpeculation:
    """Static verification steps over the main ``cache`` and static draft depths over ``draft_caches`` (depth
    ``s`` runs MTP module ``modules[s - 1]``) of ``LLMEngine(speculative_tokens=k)``, padded up to the next of
    ``batch_sizes``; with ``cuda_graphs`` every call is captured once per size (``capture``) and replayed."""

    def __init__(
        self,
        model: nn.Module,
        cache: Any,
        draft_caches: Sequence[Any],
        modules: Sequence[int],
        attention: Any,
        *,
        k: int,
        batch_sizes: Sequence[int],
        max_model_len: int,
        cuda_graphs: bool,
    ) -> None:
        sizes = checked_sizes(
            batch_sizes, [cache, *draft_caches], cuda_graphs, "static speculative steps / CUDA graphs"
        )
        device = cache.device
        self.model: Any = model
        self.attention, self.k, self.sizes, self.cuda_graphs = attention, k, sizes, cuda_graphs
        self.device = device
        self.modules = list(modules)
        max_blocks = math.ceil(max_model_len / cache.block_size)
        self.verifier = _Runner(
            cache, SpecBuffers(sizes[-1], k + 1, max_blocks, device, all_logits=True), self._verify_call
        )
        self.depths = [
            _Runner(c, SpecBuffers(sizes[-1], k + s, max_blocks, device, all_logits=False), self._depth_call(s))
            for s, c in enumerate(draft_caches, start=1)
        ]
        self.verifier.fill(sizes[0], [])  # one padding-only call: the hidden states' width and dtype
        _, probe = self._verify_call(self.verifier.buffers.step(sizes[0]))
        cache.end_static_decode()
        #: per depth: its input hidden states (R, q, H), written before each call
        self.inputs = [
            torch.zeros(sizes[-1], k + s, probe.shape[-1], dtype=probe.dtype, device=device) for s in range(1, k + 1)
        ]
        self.num_verify = 0  # verification steps served statically (graph or eager)
        self.num_draft = 0  # draft passes served statically
        self.num_replays = 0  # calls served by a graph

    def padded(self, num_seqs: int) -> int | None:
        """The smallest size that holds ``num_seqs`` rows (None: more than the largest)."""
        return next((s for s in self.sizes if s >= num_seqs), None)

    def capture(self) -> None:
        """With ``cuda_graphs``: capture the verification and every draft depth at every size (their inputs are
        the persistent buffers and ``inputs``)."""
        if not self.cuda_graphs:
            return
        weights = WeightAddresses(self.model)
        for runner in (self.verifier, *self.depths):
            runner.weights = weights
            runner.capture(self.sizes)

    # ----- the calls (what a graph captures) -----

    def _ctx(self, step: StaticStep, cache: Any) -> BlockContext:
        return BlockContext(
            positions=step.positions[None],
            cu_seqlens=step.cu_seqlens,
            max_seqlen=step.queries,
            kv_cache=cache,
            attention=self.attention,
            extra={LOGIT_ROWS: step.logit_rows, QUERIES_PER_SEQUENCE: step.queries},
        )

    def _verify_call(self, step: StaticStep) -> Outputs:
        """``forward_with_hidden`` on the step's buffers: logits ``(Bp * q, V)``, hidden ``(Bp * q, H)``."""
        logits, hidden = self.model.forward_with_hidden(step.tokens[None], ctx=self._ctx(step, self.verifier.cache))
        return logits[0], hidden[0]

    def _depth_call(self, s: int) -> Callable[[StaticStep], Outputs]:
        def call(step: StaticStep) -> Outputs:
            """Draft depth ``s`` on its buffers: output ``(Bp * q, H)``, logits ``(Bp, V)`` of each row's chosen
            token."""
            runner = self.depths[s - 1]
            inputs = self.inputs[s - 1][: step.rows].flatten(0, 1)[None]  # (1, Bp * q, H)
            ctx = self._ctx(step, runner.cache)
            out, logits = self.model.mtp_forward(self.modules[s - 1], inputs, step.tokens[None], ctx=ctx)
            return out[0], logits[0]

        return call

    # ----- the engine's side -----

    @torch.no_grad()
    def verify(self, tokens: Sequence[Sequence[int]], drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The verification step scheduled last on the main cache (``tokens[i]``: sequence ``i``'s pending token,
        ``drafts (S, k)``: its drafts, on the device): logits ``(1, S + S * k, V)`` in the engine's order (each
        sequence's last row, then its first ``k`` rows, sequence after sequence) and hidden states
        ``(1, S * (k + 1), H)``."""
        num = len(tokens)
        rows = self.padded(num)
        if rows is None:
            raise UserError(f"static verification of {num} sequences: the largest size is {self.sizes[-1]}")
        self.verifier.fill(rows, tokens)
        self.verifier.buffers.tokens(rows)[:num, 1:].copy_(drafts)  # device to device: no host sync
        self.num_verify += 1
        self.num_replays += int(rows in self.verifier.graphs)
        logits, hidden = self.verifier.run(rows)
        q = self.k + 1
        per_seq = logits.view(rows, q, -1)[:num]  # (S, q, V)
        ordered = torch.cat([per_seq[:, q - 1], per_seq[:, : q - 1].flatten(0, 1)])  # (S + S * k, V)
        return ordered[None], hidden[: num * q][None]

    @torch.no_grad()
    def depth(
        self,
        s: int,
        inputs: torch.Tensor,
        known: Sequence[Sequence[int]],
        accepted: torch.Tensor,
        drafts: torch.Tensor,
        logit_rows: Sequence[int],
        starts: Sequence[int],
    ) -> Outputs:
        """Draft depth ``s``'s step scheduled last on its cache: ``inputs (S, k + s, H)`` its input hidden states,
        ``known[i]`` the known next tokens of sequence ``i`` from the window's start, then the drafts of depths
        ``1..s-1`` (``drafts (S, k)``, device) from column ``accepted[i] + 1`` (``accepted (S,)`` device int64);
        ``logit_rows[i]`` the window index whose logits come out; ``starts[i]`` the position of the sequence's first
        draft-cache entry (a prefix-cache hit starts there). Returns the output ``(S, k + s, H)`` and
        logits ``(S, V)``."""
        num, q = len(known), self.k + s
        rows = self.padded(num)
        if rows is None:
            raise UserError(f"static draft of {num} sequences: the largest size is {self.sizes[-1]}")
        runner = self.depths[s - 1]
        runner.fill(rows, known, logit_rows, starts)
        self.inputs[s - 1][:num].copy_(inputs)
        if s > 1:  # the lower depths' drafts follow the accepted tokens: scattered on the device
            columns = accepted[:, None] + torch.arange(1, s, device=accepted.device)[None, :]  # (S, s - 1)
            runner.buffers.tokens(rows)[:num].scatter_(1, columns, drafts[:, : s - 1])
        self.num_replays += int(rows in runner.graphs)
        out, logits = runner.run(rows)
        return out.view(rows, q, -1)[:num], logits[:num]
