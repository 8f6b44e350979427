"""The HTTP side of an engine: the ``EngineClient`` interface the routes use, and the table of output sinks.

Why it exists: the routes (``app.py``) do not care whether the engine runs in a thread (``EngineLoop``) or in a
process (``EngineProcess``); both implement ``EngineClient``. Both also deliver outputs the same way: each engine
request has a ``Sink`` (an asyncio queue on the server's event loop, and the tag the HTTP request knows it by) and
an ``Accumulator`` that turns deltas into ``ServedOutput``s; ``SinkTable`` holds them and is safe to use from the
thread that receives outputs while the event loop registers new requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mcore_inference.sampling import SamplingParams
from mcore_inference.server.engine_core import Accumulator, OutputDelta, ServedOutput

#: What an HTTP request's queue receives: ``(tag, output)``, or ``(tag, exception)`` when the engine failed it.
Item = tuple[int, ServedOutput | BaseException]


class EngineClient(Protocol):
    """What the routes need of an engine, wherever it runs."""

    tokenizer: Any
    max_model_len: int | None

    @property
    def running(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def submit(
        self, requests: Sequence[tuple[Sequence[int], SamplingParams]], out: asyncio.Queue[Item]
    ) -> concurrent.futures.Future[list[int]]:
        """Add the requests, all or none; request ``i``'s outputs arrive on ``out`` as ``(i, output)``. The future
        gives their ids (for ``abort``), or the error that refused the group (``UserError``, ``QueueFull``,
        ``EngineStopped``)."""
        ...

    def abort(self, request_ids: Sequence[int]) -> None: ...

    def stats(self) -> concurrent.futures.Future[dict[str, Any]]:
        """``EngineCore.stats()`` of the engine, between two steps."""
        ...


@dataclass(frozen=True)
class Sink:
    """Where a request's outputs go: ``(tag, item)`` onto ``queue`` on ``loop``."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Item]
    tag: int

    def put(self, item: ServedOutput | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.tag, item))


class SinkTable:
    """Request id -> (sink, accumulator); ids come from ``new_ids`` (unique for the client's life)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, tuple[Sink, Accumulator]] = {}
        self._ids = itertools.count()

    def new_ids(self, out: asyncio.Queue[Item], count: int) -> tuple[list[int], list[Sink]]:
        """Fresh ids and the sinks of ``count`` requests whose outputs go to ``out`` (tags 0..count-1); not yet
        registered (``register`` once the engine took them)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            ids = [next(self._ids) for _ in range(count)]
        return ids, [Sink(loop, out, i) for i in range(count)]

    def register(self, ids: Sequence[int], sinks: Sequence[Sink]) -> None:
        with self._lock:
            for request_id, sink in zip(ids, sinks):
                self._entries[request_id] = (sink, Accumulator(request_id))

    def deliver(self, deltas: Sequence[OutputDelta]) -> None:
        """Hand a step's deltas to their requests' queues: one wake-up of each event loop per call, not per delta;
        the deltas are folded into outputs (``Accumulator``) on the event loop, not in the caller's thread (the
        engine's, in a thread of the server: it goes on to its next step at once)."""
        ready: dict[asyncio.AbstractEventLoop, list[tuple[Sink, Accumulator, OutputDelta]]] = {}
        entries = self._entries
        with self._lock:
            for delta in deltas:
                entry = entries.get(delta.request_id)
                if entry is None:
                    continue
                if delta.finished:
                    del entries[delta.request_id]
                sink, acc = entry
                ready.setdefault(sink.loop, []).append((sink, acc, delta))
        for loop, items in ready.items():
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
                loop.call_soon_threadsafe(_put_all, items)

    def drop(self, ids: Sequence[int]) -> None:
        """Forget requests (aborted by their caller: nobody reads their outputs)."""
        with self._lock:
            for request_id in ids:
                self._entries.pop(request_id, None)

    def fail(self, ids: Sequence[int] | None, exc: BaseException) -> None:
        """Hand ``exc`` to the requests ``ids`` (None: all) and forget them."""
        with self._lock:
            chosen = list(self._entries) if ids is None else [i for i in ids if i in self._entries]
            sinks = [self._entries.pop(i)[0] for i in chosen]
        for sink in sinks:
            sink.put(exc)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def _put_all(items: list[tuple[Sink, Accumulator, OutputDelta]]) -> None:
    """On the event loop: each delta folded into its request's output, onto its queue (in the engine's order)."""
    for sink, acc, delta in items:
        sink.queue.put_nowait((sink.tag, acc.apply(delta)))
