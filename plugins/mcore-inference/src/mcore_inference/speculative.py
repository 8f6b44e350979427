"""MTP speculative decoding: draft ``k`` tokens with a model's multi-token-prediction depths, verify them in the
engine's next model call.

Why it exists: a decode step reads every weight to produce one token per sequence; a model trained with MTP
depths (DeepSeek-V3 style: depth ``d`` at position ``i`` combines the previous depth's hidden state with the
embedding of token ``i + d`` and predicts token ``i + d + 1``) can propose the next tokens itself, and the main
model checks ``k`` of them in one call. ``LLMEngine(speculative_tokens=k)`` drives this module; the acceptance
rule is ``rejection.py``.

The model (``MTPModel``, structural): ``forward_with_hidden`` (the engine's call, also returning the main stack's
hidden states), ``mtp_forward(depth, hidden, next_tokens, ctx)`` (one depth over a cache) and
``mtp_layer_indices`` (each depth's layer index, which the engine keeps out of the main cache).

Draft depth ``s`` (``1..k``) runs MTP module ``min(s, D)`` (``D`` the model's depths): the depths chain at the
same position exactly as in training, and depths beyond ``D`` reuse the last module one level deeper (as
DeepSeek reuses its one module). Each draft depth has a paged cache of its own (``PagedKVCache``, one layer, as
many blocks as the main cache, no prefix caching), whose entry at position ``j`` is computed from real inputs:
the previous depth's output at ``j`` and token ``j + s``. Per sequence, after the step's main call and its
accepted tokens (``T`` tokens known, main hidden states up to position ``T - 2``):

* depth ``s`` computes its positions from where it stopped to ``T - s - 1`` (all inputs real: committed);
* when the sequence drafts, depth ``s`` also computes positions ``T - s .. T - 2``, whose next tokens are the
  drafts of depths ``1..s-1``; its output at ``T - 2`` gives the draft distribution ``q_s`` and the draft
  ``x_s`` (argmax for greedy requests, a draw for the others). These speculative entries are rolled back at once.

So depth ``s`` lags the main cache by ``s`` positions, and the output of depth ``s - 1`` at the last position
depth ``s`` still needs is kept per sequence (one ``(H,)`` row). A sequence that starts from a prefix-cache hit
begins its draft caches at the hit (the MTP depths do not see the cached prefix except through the main
model's hidden states); preemption drops its draft state (the main model recomputes).

Verification (``verify``): the engine's call brings each drafting sequence's pending token and its ``n`` drafts;
the model returns logits of those ``n + 1`` rows; ``rejection_sample`` accepts a prefix and draws the next token;
the main cache rolls back the rejected drafts. Greedy output is the plain engine's (the target's argmax at every
position), up to the rounding of a multi-token versus a one-token attention call.

Requests with penalties or logprobs do not draft (their target rows would need per-row sampling states): they
decode one token per step beside the others; so do requests short of their ``min_tokens`` (the engine gives them
no drafts until then). ``logit_bias`` applies to the drafts and to the target rows alike (``target_distribution``):
greedy output with a bias is the plain engine's with that bias. Draws: a request with a ``seed`` takes its draft, acceptance and
resampling noise from the seeded hash of ``sampling.seeded_log_exponentials`` at each token's position (three
salts), so its output depends only on the seed and the draft model; the others use the speculator's generator.

Shape legend: N tokens of a depth's call, H hidden, V vocabulary, k draft depths, n drafts of a sequence.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from mcore.errors import UserError
from mcore.protocols.block import LOGIT_ROWS, AttentionCacheSpec, BlockContext, LayerCacheSpec
from mcore_inference.cache import PagedKVCache, bytes_per_block
from mcore_inference.rejection import gumbel_pick, rejection_sample, target_distribution
from mcore_inference.sampling import SamplingParams, seeded_log_exponentials, upload
from mcore_inference.scheduler import SchedulerOutput, SequenceState
from mcore_inference.static_speculative import StaticSpeculation

_M32 = 0xFFFFFFFF
#: Salts of a seeded request's three kinds of draws (draft, acceptance, the emitted token).
_DRAFT_SALT, _ACCEPT_SALT, _EMIT_SALT = 0x2545F491, 0x9E3779B9, 0x7F4A7C15


@runtime_checkable
class MTPModel(Protocol):
    """What speculative decoding needs of a model (mcore's ``gpt`` has it)."""

    def mtp_layer_indices(self) -> list[int]: ...

    def forward_with_hidden(
        self, tokens: torch.Tensor, *, ctx: BlockContext | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def mtp_forward(
        self, depth: int, hidden: torch.Tensor, next_tokens: torch.Tensor, *, ctx: BlockContext | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def mtp_layers(model: nn.Module) -> list[int]:
    """The MTP depths' layer indices of ``model`` (empty: a model that cannot draft)."""
    if not isinstance(model, MTPModel):
        return []
    return list(model.mtp_layer_indices())


def eligible(params: SamplingParams) -> bool:
    """Whether a request drafts: not when it has penalties or asks for logprobs."""
    return not params.penalised and params.logprobs is None


@dataclass
class SpecStats:
    """Acceptance counters: ``proposed[i]`` drafts verified at draft position ``i + 1``, ``accepted[i]`` of them
    accepted; ``verify_steps`` sequence-verifications, ``emitted`` their accepted drafts plus one token each (a
    request that stops inside them appends fewer)."""

    proposed: list[int]
    accepted: list[int]
    verify_steps: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> list[float]:
        """Per draft position: accepted over proposed (0 where none was proposed)."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed, strict=True)]

    @property
    def mean_emitted(self) -> float:
        """Tokens emitted per verification (1 + mean accepted drafts)."""
        return self.emitted / self.verify_steps if self.verify_steps else 0.0


@dataclass(eq=False)
class _Track:
    """One sequence's draft state."""

    start: int  # the first position its draft caches hold
    committed: list[int]  # per depth: positions [start, committed) in its cache, all from real inputs
    stash: list[torch.Tensor | None]  # per depth: its output (H,) at position committed - 1
    drafts: list[int] = field(default_factory=list)  # for the next verification (-1 until resolved)
    draft_probs: torch.Tensor | None = None  # (n, V): q of each draft
    draft_ids: torch.Tensor | None = None  # (n,) int64 on the device: the drafts
    resolved: bool = True  # whether ``drafts`` holds the values (a static draft pass leaves them on the device)


@dataclass(eq=False)
class _Work:
    """One sequence in a drafting pass."""

    seq: SequenceState
    params: SamplingParams
    track: _Track
    row_offset: int  # packed row of the main hidden state at position p: row_offset + p
    num_drafts: int  # drafts to make (0: only feed the depths)


class Speculator:
    """Draft caches, per-sequence draft state and counters of ``LLMEngine(speculative_tokens=k)``."""

    def __init__(
        self,
        model: nn.Module,
        k: int,
        *,
        specs: dict[int, LayerCacheSpec],
        block_size: int,
        num_blocks: int,
        max_seqs: int,
        device: torch.device,
        attention: Any,
        seed: int | None,
        scratch_block: bool = False,
    ) -> None:
        indices = mtp_layers(model)
        if not indices:
            raise UserError(
                f"LLMEngine speculative_tokens = {k}: the model has no MTP depths (model.mtp_num_layers = 0, or it "
                "has no forward_with_hidden/mtp_forward); use 0"
            )
        self.model: Any = model
        self.k = k
        self.modules = [min(s, len(indices)) for s in range(1, k + 1)]  # MTP module of each draft depth
        self.caches: list[PagedKVCache] = []
        for module in self.modules:
            index = indices[module - 1]
            spec = specs.get(index)
            if not isinstance(spec, AttentionCacheSpec):
                raise UserError(f"speculative decoding: MTP layer {index} keeps {spec!r}; only attention caches")
            self.caches.append(
                PagedKVCache(
                    {index: spec},
                    block_size=block_size,
                    num_blocks=num_blocks,
                    max_seqs=max_seqs,
                    device=device,
                    enable_prefix_caching=False,
                    scratch_block=scratch_block,  # static draft steps: padding rows write there
                )
            )
        self.device = device
        self.attention = attention
        #: the noise of requests without a seed (None: torch's default generator, as the sampler's)
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(seed + 0x5EC)
        self.stats = SpecStats(proposed=[0] * k, accepted=[0] * k)
        self._tracks: dict[int, _Track] = {}
        self._attached: dict[int, tuple[SequenceState, int]] = {}  # seq -> (it, drafts appended) this step
        self.verifying: dict[int, int] = {}  # seq -> drafts its scheduled tokens verify this step
        #: static (CUDA-graph) verification and draft steps; set by the engine (None: all eager)
        self.static: StaticSpeculation | None = None

    @staticmethod
    def bytes_per_block(model: nn.Module, specs: dict[int, LayerCacheSpec], k: int, block_size: int) -> int:
        """Bytes one block id costs over the ``k`` draft caches."""
        indices = mtp_layers(model)
        if not indices:
            return 0
        return sum(
            bytes_per_block({i: specs[i]}, block_size)
            for i in (indices[min(s, len(indices)) - 1] for s in range(1, k + 1))
        )

    # ----- around the scheduler -----

    def attach(self, running: Sequence[SequenceState]) -> None:
        """Before ``schedule``: append each decoding sequence's drafts to its tokens (the scheduler then counts
        them: budget, blocks, preemption)."""
        self._attached.clear()
        self.verifying.clear()
        for seq in running:
            track = self._tracks.get(seq.seq_id)
            if track is not None and track.drafts and seq.num_pending == 1:
                seq.token_ids.extend(track.drafts)
                self._attached[seq.seq_id] = (seq, len(track.drafts))

    def after_schedule(self, plan: SchedulerOutput) -> None:
        """After ``schedule``: a scheduled sequence keeps the drafts its token count covers (``verifying``); the
        others take theirs off again (kept for a later step), and preempted ones also lose their draft state."""
        counts = {s.seq_id: c for s, c in zip(plan.sequences, plan.num_tokens, strict=True)}
        for seq_id, (seq, n) in self._attached.items():
            keep = min(n, counts[seq_id] - 1) if seq_id in counts else 0
            if n > keep:
                del seq.token_ids[len(seq.token_ids) - (n - keep) :]
            if keep:
                self.verifying[seq_id] = keep
        self._attached.clear()
        for seq in plan.preempted:
            self.forget(seq.seq_id)

    def drafts(self, seq_id: int) -> tuple[list[int], torch.Tensor | None]:
        """The drafts sequence ``seq_id`` brings to its next verification and their distributions ``(n, V)``."""
        track = self._tracks.get(seq_id)
        if track is None:
            return [], None
        self._resolve([track])
        return list(track.drafts), track.draft_probs

    def resolve(self, seqs: Sequence[SequenceState]) -> None:
        """Before an eager step: read the drafts a static draft pass left on the device (one host sync) and put
        them in place of the placeholders among the verifying sequences' tokens."""
        pending = [(seq, self._tracks[seq.seq_id]) for seq in seqs if seq.seq_id in self.verifying]
        self._resolve([track for _, track in pending])
        for seq, track in pending:
            n = self.verifying[seq.seq_id]
            seq.token_ids[len(seq.token_ids) - n :] = track.drafts[:n]

    def _resolve(self, tracks: Sequence[_Track]) -> None:
        todo = [t for t in tracks if not t.resolved and t.draft_ids is not None]
        if not todo:
            return
        values = torch.cat([t.draft_ids for t in todo if t.draft_ids is not None]).tolist()
        for t in todo:
            t.drafts, values = values[: len(t.drafts)], values[len(t.drafts) :]
            t.resolved = True

    def draft_tokens(self, seqs: Sequence[SequenceState]) -> torch.Tensor:
        """``(S, k)`` the device drafts of ``seqs`` (each verifying ``k``), for a static verification's inputs."""
        ids = [self._tracks[s.seq_id].draft_ids for s in seqs]
        return torch.stack([x[: self.k] for x in ids if x is not None])

    def forget(self, seq_id: int) -> None:
        """Drop a sequence's draft state and caches (finished, aborted or preempted)."""
        if self._tracks.pop(seq_id, None) is not None:
            for cache in self.caches:
                if cache.has_sequence(seq_id):
                    cache.release(seq_id)

    # ----- verification -----

    def extra_rows(self, seqs: Sequence[SequenceState], cu: Sequence[int]) -> list[int]:
        """Packed rows whose logits verification needs besides each sequence's last row: the ``n`` rows before the
        last of each verifying sequence (the pending token and all drafts but the last)."""
        rows: list[int] = []
        for i, seq in enumerate(seqs):
            n = self.verifying.get(seq.seq_id, 0)
            rows += range(cu[i + 1] - 1 - n, cu[i + 1] - 1)
        return rows

    def verify(
        self,
        logits: torch.Tensor,
        seqs: Sequence[SequenceState],
        params: Sequence[SamplingParams],
        cache: PagedKVCache,
    ) -> dict[int, list[int]]:
        """The tokens each verifying sequence emits (accepted drafts, then the next token), from the step's logits
        ``(1, S + X, V)`` (each sequence's last row, then ``extra_rows``). Rolls the rejected drafts out of the
        main ``cache`` and takes all drafts off the sequences' tokens (the engine appends what is emitted)."""
        order = [i for i, s in enumerate(seqs) if s.seq_id in self.verifying]
        if not order:
            return {}
        num = len(seqs)
        offsets = list(itertools.accumulate((self.verifying.get(s.seq_id, 0) for s in seqs), initial=num))
        n_max = max(self.verifying[seqs[i].seq_id] for i in order)
        vocab = logits.shape[-1]
        batch = len(order)
        target_rows: list[int] = []
        row_params: list[SamplingParams] = []
        for i in order:
            n = self.verifying[seqs[i].seq_id]
            target_rows += [*range(offsets[i], offsets[i] + n), i] + [i] * (n_max - n)  # padding: ignored
            row_params += [params[i]] * (n_max + 1)
        device = logits.device
        index = upload(target_rows, torch.int64, device)
        target = target_distribution(logits[0].index_select(0, index), row_params).view(batch, n_max + 1, vocab)
        tracks = [self._tracks[seqs[i].seq_id] for i in order]
        counts = [self.verifying[seqs[i].seq_id] for i in order]
        probs_of = [t.draft_probs for t in tracks]
        ids_of = [t.draft_ids for t in tracks]
        if all(n == n_max for n in counts):  # the usual case: no padding
            draft = torch.stack([q[:n_max] for q in probs_of if q is not None])  # (B, n, V)
            tokens = torch.stack([x[:n_max] for x in ids_of if x is not None])  # (B, n)
        else:
            draft = torch.full((batch, n_max, vocab), 1.0 / vocab, device=device)
            tokens = torch.zeros(batch, n_max, dtype=torch.int64, device=device)
            for b, (q, x, n) in enumerate(zip(probs_of, ids_of, counts, strict=True)):
                assert q is not None and x is not None
                draft[b, :n], tokens[b, :n] = q[:n], x[:n]
        assert draft.shape[0] == batch and tokens.shape[0] == batch
        positions = [len(seqs[i].token_ids) - self.verifying[seqs[i].seq_id] for i in order]  # first draft's
        rows_params = [params[i] for i in order]
        uniforms = self._uniforms(rows_params, positions, n_max, _ACCEPT_SALT)  # (B, n)
        log_e = self._log_exponentials(rows_params, positions, n_max + 1, vocab, _EMIT_SALT)  # (B, n + 1, V)
        verdict = rejection_sample(
            target,
            draft,
            tokens,
            upload(counts, torch.int64, device),
            uniforms,
            log_e,
        )
        # the host sync of verification: accepted counts, next tokens and the drafts (those of a static draft pass
        # were never read)
        read = torch.cat([verdict.num_accepted, verdict.next_token, tokens.flatten()]).tolist()
        accepted, nxt, drafted = read[:batch], read[batch : 2 * batch], read[2 * batch :]
        out: dict[int, list[int]] = {}
        for b, i in enumerate(order):
            seq = seqs[i]
            n, m = counts[b], accepted[b]
            for j in range(n):
                self.stats.proposed[j] += 1
                self.stats.accepted[j] += int(j < m)
            self.stats.verify_steps += 1
            self.stats.emitted += m + 1
            if n > m:
                cache.rollback(seq.seq_id, n - m)
                seq.num_computed -= n - m
            del seq.token_ids[len(seq.token_ids) - n :]
            out[seq.seq_id] = [*drafted[b * n_max : b * n_max + m], nxt[b]]
        return out

    # ----- drafting -----

    @torch.no_grad()
    def draft(
        self,
        hidden: torch.Tensor,
        seqs: Sequence[SequenceState],
        params: Sequence[SamplingParams],
        first_rows: Sequence[int],
        starts: Sequence[int],
        limits: Sequence[int],
        static: bool = False,
    ) -> None:
        """After the step's tokens are appended: feed the draft depths this step's main hidden states ``hidden
        (1, N, H)`` (sequence ``i``'s first computed position ``starts[i]`` at packed row ``first_rows[i]``; its
        kept positions end at ``seq.num_computed``) and draft up to ``limits[i]`` tokens for each decoding one.
        ``static``: the step was a static verification (``k + 1`` rows per sequence); when every sequence is in
        steady state the depths run as static steps (``_draft_static``)."""
        work: list[_Work] = []
        for seq, p, row, start, limit in zip(seqs, params, first_rows, starts, limits, strict=True):
            if not eligible(p):
                continue
            track = self._tracks.get(seq.seq_id)
            if track is None:
                track = self._tracks[seq.seq_id] = _Track(start, [start] * self.k, [None] * self.k)
            assert track.committed[0] == start, (seq.seq_id, track.committed, start)
            track.drafts, track.draft_probs, track.draft_ids, track.resolved = [], None, None, True
            num_drafts = min(self.k, limit) if seq.num_pending == 1 else 0
            work.append(_Work(seq, p, track, row - start, num_drafts))
        if not work:
            return
        if static and self._steady(work, len(seqs), hidden.shape[1]):
            self._draft_static(hidden, work)
            return
        # what the previous depth leaves the next, per sequence: its output rows of this step and the position of
        # the first, its stash from before this step, and where its real (committed) positions end
        prev_out: list[torch.Tensor | None] = [None] * len(work)
        prev_first = [w.seq.num_computed for w in work]
        prev_stash: list[torch.Tensor | None] = [None] * len(work)
        prev_end = [w.seq.num_computed for w in work]  # main hidden states: positions < num_computed
        probs: list[list[torch.Tensor]] = [[] for _ in work]
        for s in range(1, self.k + 1):
            cache = self.caches[s - 1]
            chosen: list[int] = []
            pieces: list[torch.Tensor] = []
            tokens: list[int] = []
            positions: list[int] = []
            counts: list[int] = []
            spans: list[tuple[int, int, int]] = []  # (begin, end, committed after) of each sequence
            for i, w in enumerate(work):
                known, track = len(w.seq.token_ids), w.track
                begin = track.committed[s - 1]
                end = known - 1 if s <= w.num_drafts else min(prev_end[i], known - s)
                spans.append((begin, max(begin, end), max(begin, min(end, known - s))))
                if end <= begin:
                    continue
                if s == 1:
                    piece = hidden[0, w.row_offset + begin : w.row_offset + end]  # the main stack's output
                else:
                    first, out, parts = prev_first[i], prev_out[i], []
                    if begin < first:  # the previous depth's last committed output, from an earlier step
                        stash = prev_stash[i]
                        assert begin == first - 1 and stash is not None, (w.seq.seq_id, s, begin, first)
                        parts.append(stash[None])
                    if out is not None and end > max(begin, first):
                        parts.append(out[max(begin, first) - first : end - first])
                    piece = torch.cat(parts) if len(parts) > 1 else parts[0]
                assert piece.shape[0] == end - begin, (w.seq.seq_id, s, begin, end, tuple(piece.shape))
                ids = w.seq.token_ids
                tokens += [ids[j + s] if j + s < known else track.drafts[j + s - known] for j in range(begin, end)]
                positions += range(begin, end)
                counts.append(end - begin)
                pieces.append(piece)
                chosen.append(i)
            next_out: list[torch.Tensor | None] = [None] * len(work)
            next_stash = [w.track.stash[s - 1] for w in work]
            if chosen:
                out, logits, cu = self._run_depth(s, chosen, work, pieces, tokens, positions, counts)
                drafters = [i for i in chosen if s <= work[i].num_drafts]
                if drafters:
                    self._draw(logits[0], [work[i] for i in drafters], s, [probs[i] for i in drafters])
                for c, i in enumerate(chosen):
                    begin, end, committed = spans[i]
                    rows = out[0, cu[c] : cu[c + 1]]  # (end - begin, H)
                    next_out[i] = rows
                    if committed > begin:
                        next_stash[i] = rows[committed - 1 - begin].clone()
                    if end > committed:  # the speculative entries (drafting only) leave the cache at once
                        cache.rollback(work[i].seq.seq_id, end - committed)
            prev_stash = [w.track.stash[s - 1] for w in work]
            for i, w in enumerate(work):
                w.track.stash[s - 1] = next_stash[i]
                w.track.committed[s - 1] = spans[i][2]
            prev_out, prev_first = next_out, [span[0] for span in spans]
            prev_end = [span[2] for span in spans]
        for i, w in enumerate(work):
            if w.num_drafts:
                w.track.draft_probs = torch.stack(probs[i])  # (n, V)
                w.track.draft_ids = upload(w.track.drafts, torch.int64, self.device)

    def _steady(self, work: list[_Work], num_seqs: int, num_rows: int) -> bool:
        """Whether a static draft pass serves ``work``: the static verification's every sequence drafts ``k`` tokens,
        its rows start at its depth-1 cache's end, and each depth ``s`` ends ``s - 1`` positions before depth 1,
        with the stash the next depth reads (``static_speculative.py``)."""
        k, static = self.k, self.static
        if static is None or len(work) != num_seqs or num_rows != num_seqs * (k + 1) or static.padded(num_seqs) is None:
            return False
        for i, w in enumerate(work):
            track, first = w.track, w.track.committed[0]
            accepted = len(w.seq.token_ids) - first - 2
            if w.num_drafts != k or w.row_offset + first != i * (k + 1) or not 0 <= accepted <= k:
                return False
            for s in range(1, k + 1):
                cache = self.caches[s - 1]
                if track.committed[s - 1] != first - s + 1 or not cache.has_sequence(w.seq.seq_id):
                    return False
                held = cache.length(w.seq.seq_id)  # its entries: positions start .. committed - 1
                if held != track.committed[s - 1] - track.start or (s < k and track.stash[s - 1] is None):
                    return False
        return True

    def _draft_static(self, hidden: torch.Tensor, work: list[_Work]) -> None:
        """``draft`` in steady state as ``k`` static depth steps (``StaticSpeculation.depth``): the drafts stay on the
        device (the next verification reads them with its verdict, ``resolve`` before an eager step). Each track
        ends as the eager pass leaves it."""
        static = self.static
        assert static is not None
        k, num = self.k, len(work)
        ids = [w.seq.seq_id for w in work]
        params = [w.params for w in work]
        first = [w.track.committed[0] for w in work]  # depth 1's window starts here: the step's first position
        known = [len(w.seq.token_ids) for w in work]  # T
        accepted = [t - f - 2 for t, f in zip(known, first)]  # m: the window's first m + 1 positions are committed
        tail = [w.seq.token_ids[f + 1 :] for w, f in zip(work, first)]  # token i + s at window index i: m + 1 known
        m = upload(accepted, torch.int64, self.device)
        starts = [w.track.start for w in work]
        drafts = torch.zeros(num, k, dtype=torch.int64, device=self.device)
        probs: list[torch.Tensor] = []
        inputs = hidden[0].view(num, k + 1, -1)  # depth 1: the verification's hidden states (S, k + 1, H)
        every = torch.arange(num, device=self.device)
        for s in range(1, k + 1):
            cache = self.caches[s - 1]
            cache.schedule(ids, [k + s] * num)
            rows = [a + s - 1 for a in accepted]  # window index of position T - 2: the draft's logits
            out, logits = static.depth(s, inputs, tail, m, drafts, rows, starts)  # (S, k + s, H), (S, V)
            q = target_distribution(logits, params)  # (S, V)
            log_e = self._log_exponentials(params, [t - 1 + s for t in known], 1, logits.shape[-1], _DRAFT_SALT)
            drafts[:, s - 1] = gumbel_pick(q, log_e[:, 0])
            probs.append(q)
            stash = out[every, m]  # (S, H): the output at each sequence's last committed position
            before = [w.track.stash[s - 1] for w in work]
            for i, w in enumerate(work):
                w.track.stash[s - 1] = stash[i]
                w.track.committed[s - 1] = known[i] - s
                cache.rollback(ids[i], k + s - accepted[i] - 1)  # the uncommitted entries leave at once
            if s < k:  # depth s + 1 reads depth s's stash from the last step, then its outputs
                previous = torch.stack([b for b in before if b is not None])  # (S, H)
                inputs = torch.cat([previous[:, None], out], dim=1)  # (S, k + s + 1, H)
        stacked = torch.stack(probs, dim=1)  # (S, k, V)
        for i, w in enumerate(work):  # no host sync: the next verification reads the drafts with its verdict
            w.track.drafts, w.track.draft_probs, w.track.draft_ids = [-1] * k, stacked[i], drafts[i]
            w.track.resolved = False
        static.num_draft += 1

    def _run_depth(
        self,
        s: int,
        chosen: list[int],
        work: list[_Work],
        pieces: list[torch.Tensor],
        tokens: list[int],
        positions: list[int],
        counts: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """One call of draft depth ``s`` over its cache: output ``(1, N, H)``, logits ``(1, R, V)`` of the last row of
        each drafting sequence (in ``chosen`` order), and the call's cumulative counts."""
        cache = self.caches[s - 1]
        cache.schedule([work[i].seq.seq_id for i in chosen], counts)
        cu = list(itertools.accumulate(counts, initial=0))
        rows = [cu[c + 1] - 1 for c, i in enumerate(chosen) if s <= work[i].num_drafts] or [0]
        ctx = BlockContext(
            positions=torch.tensor([positions], dtype=torch.int64, device=self.device),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=self.device),
            max_seqlen=max(counts),
            kv_cache=cache,
            attention=self.attention,
            extra={LOGIT_ROWS: torch.tensor(rows, dtype=torch.int64, device=self.device)},
        )
        inputs = torch.cat(pieces)[None]  # (1, N, H)
        next_tokens = torch.tensor([tokens], dtype=torch.int64, device=self.device)
        out, logits = self.model.mtp_forward(self.modules[s - 1], inputs, next_tokens, ctx=ctx)
        return out, logits, cu

    def _draw(self, logits: torch.Tensor, items: list[_Work], depth: int, probs: list[list[torch.Tensor]]) -> None:
        """Draft depth ``depth``'s token of each item from its logits row ``(R, V)``; keep its distribution."""
        params = [w.params for w in items]
        q = target_distribution(logits, params)  # (R, V)
        positions = [len(w.seq.token_ids) - 1 + depth for w in items]  # the drafted token's position
        log_e = self._log_exponentials(params, positions, 1, logits.shape[-1], _DRAFT_SALT)[:, 0]  # (R, V)
        picks = gumbel_pick(q, log_e).tolist()  # the host sync of a depth: the next depth embeds the drafts
        for r, w in enumerate(items):
            w.track.drafts.append(int(picks[r]))
            probs[r].append(q[r])

    # ----- noise -----

    def _log_exponentials(
        self, params: Sequence[SamplingParams], first_positions: Sequence[int], rows: int, vocab: int, salt: int
    ) -> torch.Tensor:
        """``log E`` ``(B, rows, V)``, ``E ~ Exp(1)``: row ``r`` of sequence ``b`` at position ``first + r``;
        seeded requests from their seed's hash (salted), the others from the generator."""
        out = torch.empty(len(params), rows, vocab, device=self.device)
        seeded = [b for b, p in enumerate(params) if p.seed is not None]
        unseeded = [b for b, p in enumerate(params) if p.seed is None]
        if unseeded:
            draws = torch.empty(len(unseeded), rows, vocab, device=self.device).exponential_(generator=self.generator)
            draws = draws.clamp_min_(torch.finfo(torch.float32).tiny).log_()
            if not seeded:
                return draws
            out.index_copy_(0, upload(unseeded, torch.int64, self.device), draws)  # a list index would sync
        if seeded:
            seeds, pos = [], []
            for b in seeded:
                seed = params[b].seed
                assert seed is not None
                for r in range(rows):
                    seeds.append([(seed & _M32) ^ salt, (seed >> 32) & _M32])
                    pos.append(first_positions[b] + r)
            values = seeded_log_exponentials(
                upload(seeds, torch.int64, self.device), upload(pos, torch.int64, self.device), vocab
            )
            if not unseeded:
                return values.view(len(seeded), rows, vocab)
            out.index_copy_(0, upload(seeded, torch.int64, self.device), values.view(len(seeded), rows, vocab))
        return out

    def _uniforms(
        self, params: Sequence[SamplingParams], first_positions: Sequence[int], rows: int, salt: int
    ) -> torch.Tensor:
        """``U(0, 1)`` ``(B, rows)``: ``exp(-E)`` of one exponential per row (see ``_log_exponentials``)."""
        return torch.exp(-self._log_exponentials(params, first_positions, rows, 1, salt)[..., 0].exp())
