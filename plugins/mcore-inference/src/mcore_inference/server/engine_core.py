"""``EngineCore``: the server's view of an ``LLMEngine`` in plain data, wherever the engine runs.

Why it exists: the engine runs either in a thread of the HTTP process (``engine_loop.EngineLoop``) or in a process
of its own (``engine_process.EngineProcess``). Both drive this one class, so admission (``max_waiting``), metrics,
stop reasons and abort bookkeeping are written once. It speaks in the caller's request ids (chosen by the HTTP
side, so an abort never waits for a reply) and in ``OutputDelta``s (what one step added to one request: plain
fields, JSON-able); the HTTP side folds deltas into a ``ServedOutput`` (``Accumulator``), which is what the routes
read. Not thread-safe: one thread calls it.

``stop_reason`` (as vLLM reports it) comes from the engine's ``RequestOutput``: the stop string that matched, or
the stop token id; None for the end-of-document token, the length limit and aborts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mcore.errors import UserError
from mcore_inference.engine import LLMEngine, RequestOutput
from mcore_inference.lockstep import LockstepEngine
from mcore_inference.sampling import SamplingParams
from mcore_inference.server.metrics import EngineMetrics


def check_max_waiting(value: int | None, where: str) -> None:
    """A one-line ``UserError`` unless ``value`` is None or a positive int."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UserError(f"{where} max_waiting = {value!r}: must be a positive int (or None: no limit)")


class QueueFull(Exception):
    """A request refused because ``max_waiting`` requests already wait (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The engine is not running (stopped, shutting down or dead): HTTP 503."""


class EngineFailed(RuntimeError):
    """A step of the engine raised (in its process: the message names the exception): HTTP 500."""


@dataclass
class OutputDelta:
    """What one step added to one request (``request_id``: the caller's id)."""

    request_id: int
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float] | None = None  # once, in the first delta of a request that asked for them
    prompt_top_logprobs: list[dict[int, float]] | None = None

    def to_wire(self) -> list[Any]:
        """JSON-able (top-logprob dicts as ``[[id, value], ...]``: JSON keys are strings)."""
        if self.new_top_logprobs is None and self.prompt_top_logprobs is None:
            return [self.request_id, self.new_token_ids, self.new_text, self.finished, self.finish_reason,
                    self.stop_reason, self.new_logprobs, None, self.prompt_logprobs, None]  # fmt: skip
        top, prompt_top = (None if t is None else [list(d.items()) for d in t]
                           for t in (self.new_top_logprobs, self.prompt_top_logprobs))  # fmt: skip
        return [self.request_id, self.new_token_ids, self.new_text, self.finished, self.finish_reason,
                self.stop_reason, self.new_logprobs, top, self.prompt_logprobs, prompt_top]  # fmt: skip

    @classmethod
    def from_wire(cls, item: list[Any]) -> OutputDelta:
        """From ``to_wire``'s list as JSON decoded it (ids and counts are ints already: nothing is converted per
        token; the top-logprob pairs become dicts again)."""
        rid, ids, text, finished, reason, stop, logprobs, top, prompt_logprobs, prompt_top = item
        if top is None and prompt_top is None:
            return cls(rid, ids, text, finished, reason, stop, logprobs, None, prompt_logprobs, None)
        tops, prompt_tops = (None if t is None else [{int(k): float(v) for k, v in entry} for entry in t]
                             for t in (top, prompt_top))  # fmt: skip
        return cls(rid, ids, text, finished, reason, stop, logprobs, tops, prompt_logprobs, prompt_tops)


@dataclass
class ServedOutput:
    """A request's output so far and what the last delta added (the fields the routes read)."""

    request_id: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[dict[int, float]] | None = None


