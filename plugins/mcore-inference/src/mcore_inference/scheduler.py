"""Continuous batching: which sequences run in the next model call, and how many of their tokens.

Why it exists: the engine makes one model call per step; this module fills it. Each step has a token budget
(``max_num_batched_tokens``) and at most ``max_num_seqs`` running sequences. Running sequences come first, the
decodes (one pending token) before those still prefilling; then waiting sequences are admitted in FIFO order,
their prompts chunked to the budget left (chunked prefill). A new sequence starts from its cached prefix
(``PagedKVCache.start_sequence``): the cached full blocks are not computed again, and at least one token is.

When the pool has too few free blocks for a running sequence, the most recently admitted running sequence not
yet scheduled this step is preempted by recompute: its blocks go back (its full blocks stay findable in the
prefix cache), and it returns to the front of the waiting queue with ``num_computed`` 0, so its prompt and the
tokens it generated so far are prefilled again and it continues with identical output. A waiting sequence that
does not fit stops admission (FIFO: nothing overtakes it).

``align_prefill`` (hybrid models with prefix caching): a chunk of more than one token that crosses a block
boundary is cut to end on the last boundary it crosses, so that the step ends there and the cache can snapshot
the recurrent states at that block (``PagedKVCache.cache_prefix``). A prompt whose length is not a multiple of
the block size thus takes one step more (its last partial block alone); decode steps are never cut.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from mcore_inference.cache import PagedKVCache


@dataclass(eq=False)
class SequenceState:
    """One request as the scheduler sees it: its tokens (prompt then output) and how many are in the cache."""

    seq_id: int
    token_ids: list[int]
    extra_key: Hashable = None
    num_computed: int = 0
    num_preemptions: int = 0

    @property
    def num_pending(self) -> int:
        """Tokens known but not yet in the cache."""
        return len(self.token_ids) - self.num_computed


@dataclass
class SchedulerOutput:
    """One step: ``sequences[i]`` brings ``num_tokens[i]`` new tokens (from its ``num_computed``), in this order;
    ``preempted``: sequences sent back to waiting this step."""

    sequences: list[SequenceState] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[SequenceState] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    """FIFO continuous batching over a ``PagedKVCache`` (see the module docstring)."""

    def __init__(
        self, cache: PagedKVCache, *, max_num_seqs: int, max_num_batched_tokens: int, align_prefill: bool = False
    ) -> None:
        self.cache = cache
        self.align_prefill = align_prefill
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []  # admission order
        self.num_preemptions = 0  # over the scheduler's life

    def add(self, seq: SequenceState) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: SequenceState) -> None:
        """Remove a finished or aborted sequence wherever it is and give its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.cache.has_sequence(seq.seq_id):
            self.cache.release(seq.seq_id)

    def schedule(self) -> SchedulerOutput:
        """The next step's sequences and token counts (empty when nothing can run)."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        reserved = 0  # blocks the scheduled sequences take during the step
        scheduled: set[int] = set()
        decodes: list[SequenceState] = []
        prefills: list[SequenceState] = []
        for s in self.running:
            pending = len(s.token_ids) - s.num_computed
            if pending == 1:
                decodes.append(s)
            elif pending > 1:
                prefills.append(s)
        cache = self.cache
        free = cache.num_free_blocks()  # changes only when a sequence is preempted in this loop
        preempted: set[int] = set()
        for seq in (*decodes, *prefills):
            if budget == 0:
                break
            if seq.seq_id in preempted:  # preempted earlier in this loop
                continue
            count = 1 if len(seq.token_ids) - seq.num_computed == 1 else self._chunk(seq, budget)
            need = cache.blocks_needed(seq.seq_id, count)
            while need > free - reserved:
                victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
                self._preempt(victim, out)
                preempted.add(victim.seq_id)
                free = cache.num_free_blocks()
                if victim is seq:
                    break
            else:
                out.sequences.append(seq)
                out.num_tokens.append(count)
                scheduled.add(seq.seq_id)
                budget -= count
                reserved += need
        if out.preempted:  # blocks are short: admit nothing new this step
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.cache.num_free_slots() < 1:
                break
            seq.num_computed = self.cache.start_sequence(seq.seq_id, seq.token_ids, seq.extra_key)
            count = self._chunk(seq, budget)
            need = self.cache.blocks_needed(seq.seq_id, count)
            if need > self.cache.num_free_blocks() - reserved:
                self.cache.release(seq.seq_id)  # its cached blocks go back; it waits for room
                seq.num_computed = 0
                break
            self.waiting.popleft()
            self.running.append(seq)
            out.sequences.append(seq)
            out.num_tokens.append(count)
            budget -= count
            reserved += need
        return out

    def _chunk(self, seq: SequenceState, budget: int) -> int:
        """Tokens of ``seq`` for this step: its pending ones within ``budget``, cut to a block boundary under
        ``align_prefill`` (see the module docstring)."""
        count = min(seq.num_pending, budget)
        if self.align_prefill and count > 1:
            bs = self.cache.block_size
            boundary = (seq.num_computed + count) // bs * bs
            if boundary > seq.num_computed:
                count = boundary - seq.num_computed
        return count

    def _preempt(self, seq: SequenceState, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.cache.release(seq.seq_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # victims go latest-admitted first, so each to the front keeps the waiting queue in admission order
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
