"""``EngineLoop``: the engine in a thread of the server process (``--no-engine-process``), an ``EngineClient``.

Why it exists: the engine is not thread-safe and ``step()`` blocks for a model call, so it cannot run on the
server's event loop. The loop thread owns an ``EngineCore``; it takes commands from a thread-safe queue (add a
group of requests, abort some, stats, run a function on the engine), steps while there is work, and hands each
output to the asyncio queue of the HTTP request that asked for it (``SinkTable``). A group (the ``n`` choices of
one HTTP request, or its list of prompts) is added all or nothing: a request the engine rejects (a ``UserError``),
or a full queue (``QueueFull``), fails that caller only.

If ``step()`` raises (a bug, not a bad request: those are rejected at ``add``), every running request gets the
exception and is aborted; the loop goes on for new requests. ``engine_process.EngineProcess`` is the same
interface with the engine in a process of its own (the default of ``mcore serve``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from mcore_inference.engine import LLMEngine
from mcore_inference.lockstep import LockstepEngine
from mcore_inference.sampling import SamplingParams
from mcore_inference.server.client import Item, Sink, SinkTable
from mcore_inference.server.engine_core import EngineCore, EngineStopped

T = TypeVar("T")

_log = logging.getLogger(__name__)

#: How long the idle loop waits for a command before checking for shutdown (seconds).
_IDLE_WAIT = 0.05


@dataclass(frozen=True)
class _Add:
    ids: Sequence[int]
    requests: Sequence[tuple[Sequence[int], SamplingParams]]
    sinks: Sequence[Sink]
    arrival: float
    result: concurrent.futures.Future[list[int]]


@dataclass(frozen=True)
class _Abort:
    request_ids: Sequence[int]


@dataclass(frozen=True)
class _Call:
    function: Callable[[EngineCore], Any]
    result: concurrent.futures.Future[Any]


class EngineLoop:
    """Run ``engine`` in a background thread; ``start()``, then ``submit``/``abort``/``stats``; ``stop()``."""

    def __init__(self, engine: LLMEngine | LockstepEngine, *, max_waiting: int | None = None) -> None:
        self.engine = engine  # touched only by the loop thread once started
        # the leader of engines run in lockstep over ranks: keepalives while idle, the stop record at shutdown
        self._lockstep = engine if isinstance(engine, LockstepEngine) else None
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self._core = EngineCore(engine, max_waiting=max_waiting)
        self._commands: queue.Queue[_Add | _Abort | _Call | None] = queue.Queue()
        self._sinks = SinkTable()
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
        self, requests: Sequence[tuple[Sequence[int], SamplingParams]], out: asyncio.Queue[Item]
    ) -> concurrent.futures.Future[list[int]]:
        """See ``EngineClient.submit``."""
        result: concurrent.futures.Future[list[int]] = concurrent.futures.Future()
        ids, sinks = self._sinks.new_ids(out, len(requests))
        self._send(_Add(ids, list(requests), sinks, time.monotonic(), result), result)
        return result

    def abort(self, request_ids: Sequence[int]) -> None:
        """Abort requests (their blocks go back); unknown or finished ids are ignored."""
        if request_ids:
            self._sinks.drop(request_ids)
            self._commands.put(_Abort(list(request_ids)))

    def call(self, function: Callable[[Any], T]) -> concurrent.futures.Future[T]:
        """Run ``function(engine)`` on the loop thread, between steps (checks in tests)."""
        result: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._send(_Call(lambda core: function(core.engine), result), result)
        return result

    def stats(self) -> concurrent.futures.Future[dict[str, Any]]:
        result: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self._send(_Call(EngineCore.stats, result), result)
        return result

    def _send(self, command: _Add | _Call, result: concurrent.futures.Future[Any]) -> None:
        if not self.running:
            result.set_exception(EngineStopped("the engine is not running"))
            return
        self._commands.put(command)
        if self._stopping.is_set():  # stopped between the check and the put: the thread may have drained already
            self._fail_waiting()

    # ----- loop thread -----

    def _run(self) -> None:
        core = self._core
        while not self._stopping.is_set():
            busy = core.has_work()
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
            if self._stopping.is_set() or not core.has_work():
                if self._lockstep is not None and not self._stopping.is_set():
                    self._keepalive(self._lockstep)
                continue
            try:
                deltas = core.step()
            except Exception as exc:  # a bug in the model or engine: fail the running requests, keep serving
                _log.exception("engine step failed; aborting the running requests")
                self._sinks.fail(core.fail_all(), exc)
                continue
            self._sinks.deliver(deltas)
        self._shutdown()

    def _keepalive(self, lockstep: LockstepEngine) -> None:
        """An idle leader's keepalive (the followers wait for a record at most the group's timeout); a failure (a
        follower gone) stops the loop: the model cannot run without them."""
        try:
            lockstep.keepalive()
        except Exception:
            _log.exception("lockstep keepalive failed (a rank that follows is gone?); stopping the engine")
            self._stopping.set()

    def _handle(self, command: _Add | _Abort | _Call) -> None:
        core = self._core
        if isinstance(command, _Abort):
            core.abort(command.request_ids)  # their sinks were dropped by the caller
        elif isinstance(command, _Call):
            try:
                command.result.set_result(command.function(core))
            except Exception as exc:
                command.result.set_exception(exc)
        else:
            try:
                core.add(command.ids, command.requests, command.arrival)
            except Exception as exc:
                command.result.set_exception(exc)
                return
            self._sinks.register(command.ids, command.sinks)
            command.result.set_result(list(command.ids))

    def _shutdown(self) -> None:
        """Abort what runs and fail what waits: nothing is left holding blocks or awaiting a queue."""
        self._core.abort_all()
        if self._lockstep is not None:
            try:
                self._lockstep.stop()  # the aborts and the stop record: the followers' follow() returns
            except Exception:
                _log.exception("could not send the stop record to the ranks that follow")
        self._sinks.fail(None, EngineStopped("the server is shutting down"))
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        """Fail the commands still queued (any thread: each is taken from the queue once)."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, (_Add, _Call)) and not command.result.done():
                command.result.set_exception(EngineStopped("the server is shutting down"))