class Accumulator:
    """Folds one request's deltas into ``ServedOutput``s: a fresh object per delta, whose ``token_ids``,
    ``logprobs`` and ``top_logprobs`` are the accumulator's own lists, not copies (copying every step would cost
    O(length) per token); they grow with later deltas, so a consumer that keeps an output copies them."""

    def __init__(self, request_id: int) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list[float] | None = None
        self.top_logprobs: list[dict[int, float]] | None = None
        self.prompt_logprobs: list[float] | None = None
        self.prompt_top_logprobs: list[dict[int, float]] | None = None

    def apply(self, delta: OutputDelta) -> ServedOutput:
        self.token_ids += delta.new_token_ids
        self.text += delta.new_text
        if delta.new_logprobs is not None:
            if self.logprobs is None or self.top_logprobs is None:
                self.logprobs, self.top_logprobs = [], []
            self.logprobs += delta.new_logprobs
            self.top_logprobs += delta.new_top_logprobs or []
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_top_logprobs = delta.prompt_logprobs, delta.prompt_top_logprobs
        return ServedOutput(
            request_id=self.request_id,
            token_ids=self.token_ids,
            text=self.text,
            new_token_ids=delta.new_token_ids,
            new_text=delta.new_text,
            finished=delta.finished,
            finish_reason=delta.finish_reason,
            stop_reason=delta.stop_reason,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
            new_logprobs=delta.new_logprobs,
            new_top_logprobs=delta.new_top_logprobs,
            prompt_logprobs=self.prompt_logprobs,
            prompt_top_logprobs=self.prompt_top_logprobs,
        )


@dataclass(eq=False)
class _Live:
    """A request in the engine: the caller's id, the engine's id, its params and timing."""

    request_id: int
    engine_id: int
    params: SamplingParams
    arrival: float
    last_token: float | None = None
    logprobs_sent: int = 0
    prompt_sent: bool = False


