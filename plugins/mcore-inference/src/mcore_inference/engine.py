"""``LLMEngine``: requests in, one model call per step, tokens out.

Why it exists: it joins the pieces. ``add_request`` checks a request (a one-line ``UserError`` for a prompt that
does not fit the context or the cache, or bad sampling values: the engine and the other requests go on);
``step`` asks the scheduler for the step's sequences, tells the cache (``schedule``), calls the model once on the
step's new tokens packed in one row, samples the sequences that have no pending tokens left, appends the tokens,
names newly full blocks for the prefix cache and finishes the requests that stop (max tokens, end of document,
stop ids or strings, the context's end).

The model call (``mcore.protocols.block``): ``model(tokens (1, N), ctx=BlockContext(positions (1, N),
cu_seqlens (S + 1,), max_seqlen, kv_cache, attention, extra={LOGIT_ROWS: (S,)}))`` -> logits ``(1, S, V)``, one
row per sequence: its last new token.

Static decode and CUDA graphs (``static_decode.py``): with ``static_decode`` (or ``cuda_graphs``) a step whose every
sequence brings one token, and no more sequences than the largest of ``graph_batch_sizes``, runs with static
shapes padded up to the next size; with ``cuda_graphs`` each size is captured as a CUDA graph when the engine is
built and replayed. Prefill and mixed steps, and larger batches, run eagerly. Hybrid models (recurrent layers
beside one attention group) too: the recurrent layers gather and write their states by a device slot index.

Overlapped decode (``overlap_decode``, ``overlap.py``): a static decode step is left in flight; the next ``step``
launches the decode step after it (its inputs copied on the device from the sampled tokens) and only then reads
it, so the host's work of one step runs while the GPU computes the next. A step that would differ once the tokens
are known (a request might be admitted, blocks are short, penalties, a request short of ``min_tokens``) reads first
and schedules as usual. The sampler (logit bias, the ``min_tokens`` mask) runs outside any CUDA graph, on the logits
the static or eager call hands back, so every path samples alike.

Speculative decoding (``speculative_tokens=k``, ``speculative.py``): a model with MTP depths drafts up to ``k``
tokens per decoding sequence after each step; the next step's call brings them after the pending token (the
scheduler counts them like any token), returns the logits of all those rows and the main stack's hidden states,
accepts a prefix of the drafts (``rejection.py``), rolls the rest out of the cache and feeds the MTP depths.
The MTP depths' layers are kept out of the main cache (each draft depth has its own); ``spec_stats()`` counts
acceptance per draft position. With ``static_decode`` or ``cuda_graphs`` too, a step whose every sequence brings
``k + 1`` tokens verifies with static shapes and its draft depths run as static steps
(``static_speculative.py``; graphs captured per size); other steps (prefill, fewer drafts) run eagerly, and the
plain static decoder is not built (every speculative step needs the hidden states). A request's ``logit_bias``
shapes its drafts and its verification alike (``rejection.target_distribution``); a request short of ``min_tokens``
does not draft (``_draft_limit``), so its tokens come from the sampler's masked rows until then.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mcore.errors import UserError
from mcore.protocols.block import LOGIT_ROWS, BlockContext, DeclaresCache, LayerCacheSpec
from mcore_inference.attention import PagedAttention
from mcore_inference.cache import PagedKVCache, bytes_per_block
from mcore_inference.detokenize import IncrementalDetokenizer
from mcore_inference.grad import no_grad
from mcore_inference.kv_quant import resolve_kv_cache_dtype
from mcore_inference.overlap import InFlight, Readback, read_now
from mcore_inference.sampling import Sampler, SamplingParams, SamplingState, token_stop, upload
from mcore_inference.scheduler import Scheduler, SequenceState
from mcore_inference.speculative import SpecStats, Speculator, mtp_layers
from mcore_inference.static_decode import StaticDecoder, default_graph_sizes
from mcore_inference.static_speculative import StaticSpeculation

#: ``extra_key`` of a request's own, never shared, prefix-cache chain (prompt logprobs need every prompt row computed)
_OWN_PREFIX = "own-prefix"


@dataclass
class RequestOutput:
    """A request's state after a step: everything so far, and what this step added (``new_*``)."""

    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (None: eos, length, abort)
    logprobs: list[float] | None = None  # of each output token, when the request asked for logprobs
    top_logprobs: list[dict[int, float]] | None = None  # the top-n of each output token (n = params.logprobs)
    # with params.prompt_logprobs: the logprob of prompt token i + 1 given tokens 0..i, and the top-n there
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[dict[int, float]] | None = None


