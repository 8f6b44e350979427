"""``EngineLoop``: the one thread that owns an ``LLMEngine``, and the bridge between it and asyncio.

Why it exists: the engine is not thread-safe and ``step()`` blocks for a model call, so it cannot run on the
server's event loop. The loop thread takes commands from a thread-safe queue (add a group of requests, abort one,
run a function on the engine), steps the engine while it has work, and hands each ``RequestOutput`` to the asyncio
queue of the HTTP request that asked for it (``loop.call_soon_threadsafe``). A group (the ``n`` choices of one HTTP
request, or its list of prompts) is added all or nothing: a request the engine rejects (a ``UserError``) aborts the
ones added before it and the error goes back to that caller only.

If ``step()`` raises (a bug, not a bad request: those are rejected at ``add``), every running request gets the
exception and is aborted; the loop goes on for new requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from mcore_inference.engine import LLMEngine, RequestOutput
from mcore_inference.sampling import SamplingParams

T = TypeVar("T")

_log = logging.getLogger(__name__)

#: How long the idle loop waits for a command before checking for shutdown (seconds).
_IDLE_WAIT = 0.05


@dataclass(frozen=True)
class _Sink:
    """Where a request's outputs go: ``(tag, output or exception)`` onto ``queue`` on ``loop``."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]]
    tag: int

    def put(self, item: RequestOutput | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.tag, item))


@dataclass(frozen=True)
class _Add:
    requests: Sequence[tuple[Sequence[int], SamplingParams]]
    sinks: Sequence[_Sink]
    result: concurrent.futures.Future[list[int]]


@dataclass(frozen=True)
class _Abort:
    request_ids: Sequence[int]


@dataclass(frozen=True)
class _Call:
    function: Callable[[LLMEngine], Any]
    result: concurrent.futures.Future[Any]


class EngineLoop:
    """Run ``engine`` in a background thread; ``start()``, then ``submit``/``abort``/``call``; ``stop()``."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine  # touched only by the loop thread once started
        self._commands: queue.Queue[_Add | _Abort | _Call | None] = queue.Queue()
        self._sinks: dict[int, _Sink] = {}  # loop thread only
        self._thread = threading.Thread(target=self._run, name="mcore-engine-loop", daemon=True)
        self._stopping = threading.Event()

    # ----- caller side (any thread) -----

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is running and end the thread."""
        self._stopping.set()
        self._commands.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def submit(
        self,
        requests: Sequence[tuple[Sequence[int], SamplingParams]],
        out: asyncio.Queue[tuple[int, RequestOutput | BaseException]],
    ) -> concurrent.futures.Future[list[int]]:
        """Add the requests (all or none); request ``i``'s outputs arrive on ``out`` as ``(i, output)``. The future
        gives the engine's request ids, or the ``UserError`` that rejected the group."""
        loop = asyncio.get_running_loop()
        result: concurrent.futures.Future[list[int]] = concurrent.futures.Future()
        sinks = [_Sink(loop, out, i) for i in range(len(requests))]
        self._send(_Add(list(requests), sinks, result), result)
        return result

    def abort(self, request_ids: Sequence[int]) -> None:
        """Abort requests (their blocks go back); unknown or finished ids are ignored."""
        if request_ids:
            self._commands.put(_Abort(list(request_ids)))

    def call(self, function: Callable[[LLMEngine], T]) -> concurrent.futures.Future[T]:
        """Run ``function(engine)`` on the loop thread, between steps (stats, checks)."""
        result: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._send(_Call(function, result), result)
        return result

    def _send(self, command: _Add | _Call, result: concurrent.futures.Future[Any]) -> None:
        if not self.running:
            result.set_exception(RuntimeError("the engine loop is not running"))
            return
        self._commands.put(command)
        if self._stopping.is_set():  # stopped between the check and the put: the thread may have drained already
            self._fail_waiting()

    # ----- loop thread -----

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping.is_set():
            busy = engine.has_unfinished()
            try:
                command = self._commands.get(block=not busy, timeout=None if busy else _IDLE_WAIT)
            except queue.Empty:
                command = None
            while command is not None:
                self._handle(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self._stopping.is_set() or not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # a bug in the model or engine: fail the running requests, keep serving
                _log.exception("engine step failed; aborting the %d running requests", len(self._sinks))
                for request_id, sink in list(self._sinks.items()):
                    engine.abort(request_id)
                    sink.put(exc)
                self._sinks.clear()
                continue
            for out in outputs:
                target = self._sinks.get(out.request_id)
                if target is None:
                    continue
                if out.finished:
                    del self._sinks[out.request_id]
                target.put(out)
        self._shutdown()

    def _handle(self, command: _Add | _Abort | _Call) -> None:
        engine = self.engine
        if isinstance(command, _Abort):
            for request_id in command.request_ids:
                if self._sinks.pop(request_id, None) is not None:
                    engine.abort(request_id)
        elif isinstance(command, _Call):
            try:
                command.result.set_result(command.function(engine))
            except Exception as exc:
                command.result.set_exception(exc)
        else:
            ids: list[int] = []
            try:
                for prompt, params in command.requests:
                    ids.append(engine.add_request(prompt, params))
            except Exception as exc:
                for request_id in ids:
                    engine.abort(request_id)
                command.result.set_exception(exc)
                return
            for request_id, sink in zip(ids, command.sinks):
                self._sinks[request_id] = sink
            command.result.set_result(ids)

    def _shutdown(self) -> None:
        """Abort what runs and fail what waits: nothing is left holding blocks or awaiting a queue."""
        stopped = RuntimeError("the server is shutting down")
        for request_id, sink in list(self._sinks.items()):
            self.engine.abort(request_id)
            sink.put(stopped)
        self._sinks.clear()
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        """Fail the commands still queued (any thread: each is taken from the queue once)."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, (_Add, _Call)) and not command.result.done():
                command.result.set_exception(RuntimeError("the server is shutting down"))