class EngineCore:
    """Admit, step and abort over ``engine`` in the caller's ids; see the module docstring.

    ``max_waiting``: a group arriving while that many requests wait for a slot is refused (``QueueFull``); None:
    no limit.
    """

    def __init__(self, engine: LLMEngine | LockstepEngine, *, max_waiting: int | None = None) -> None:
        check_max_waiting(max_waiting, "EngineCore")
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = EngineMetrics()
        self._live: dict[int, _Live] = {}  # by the caller's id
        self._by_engine_id: dict[int, _Live] = {}

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def add(
        self, request_ids: Sequence[int], requests: Sequence[tuple[Sequence[int], SamplingParams]], arrival: float
    ) -> None:
        """Add a group, all or nothing: ``QueueFull``, or the engine's ``UserError`` for a bad request (the ones
        added before it are taken back)."""
        assert len(request_ids) == len(requests)
        waiting = len(self.engine.scheduler.waiting)
        # the group counts: it may start only if it fits under the limit, or if nothing waits (a group larger than
        # the limit on an idle server would otherwise never run; the server bounds a group's size)
        if self.max_waiting is not None and waiting and waiting + len(requests) > self.max_waiting:
            self.metrics.rejected["queue_full"] += 1
            raise QueueFull(
                f"the server is busy: {waiting} requests wait for a slot and this one brings {len(requests)} "
                f"(limit {self.max_waiting}); retry later"
            )
        added: list[_Live] = []
        try:
            for request_id, (prompt, params) in zip(request_ids, requests):
                assert request_id not in self._live, f"request id {request_id} is in use"
                live = _Live(request_id, self.engine.add_request(prompt, params), params, arrival)
                added.append(live)
        except Exception:
            for live in added:
                self.engine.abort(live.engine_id)
            raise
        now = time.monotonic()
        for live, (prompt, _) in zip(added, requests):
            self._live[live.request_id] = live
            self._by_engine_id[live.engine_id] = live
            self.metrics.on_add(len(prompt), now)

    def abort(self, request_ids: Sequence[int]) -> list[OutputDelta]:
        """Abort requests (their blocks go back at once); unknown or finished ids are ignored."""
        deltas = []
        for request_id in request_ids:
            live = self._live.get(request_id)
            if live is None:
                continue
            out = self.engine.abort(live.engine_id)
            if out is not None:
                deltas.append(self._delta(live, out, time.monotonic()))
            else:
                self._forget(live)
        self._generated(deltas, time.monotonic())
        return deltas

    def abort_all(self) -> list[int]:
        """Abort every request; their ids."""
        ids = list(self._live)
        self.abort(ids)
        return ids

    def fail_all(self) -> list[int]:
        """After a failed step: abort every request, counting them as errors; their ids."""
        now = time.monotonic()
        ids = list(self._live)
        for live in list(self._live.values()):
            self.engine.abort(live.engine_id)
            self.metrics.on_finish("error", now, live.arrival)
            self._forget(live)
        return ids

    def step(self) -> list[OutputDelta]:
        """One engine step's deltas (an exception from the model propagates: call ``fail_all``)."""
        outs = self.engine.step()
        now, by_engine_id = time.monotonic(), self._by_engine_id  # one clock read a step: its tokens came together
        deltas = [self._delta(live, out, now) for out in outs if (live := by_engine_id.get(out.request_id)) is not None]
        self._generated(deltas, now)
        return deltas

    def _generated(self, deltas: list[OutputDelta], now: float) -> None:
        count = sum(len(d.new_token_ids) for d in deltas)
        if count:
            self.metrics.on_generated(count, now)

    def _delta(self, live: _Live, out: RequestOutput, now: float) -> OutputDelta:
        if out.new_token_ids:
            self.metrics.on_tokens(len(out.new_token_ids), now, live.arrival, live.last_token)
            live.last_token = now
        new_logprobs = new_top = None
        if out.logprobs is not None:
            new_logprobs = out.logprobs[live.logprobs_sent :]
            new_top = (out.top_logprobs or [])[live.logprobs_sent :]
            live.logprobs_sent = len(out.logprobs)
        prompt_logprobs = prompt_top = None
        if out.prompt_logprobs is not None and not live.prompt_sent and (out.new_token_ids or out.finished):
            prompt_logprobs, prompt_top, live.prompt_sent = out.prompt_logprobs, out.prompt_top_logprobs, True
        stop_reason = None
        if out.finished:
            self.metrics.on_finish(out.finish_reason, now, live.arrival)
            stop_reason = out.stop_reason
            self._forget(live)
        return OutputDelta(
            request_id=live.request_id,
            new_token_ids=out.new_token_ids,  # the engine's fresh list each step: no copy
            new_text=out.new_text,
            finished=out.finished,
            finish_reason=out.finish_reason,
            stop_reason=stop_reason,
            new_logprobs=new_logprobs,
            new_top_logprobs=new_top,
            prompt_logprobs=prompt_logprobs,
            prompt_top_logprobs=prompt_top,
        )

    def _forget(self, live: _Live) -> None:
        self._live.pop(live.request_id, None)
        self._by_engine_id.pop(live.engine_id, None)

    def stats(self) -> dict[str, Any]:
        """Plain data: load, cache, counters and the metrics' snapshot (``metrics.render`` reads it)."""
        engine, cache = self.engine, self.engine.cache
        block_size = cache.block_size
        hits, misses = cache.prefix_hits, cache.prefix_misses
        return {
            "running": len(engine.scheduler.running),
            "waiting": len(engine.scheduler.waiting),
            "blocks_total": cache.num_blocks,
            "blocks_used": cache.num_blocks - cache.num_free_blocks(),
            "all_free": cache.all_free(),
            "has_unfinished": engine.has_unfinished(),
            "live_requests": len(self._live),
            "num_steps": engine.num_steps,
            "preemptions": engine.scheduler.num_preemptions,
            "prefix_cache_queried_tokens": (hits + misses) * block_size,
            "prefix_cache_hit_tokens": hits * block_size,
            "metrics": self.metrics.snapshot(time.monotonic()),
            "spec": _spec_stats(engine),
            "kv_fp8_clipped": _fp8_clipped(cache),
        }


def _fp8_clipped(cache: Any) -> dict[str, int] | None:
    """An FP8 cache's saturated keys/values per layer (``PagedKVCache.fp8_clipped``), None for other caches."""
    method = getattr(cache, "fp8_clipped", None)
    counts = method() if callable(method) else None
    return None if counts is None else {str(layer): int(n) for layer, n in counts.items()}


def _spec_stats(engine: LLMEngine | LockstepEngine) -> dict[str, Any] | None:
    """Speculative decoding's counters per draft position (``LLMEngine.spec_stats()``), None when it is off."""
    method = getattr(engine, "spec_stats", None)
    spec = method() if callable(method) else None
    if spec is None:
        return None
    return {
        "proposed": [int(n) for n in spec.proposed],
        "accepted": [int(n) for n in spec.accepted],
        "verify_steps": int(getattr(spec, "verify_steps", 0)),
        "emitted": int(getattr(spec, "emitted", 0)),
    }