@dataclass(eq=False)
class _Request:
    request_id: int
    seq: SequenceState
    sampling: SamplingState
    detok: IncrementalDetokenizer | None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[dict[int, float]] | None = None
    new_ids: list[int] = field(default_factory=list)
    new_text: str = ""

    @property
    def params(self) -> SamplingParams:
        return self.sampling.params

    def output(self) -> RequestOutput:
        out = RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=list(self.sampling.prompt_token_ids),
            token_ids=list(self.sampling.output_token_ids),
            text=self.text,
            new_token_ids=self.new_ids,
            new_text=self.new_text,
            finished=self.finish_reason is not None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            top_logprobs=None if self.top_logprobs is None else list(self.top_logprobs),
            prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs),
            prompt_top_logprobs=None if self.prompt_top_logprobs is None else list(self.prompt_top_logprobs),
        )
        self.new_ids, self.new_text = [], ""
        return out


def model_cache_specs(model: nn.Module) -> dict[int, LayerCacheSpec]:
    """``model.cache_specs()``, else ``{index: spec}`` of the modules under ``model.layers[index]`` that declare a
    cache (``DeclaresCache``)."""
    method = getattr(model, "cache_specs", None)
    if callable(method):
        return dict(method())
    specs: dict[int, LayerCacheSpec] = {}
    for index, layer in enumerate(getattr(model, "layers", [])):
        declared = [m.cache_spec() for m in layer.modules() if isinstance(m, DeclaresCache)]
        if len(declared) > 1:
            raise UserError(f"layer {index}: {len(declared)} modules declare a cache spec; a layer may have one")
        if declared:
            specs[index] = declared[0]
    return specs


def _sharded_parameter(model: nn.Module) -> tuple[str, int] | None:
    """The first parameter of ``model`` that is a DTensor over more than one rank, and that rank count (None: none
    is): such a model runs collectives in its forward, so every rank must call it in lockstep."""
    from torch.distributed.tensor import DTensor

    for name, param in model.named_parameters():
        if isinstance(param, DTensor) and param.device_mesh.size() > 1:
            return name, param.device_mesh.size()
    return None


def _model_limit(model: nn.Module, name: str) -> int | None:
    value = getattr(getattr(model, "config", None), name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class LLMEngine:
    """Continuous-batching engine over ``model`` (an mcore model whose blocks use ``ctx.kv_cache``).

    The cache has ``num_blocks`` blocks of ``block_size`` tokens (or as many as ``memory_bytes`` holds);
    ``max_model_len`` (default: the model's ``max_position_embeddings``) bounds prompt plus output.
    ``kv_cache_dtype`` ``"fp8_e4m3"`` stores the main cache's keys/values in FP8 (``kv_quant.py``; ``"auto"``: the
    model's dtype); the draft caches of speculative decoding keep the model's dtype. A hybrid model (recurrent
    layers) keeps ``state_snapshots`` recurrent-state snapshots at block boundaries for prefix caching (``None``:
    ``max_num_seqs``; 0 turns prefix caching off for it); its prefill chunks are cut at block boundaries.
    A model whose parameters are sharded over several ranks (DTensors: e.g. the ``ep`` layout's experts) needs
    ``lockstep_group``: every rank builds the engine and steps it in lockstep (``lockstep.LockstepEngine``).
    ``overlap_decode`` (with ``static_decode`` or ``cuda_graphs``, without speculation) launches each decode step
    before reading the one before it (see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer: Any = None,
        block_size: int = 16,
        num_blocks: int | None = None,
        memory_bytes: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        eos_token_id: int | None = None,
        seed: int | None = None,
        attention: Any = None,
        cuda_graphs: bool = False,
        graph_batch_sizes: Sequence[int] | None = None,
        static_decode: bool | None = None,
        speculative_tokens: int = 0,
        kv_cache_dtype: str = "auto",
        state_snapshots: int | None = None,
        lockstep_group: Any = None,
        overlap_decode: bool = False,
    ) -> None:
        sharded = _sharded_parameter(model)
        if sharded is not None and lockstep_group is None:
            name, ranks = sharded
            raise UserError(
                f"LLMEngine: the model's parameter {name!r} is sharded over {ranks} ranks (a parallel layout, e.g. "
                "ep); every rank must run the same steps: give lockstep_group (a gloo group of those ranks) and "
                "drive the engine through mcore_inference.lockstep.LockstepEngine"
            )
        self.lockstep_group = lockstep_group
        fp8_kv = resolve_kv_cache_dtype(kv_cache_dtype) is not None
        if fp8_kv and attention is not None and not isinstance(attention, PagedAttention):
            raise UserError(
                f"LLMEngine kv_cache_dtype = {kv_cache_dtype!r} needs the engine's PagedAttention (it dequantises the "
                f"pages); got attention {type(attention).__name__}"
            )
        for key, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"LLMEngine {key} = {value!r}: must be a positive int")
        if isinstance(speculative_tokens, bool) or not isinstance(speculative_tokens, int) or speculative_tokens < 0:
            raise UserError(f"LLMEngine speculative_tokens = {speculative_tokens!r}: must be an int >= 0 (0: off)")
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(iter(model.parameters())).device
        all_specs = model_cache_specs(model)
        drafting = set(mtp_layers(model))  # the MTP depths' layers: draft caches of their own, never the main cache
        specs = {i: spec for i, spec in all_specs.items() if i not in drafting}
        if speculative_tokens and memory_bytes is not None:  # the draft caches get as many blocks: split the bytes
            main = bytes_per_block(specs, block_size, kv_cache_dtype)
            memory_bytes = (
                memory_bytes
                * main
                // (main + Speculator.bytes_per_block(model, all_specs, speculative_tokens, block_size))
            )
        pack = getattr(model, "pack_for_inference", None)
        if callable(pack):
            pack()  # jointly projected weights back to back: decode reads them once, without a concatenated copy
        if num_blocks is None and memory_bytes is None:
            raise UserError("LLMEngine: give num_blocks or memory_bytes (the KV cache's size)")
        self.cache = PagedKVCache(
            specs,
            block_size=block_size,
            num_blocks=num_blocks,
            memory_bytes=memory_bytes,
            max_seqs=max_num_seqs,
            device=self.device,
            enable_prefix_caching=enable_prefix_caching,
            scratch_block=bool(cuda_graphs or static_decode),
            kv_cache_dtype=kv_cache_dtype,
            state_snapshots=state_snapshots,
        )
        self.max_model_len = (
            max_model_len if max_model_len is not None else _model_limit(model, "max_position_embeddings")
        )
        if self.max_model_len is not None and (isinstance(self.max_model_len, bool) or self.max_model_len < 2):
            raise UserError(f"LLMEngine max_model_len = {self.max_model_len!r}: must be an int >= 2")
        self.vocab_size = _model_limit(model, "vocab_size")
        self.eos_token_id = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_id", None)
        self.scheduler = Scheduler(
            self.cache,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            align_prefill=self.cache.snapshots is not None and not speculative_tokens,  # steps end on boundaries
        )
        self.sampler = Sampler(seed=seed, eos_token_id=self.eos_token_id)
        self.attention = attention if attention is not None else PagedAttention()
        self.speculator: Speculator | None = None
        if speculative_tokens:
            self.speculator = Speculator(
                model,
                speculative_tokens,
                specs=all_specs,
                block_size=block_size,
                num_blocks=self.cache.num_blocks,
                max_seqs=max_num_seqs,
                device=self.device,
                attention=self.attention,
                seed=seed,
                scratch_block=bool(cuda_graphs or static_decode),
            )
        self.decoder: StaticDecoder | None = None
        if cuda_graphs or static_decode:
            if self.max_model_len is None:
                raise UserError("static decode / cuda_graphs need max_model_len (the model declares none): give it")
            sizes = graph_batch_sizes if graph_batch_sizes is not None else default_graph_sizes(max_num_seqs)
        if self.speculator is not None and (cuda_graphs or static_decode):  # static verification and drafts
            assert self.max_model_len is not None
            self.speculator.static = StaticSpeculation(
                model,
                self.cache,
                self.speculator.caches,
                self.speculator.modules,
                self.attention,
                k=speculative_tokens,
                batch_sizes=sizes,
                max_model_len=self.max_model_len,
                cuda_graphs=bool(cuda_graphs),
            )
            self.speculator.static.capture()
        elif cuda_graphs or static_decode:
            assert self.max_model_len is not None
            self.decoder = StaticDecoder(
                model,
                self.cache,
                self.attention,
                batch_sizes=sizes,
                max_model_len=self.max_model_len,
                cuda_graphs=bool(cuda_graphs),
            )
            self.decoder.capture()
        if overlap_decode and (self.decoder is None or self.speculator is not None):
            raise UserError(
                "LLMEngine overlap_decode=True needs static decode steps (static_decode or cuda_graphs) and no "
                "speculative_tokens"
            )
        self.overlap_decode = bool(overlap_decode)
        self._in_flight: InFlight | None = None  # a decode step launched and not yet read (overlap_decode)
        self.num_overlapped_steps = 0  # decode steps launched before the step before them was read
        self._requests: dict[int, _Request] = {}
        self._scored: set[int] = set()  # live requests with prompt_logprobs (steps without any skip the scan)
        self._ids = itertools.count()
        self.num_steps = 0  # model calls so far
        self.num_computed_tokens = 0  # tokens those calls computed (a prefix-cache hit computes fewer)

    # ----- requests -----

    def add_request(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, *, extra_key: Hashable = None
    ) -> int:
        """Queue a request (text needs the engine's tokenizer); returns its id. ``extra_key`` (a LoRA or image id)
        joins the prefix cache's block hashes: requests share cached blocks only with the same key. A bad request
        raises a one-line ``UserError`` and changes nothing."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise UserError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        ids = self._encode(prompt)
        vocab = self.vocab_size
        if vocab is not None and params.bias_pairs and params.bias_pairs[-1][0] >= vocab:
            token = params.bias_pairs[-1][0]  # the largest id
            raise UserError(f"SamplingParams.logit_bias key {token}: outside the vocabulary [0, {vocab})")
        bs, total = self.cache.block_size, len(ids) + params.max_tokens
        if self.max_model_len is not None:
            if len(ids) >= self.max_model_len:
                raise UserError(
                    f"prompt of {len(ids)} tokens: the context holds {self.max_model_len} (max_model_len) with room "
                    "for at least one generated token; shorten the prompt"
                )
            total = min(total, self.max_model_len)
        if -(-total // bs) > self.cache.num_blocks:
            raise UserError(
                f"a sequence of {total} tokens (prompt {len(ids)} + max_tokens {params.max_tokens}) needs "
                f"{-(-total // bs)} blocks of {bs}; the cache has {self.cache.num_blocks}: lower max_tokens or "
                "give the cache more blocks"
            )
        request_id = next(self._ids)
        if params.prompt_logprobs is not None:  # every prompt position must be computed: no prefix-cache hits
            extra_key = (_OWN_PREFIX, request_id)
        detok = None if self.tokenizer is None else IncrementalDetokenizer(self.tokenizer, ids, params)
        seq = SequenceState(request_id, list(ids), extra_key=extra_key)
        request = _Request(request_id, seq, SamplingState(params, list(ids)), detok)
        if params.logprobs is not None:
            request.logprobs, request.top_logprobs = [], []
        if params.prompt_logprobs is not None:
            request.prompt_logprobs, request.prompt_top_logprobs = [], []
            self._scored.add(request_id)
        self._requests[request_id] = request
        self.scheduler.add(request.seq)
        return request_id

    def abort(self, request_id: int) -> RequestOutput | None:
        """Stop a request (its blocks go back); its output so far, finish reason ``"abort"`` (None: unknown)."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        self._scored.discard(request_id)
        self.scheduler.finish(request.seq)
        if self.speculator is not None:
            self.speculator.forget(request_id)
        if request.detok is not None:
            request.new_text += request.detok.flush()
            request.text = request.detok.text
        request.finish_reason = "abort"
        return request.output()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def spec_stats(self) -> SpecStats | None:
        """Speculative decoding's acceptance counters per draft position (None: speculation is off)."""
        return None if self.speculator is None else self.speculator.stats

    # ----- one step -----

    @no_grad
    def step(self) -> list[RequestOutput]:
        """Run one model call; the outputs of the requests that got a token or finished in it. With
        ``overlap_decode`` a decode step's tokens are read in the next call, after the step that follows it has been
        launched (``overlap.py``): a call may return the outputs of the step before it, or none."""
        flight = self._in_flight
        if flight is not None:
            self._in_flight = None
            launched = self._launch_after(flight)  # the next decode step, on the device before this one is read
            outputs = self._read(flight)
            if launched is not None:
                self._in_flight = launched
                return outputs
            return outputs + self._step()  # a drain: plain scheduling from the host's now complete state
        return self._step()

    def _step(self) -> list[RequestOutput]:
        spec = self.speculator
        if spec is not None:
            spec.attach(self.scheduler.running)  # drafts join the pending tokens: the scheduler counts them
        plan = self.scheduler.schedule()
        if spec is not None:
            spec.after_schedule(plan)
        if not plan.sequences:
            return []
        seqs, counts = plan.sequences, plan.num_tokens
        prompt_rows, prompt_jobs = self._prompt_rows(seqs, counts)  # rows whose logits score prompt tokens
        static = spec is not None and not prompt_rows and self._static_verification(seqs, counts)
        if spec is not None and not static:
            spec.resolve(seqs)  # drafts a static pass left on the device: the eager call reads them from the host
        self.num_steps += 1
        self.num_computed_tokens += plan.total_tokens
        self.cache.schedule([s.seq_id for s in seqs], counts)
        starts = [seq.num_computed for seq in seqs]
        one_each = plan.total_tokens == len(seqs)  # every sequence brings one token (a decode step, mostly)
        if one_each:  # one token each: no slicing
            tokens = [seq.token_ids[start] for seq, start in zip(seqs, starts)]
            positions = starts
        else:
            tokens, positions = [], []
            for seq, count, start in zip(seqs, counts, starts):
                tokens += seq.token_ids[start : start + count]
                positions += range(start, start + count)
        decoder = self.decoder
        hidden = None
        decoded = False  # a static decode step: it may be left in flight
        if static:  # every sequence verifies k drafts: the static (CUDA-graph) call, same rows and hidden states
            assert spec is not None and spec.static is not None
            q = spec.k + 1
            pending = [tokens[i * q] for i in range(len(seqs))]  # the drafts come from the device
            logits, hidden = spec.static.verify([[t] for t in pending], spec.draft_tokens(seqs))
        elif spec is not None:  # each sequence's last row, then the rows that verify drafts; the hidden states
            cu = list(itertools.accumulate(counts, initial=0))
            extra = [*spec.extra_rows(seqs, cu), *prompt_rows]
            logits, hidden = self._forward_with_hidden(tokens, positions, counts, extra)
        elif not prompt_rows and decoder is not None and one_each and decoder.padded(len(seqs)) is not None:
            logits = decoder.run(tokens)[None]  # (1, S, V)
            decoded = True
        else:
            logits = self._forward(tokens, positions, counts, prompt_rows)
        if prompt_rows:  # the last rows: score the prompt tokens, then drop them
            self._record_prompt_logprobs(logits[0, logits.shape[1] - len(prompt_rows) :], prompt_jobs)
            logits = logits[:, : logits.shape[1] - len(prompt_rows)]
        for seq, count in zip(seqs, counts):
            seq.num_computed += count
        ready = [i for i, seq in enumerate(seqs) if seq.num_computed == len(seq.token_ids)]  # others: mid-prefill
        if spec is not None and spec.verifying:  # drafting sequences: accept, roll back, append what is emitted
            params = [self._requests[s.seq_id].params for s in seqs]
            emitted = spec.verify(logits, seqs, params, self.cache)
            for seq_id, emit in emitted.items():
                request = self._requests[seq_id]
                for token in emit:
                    self._append(request, token)
                    if request.finish_reason is not None:
                        break
            ready = [i for i in ready if seqs[i].seq_id not in emitted]
            logits = logits[:, : len(seqs)]
        if ready:
            requests = [self._requests[seqs[i].seq_id] for i in ready]
            rows = logits[0] if len(ready) == len(seqs) else logits[0, ready]  # (R, V); all ready: no gather
            want_logprobs = any(r.logprobs is not None for r in requests)
            sample = self.sampler.sample(rows, [r.sampling for r in requests], logprobs=want_logprobs)
            if decoded and self.overlap_decode and self._overlappable(requests):
                assert len(requests) == len(seqs)  # a decode step: every row is ready
                self._in_flight = InFlight(seqs, requests, sample.token_ids, Readback(sample))
                return []  # read in the next call, after the step that follows this one is launched
            self._record(requests, read_now(sample))  # the step's one host sync
        outputs = self._close(seqs)
        if spec is not None and hidden is not None:  # the MTP depths read this step's hidden states and draft
            alive = [i for i, seq in enumerate(seqs) if seq.seq_id in self._requests]
            first_rows = list(itertools.accumulate(counts, initial=0))
            spec.draft(
                hidden,
                [seqs[i] for i in alive],
                [self._requests[seqs[i].seq_id].params for i in alive],
                [first_rows[i] for i in alive],
                [starts[i] for i in alive],
                [self._draft_limit(self._requests[seqs[i].seq_id]) for i in alive],
                static=static,
            )
        return outputs

    def _record(self, requests: Sequence[_Request], read: list[Any]) -> None:
        """Append each request's chosen token (and logprobs) from ``read_now`` / ``Readback.lists()``."""
        chosen, logprob, top_ids, top_values = read
        for row, (request, token) in enumerate(zip(requests, chosen)):
            if request.logprobs is not None and request.top_logprobs is not None and logprob is not None:
                request.logprobs.append(logprob[row])
                n = request.params.logprobs or 0
                picks = zip(top_ids[row][:n], top_values[row][:n]) if top_ids and top_values else ()
                request.top_logprobs.append(dict(picks))
            self._append(request, token)

    def _close(self, seqs: Sequence[SequenceState]) -> list[RequestOutput]:
        """After a step's tokens are appended: name its sequences' full blocks for the prefix cache, finish the
        requests that stopped, and return the outputs of those that got a token or finished."""
        outputs: list[RequestOutput] = []
        cache_prefix, live, spec = self.cache.cache_prefix, self._requests, self.speculator
        for seq in seqs:
            current = live[seq.seq_id]
            cache_prefix(seq.seq_id, seq.token_ids, seq.extra_key)  # later requests find these blocks
            if current.finish_reason is not None:
                self.scheduler.finish(seq)
                del live[seq.seq_id]
                self._scored.discard(seq.seq_id)
                if spec is not None:
                    spec.forget(seq.seq_id)
            if current.new_ids or current.finish_reason is not None:
                outputs.append(current.output())
        return outputs

    # ----- overlapped decode (overlap.py) -----

    def _overlappable(self, requests: Sequence[_Request]) -> bool:
        """Whether a decode step of ``requests`` may be followed before it is read: no penalties (their counts are
        of the host's tokens), and no request still short of ``min_tokens`` (the sampler decides the mask from the
        host's output count, which lacks the token in flight): such rows read first."""
        return not any(r.params.penalised or len(r.sampling.output_token_ids) < r.params.min_tokens for r in requests)

    def _continues(self, request: _Request) -> bool:
        """Whether ``request``, live, goes on after the token in flight whatever that token is (it does not reach
        ``max_tokens`` or the context's end with it)."""
        if self._requests.get(request.request_id) is not request:
            return False  # aborted since
        if len(request.sampling.output_token_ids) + 1 >= request.params.max_tokens:
            return False
        return self.max_model_len is None or len(request.seq.token_ids) + 1 < self.max_model_len

    def _launch_after(self, flight: InFlight) -> InFlight | None:
        """Launch the decode step after ``flight`` before reading it: its sequences that go on, one token each (the
        tokens in flight, copied on the device). None (nothing launched): the step would differ from what plain
        scheduling picks once ``flight`` is read, or cannot run statically."""
        decoder, scheduler = self.decoder, self.scheduler
        assert decoder is not None
        if scheduler.waiting and len(scheduler.running) < scheduler.max_num_seqs:
            return None  # a waiting request might be admitted: schedule from the complete state
        keep = [i for i, request in enumerate(flight.requests) if self._continues(request)]
        if not keep or decoder.padded(len(keep)) is None:
            return None
        seqs = [flight.seqs[i] for i in keep]
        requests = [flight.requests[i] for i in keep]
        cache = self.cache
        if sum(cache.blocks_needed(s.seq_id, 1) for s in seqs) > cache.num_free_blocks():
            return None  # blocks are short: the scheduler preempts from the complete state
        self.num_steps += 1
        self.num_computed_tokens += len(seqs)
        self.num_overlapped_steps += 1
        cache.schedule([s.seq_id for s in seqs], [1] * len(seqs))
        tokens = flight.token_ids
        if len(keep) < len(flight.seqs):
            tokens = tokens.index_select(0, upload(keep, torch.int64, tokens.device))
        logits = decoder.run(tokens)  # (S, V)
        for seq in seqs:
            seq.num_computed += 1  # the token in flight is in the cache now; it joins token_ids when read
        states = [r.sampling for r in requests]
        positions = None
        if not all(r.params.greedy for r in requests):  # the sampled token's index: one past the unread one
            positions = upload([s.num_tokens + 1 for s in states], torch.int64, logits.device)
        want_logprobs = any(r.logprobs is not None for r in requests)
        sample = self.sampler.sample(logits, states, positions, logprobs=want_logprobs)
        return InFlight(seqs, requests, sample.token_ids, Readback(sample))

    def _read(self, flight: InFlight) -> list[RequestOutput]:
        """Read a launched step's tokens and append them to the requests still live (an aborted request's row, or
        one of a request that ended on the token before, is dropped)."""
        live = [i for i, r in enumerate(flight.requests) if self._requests.get(r.request_id) is r]
        if not live:
            return []
        read = flight.readback.lists()
        if len(live) < len(flight.requests):
            read = [None if part is None else [part[i] for i in live] for part in read]
        self._record([flight.requests[i] for i in live], read)
        return self._close([flight.seqs[i] for i in live])

    def _static_verification(self, seqs: Sequence[SequenceState], counts: Sequence[int]) -> bool:
        """Whether the step runs as a static verification: static speculation is on, every sequence brings its
        pending token and ``k`` drafts, and a padded size holds them (others, e.g. prefill or fewer drafts near
        ``max_tokens``, run eagerly)."""
        spec = self.speculator
        if spec is None or spec.static is None or spec.static.padded(len(seqs)) is None:
            return False
        k = spec.k
        return all(c == k + 1 and spec.verifying.get(s.seq_id) == k for s, c in zip(seqs, counts))

    def _draft_limit(self, request: _Request) -> int:
        """Most drafts worth verifying for ``request`` next step: all accepted plus the next token must fit its
        ``max_tokens`` and the context. None before ``min_tokens`` output tokens: verification does not mask stop
        tokens, so such a request decodes one token per step through the sampler (which does) until then."""
        if len(request.sampling.output_token_ids) < request.params.min_tokens:
            return 0
        limit = request.params.max_tokens - len(request.sampling.output_token_ids) - 1
        if self.max_model_len is not None:
            limit = min(limit, self.max_model_len - len(request.seq.token_ids) - 1)
        return max(0, limit)

    def _context(self, positions: list[int], counts: list[int], rows: torch.Tensor) -> BlockContext:
        """A step's model-call context: the new tokens packed in one row, logits wanted at packed ``rows``."""
        cu = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32)
        return BlockContext(
            positions=torch.tensor([positions], dtype=torch.int64, device=self.device),
            cu_seqlens=cu.to(self.device),
            max_seqlen=max(counts),
            kv_cache=self.cache,
            attention=self.attention,
            extra={LOGIT_ROWS: rows.to(self.device)},
        )

    def _forward(
        self, tokens: list[int], positions: list[int], counts: list[int], extra_rows: Sequence[int] = ()
    ) -> torch.Tensor:
        """The eager model call of a step: logits ``(1, S + X, V)``, one row per sequence (its last new token),
        then the packed ``extra_rows``."""
        rows = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int64) - 1
        rows = torch.cat([rows, torch.tensor(list(extra_rows), dtype=torch.int64)])
        ctx = self._context(positions, counts, rows)
        logits = self.model(torch.tensor([tokens], dtype=torch.int64, device=self.device), ctx=ctx)
        if logits.shape[1] != len(rows):  # a model that ignores LOGIT_ROWS: (1, N, V)
            logits = logits[:, rows.to(logits.device)]
        return logits

    def _prompt_rows(self, seqs: Sequence[SequenceState], counts: Sequence[int]) -> tuple[list[int], list[Any]]:
        """The packed rows of this step whose logits score a prompt token not yet scored (requests with
        ``prompt_logprobs``; after a preemption the recomputed positions are scored once), and per row
        ``(request, next prompt token)``."""
        rows: list[int] = []
        jobs: list[Any] = []
        if not self._scored:  # no live request asks for prompt logprobs
            return rows, jobs
        first = 0
        for seq, count in zip(seqs, counts):
            request = self._requests[seq.seq_id]
            if request.prompt_logprobs is not None:
                prompt = request.sampling.prompt_token_ids
                done = len(request.prompt_logprobs)  # positions 0 .. done - 1 are scored
                for position in range(max(seq.num_computed, done), min(seq.num_computed + count, len(prompt) - 1)):
                    rows.append(first + position - seq.num_computed)
                    jobs.append((request, prompt[position + 1]))
            first += count
        return rows, jobs

    def _record_prompt_logprobs(self, logits: torch.Tensor, jobs: list[Any]) -> None:
        """``logits (X, V)`` of ``_prompt_rows``: each prompt token's logprob and the top-n (one host sync)."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (X, V)
        targets = torch.tensor([token for _, token in jobs], dtype=torch.int64, device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        most = max(request.params.prompt_logprobs or 0 for request, _ in jobs)
        top_values, top_ids = logprobs.topk(most, dim=-1) if most else (logprobs[:, :0], logprobs[:, :0])
        values, ids = top_values.tolist(), top_ids.tolist()
        for row, (request, _) in enumerate(jobs):
            n = request.params.prompt_logprobs or 0
            request.prompt_logprobs.append(chosen[row])
            request.prompt_top_logprobs.append(dict(zip(ids[row][:n], values[row][:n])))

    def _forward_with_hidden(
        self, tokens: list[int], positions: list[int], counts: list[int], extra_rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A speculative step's model call: logits ``(1, S + X, V)`` (each sequence's last new token, then the
        packed ``extra_rows``) and the main stack's hidden states ``(1, N, H)`` (``MTPModel.forward_with_hidden``)."""
        rows = torch.tensor([*itertools.accumulate(counts)], dtype=torch.int64) - 1
        rows = torch.cat([rows, torch.tensor(extra_rows, dtype=torch.int64)])
        model: Any = self.model  # an MTPModel (checked when the speculator was built)
        tensor = torch.tensor([tokens], dtype=torch.int64, device=self.device)
        logits, hidden = model.forward_with_hidden(tensor, ctx=self._context(positions, counts, rows))
        return logits, hidden

    def _append(self, request: _Request, token: int) -> None:
        request.seq.token_ids.append(token)
        request.sampling.output_token_ids.append(token)
        request.new_ids.append(token)
        if request.detok is not None:
            request.new_text += request.detok.push(token)
            request.text = request.detok.text
            reason = request.detok.finish_reason if request.detok.finished else None
            request.stop_reason = request.detok.stop_reason if request.detok.finished else None
        else:
            stop = token_stop(request.params, token, len(request.sampling.output_token_ids), self.eos_token_id)
            reason = None if stop is None else stop[0]
            named = reason == "stop" and token in request.params.stop_token_ids
            request.stop_reason = token if named else None
        if reason is None and self.max_model_len is not None and len(request.seq.token_ids) >= self.max_model_len:
            reason = "length"
            if request.detok is not None:
                request.new_text += request.detok.flush()
                request.text = request.detok.text
        request.finish_reason = reason

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError("a text prompt needs a tokenizer; give token ids or an engine with a tokenizer")
            ids = [int(i) for i in self.tokenizer.encode(prompt)]
        elif isinstance(prompt, Iterable):
            ids = list(prompt)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise UserError("a prompt must be a string or a list of int token ids")
        else:
            raise UserError(f"a prompt must be a string or a list of int token ids, got {type(prompt).__name__}")
        if not ids:
            raise UserError("the prompt is empty: give at least one token")
        vocab = self.vocab_size
        bad = [i for i in ids if i < 0 or (vocab is not None and i >= vocab)]
        if bad:
            raise UserError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab}); check the tokenizer")
        return ids
