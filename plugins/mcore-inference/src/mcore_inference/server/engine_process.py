"""``EngineProcess``: the engine in a process of its own (as vLLM's V1), an ``EngineClient`` for the HTTP process.

Why it exists: in one process the engine's Python (scheduling, sampling bookkeeping, detokenisation) and the HTTP
server's (parsing, SSE serialisation) share one interpreter lock, so a busy server slows the decode loop. Here the
engine runs in a child started with the ``spawn`` method (safe with CUDA; nothing of the parent's state is copied).

* The child builds the engine itself: ``factory()`` (a picklable callable, e.g. a module-level function or a
  ``functools.partial`` of one) returns an ``LLM`` or ``LLMEngine``. Once built it sends, once, its tokenizer
  and ``max_model_len`` (pickled: from our own child, before any client input exists).
* After that both directions carry JSON only, plain data, never pickles: ``add`` (the caller's request ids, token
  ids and the ``SamplingParams`` fields), ``abort``, ``stats``, ``stop``; back come ``added``/``rejected``,
  ``out`` (one message per step: every request's ``OutputDelta``), ``failed`` (a step raised), ``stats``,
  ``stopped``. Request ids are chosen by the HTTP side, so an abort (a client that went away) is sent at once,
  without waiting for a reply; the child aborts between two steps and the blocks go back.
* The parent writes from one thread (a queue: the event loop never blocks on a full pipe) and reads in another,
  which hands outputs to the HTTP requests' queues (``SinkTable``).
* Shutdown: ``stop()`` asks the child to abort what runs and exit; after ``stop_timeout`` seconds it is
  terminated, then killed. The child ignores SIGINT and SIGTERM (the server process decides when to stop: Ctrl-C
  in a terminal reaches the whole process group) and exits when the pipe closes, so a server process that dies
  leaves no engine behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from mcore.errors import UserError
from mcore_inference.engine import LLMEngine
from mcore_inference.sampling import SamplingParams
from mcore_inference.server.client import Item, Sink, SinkTable
from mcore_inference.server.engine_core import (
    EngineCore,
    EngineFailed,
    EngineStopped,
    OutputDelta,
    QueueFull,
    check_max_waiting,
)

_log = logging.getLogger(__name__)

_PARAM_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


class EngineProcess:
    """The engine built by ``factory()`` in a spawned process; see the module docstring.

    ``max_waiting``: as ``EngineCore``. ``start_timeout``: seconds the child may take to build the engine (None:
    no limit). ``stop_timeout``: seconds ``stop`` waits for the child before terminating it.
    """

    def __init__(
        self,
        factory: Callable[[], Any],
        *,
        max_waiting: int | None = None,
        start_timeout: float | None = None,
        stop_timeout: float = 10.0,
    ) -> None:
        check_max_waiting(max_waiting, "EngineProcess")
        self.factory, self.max_waiting = factory, max_waiting
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.tokenizer: Any = None
        self.max_model_len: int | None = None
        self.process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._sinks = SinkTable()
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[concurrent.futures.Future[Any], list[int], list[Sink]]] = {}
        self._tokens = 0
        self._state = "new"  # new -> running -> stopped (or dead)
        self._threads: list[threading.Thread] = []

    # ----- life -----

    def start(self) -> None:
        """Spawn the child and wait until its engine is built (a ``UserError`` if building failed); idempotent."""
        if self._state != "new":
            return
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(
            target=_engine_main, args=(child, self.factory, self.max_waiting), name="mcore-engine", daemon=True
        )
        process.start()
        child.close()
        self.process, self._conn = process, parent
        deadline = None if self.start_timeout is None else time.monotonic() + self.start_timeout
        try:
            while not parent.poll(0.1):
                if not process.is_alive():
                    raise UserError(f"the engine process exited while starting (exit code {process.exitcode})")
                if deadline is not None and time.monotonic() > deadline:
                    raise UserError(f"the engine process did not start within {self.start_timeout} s")
            try:
                kind, info = parent.recv()  # the one pickle: from our own child, before any client input
            except (EOFError, OSError):  # the pipe closed: the child died before it could say why
                process.join(5)
                raise UserError(
                    f"the engine process exited while starting (exit code {process.exitcode}); see its output above"
                ) from None
        except BaseException:
            self._kill()
            raise
        if kind != "ready":
            self._kill()
            raise UserError(f"the engine process failed to start: {info}")
        self.tokenizer, self.max_model_len = info["tokenizer"], info["max_model_len"]
        self._state = "running"
        self._threads = [
            threading.Thread(target=self._read, name="mcore-engine-reader", daemon=True),
            threading.Thread(target=self._write, name="mcore-engine-writer", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Abort what runs, end the child (terminate, then kill, after ``stop_timeout``) and the threads."""
        with self._lock:
            if self._state == "new":
                self._state = "stopped"
                return
            if self._state == "stopped":
                return
            was_running, self._state = self._state == "running", "stopped"
        if was_running:
            self._outbox.put(json.dumps({"op": "stop"}).encode())
        self._outbox.put(None)
        wait = self.stop_timeout if timeout is None else timeout
        if self.process is not None:
            self.process.join(wait)
        self._kill()
        for thread in self._threads:
            thread.join(wait)
        self._fail_everything(EngineStopped("the server is shutting down"))
        if self._conn is not None:
            self._conn.close()

    @property
    def running(self) -> bool:
        return self._state == "running" and self.process is not None and self.process.is_alive()

    def _kill(self) -> None:
        process = self.process
        if process is None or not process.is_alive():
            return
        process.terminate()
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)

    # ----- requests (any thread) -----

    def submit(
        self, requests: Sequence[tuple[Sequence[int], SamplingParams]], out: asyncio.Queue[Item]
    ) -> concurrent.futures.Future[list[int]]:
        """See ``EngineClient.submit``."""
        ids, sinks = self._sinks.new_ids(out, len(requests))
        wire = [[list(prompt), _params_to_wire(params)] for prompt, params in requests]
        return self._ask({"op": "add", "ids": ids, "requests": wire, "arrival": time.monotonic()}, ids, sinks)

    def abort(self, request_ids: Sequence[int]) -> None:
        if request_ids:
            self._sinks.drop(request_ids)
            if self._state == "running":
                self._outbox.put(json.dumps({"op": "abort", "ids": list(request_ids)}).encode())

    def stats(self) -> concurrent.futures.Future[dict[str, Any]]:
        return self._ask({"op": "stats"}, [], [])

    def _ask(self, message: dict[str, Any], ids: list[int], sinks: list[Sink]) -> concurrent.futures.Future[Any]:
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._state != "running":
                result.set_exception(EngineStopped("the engine is not running"))
                return result
            self._tokens += 1
            message["token"] = self._tokens
            self._pending[self._tokens] = (result, ids, sinks)
        self._outbox.put(json.dumps(message).encode())
        return result

    # ----- the parent's two threads -----

    def _write(self) -> None:
        assert self._conn is not None
        while (data := self._outbox.get()) is not None:
            try:
                self._conn.send_bytes(data)
            except (OSError, ValueError):  # the child is gone; the reader sees it too
                return

    def _read(self) -> None:
        assert self._conn is not None
        reason = "the engine process exited"
        while True:
            try:
                message = json.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                break
            op = message["op"]
            if op == "out":
                self._sinks.deliver([OutputDelta.from_wire(item) for item in message["outputs"]])
            elif op == "failed":
                self._sinks.fail(message["ids"], EngineFailed(message["message"]))
            elif op == "stopped":
                reason = "the server is shutting down"
                break
            else:
                with self._lock:
                    result, ids, sinks = self._pending.pop(message["token"])
                if op == "added":
                    self._sinks.register(ids, sinks)
                    result.set_result(ids)
                elif op == "stats":
                    result.set_result(message["stats"])
                else:  # rejected
                    result.set_exception(_rejection(message["kind"], message["message"]))
        with self._lock:
            if self._state == "running":
                _log.error("the engine process exited unexpectedly (exit code %s)", self._exit_code())
                self._state = "dead"
        self._fail_everything(EngineStopped(reason))

    def _exit_code(self) -> int | None:
        if self.process is not None:
            self.process.join(1)
            return self.process.exitcode
        return None

    def _fail_everything(self, exc: BaseException) -> None:
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for result, _, _ in pending:
            if not result.done():
                result.set_exception(exc)
        self._sinks.fail(None, exc)


def _params_to_wire(params: SamplingParams) -> dict[str, Any]:
    return {f: getattr(params, f) for f in _PARAM_FIELDS}


def _params_from_wire(fields: dict[str, Any]) -> SamplingParams:
    unknown = set(fields) - _PARAM_FIELDS
    if unknown:
        raise UserError(f"unknown sampling fields {sorted(unknown)}")
    given: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return SamplingParams(**given)


def _rejection(kind: str, message: str) -> Exception:
    if kind == "user":
        return UserError(message)
    if kind == "queue_full":
        return QueueFull(message)
    return RuntimeError(message)


# ----- the child -----


def _engine_main(conn: Connection, factory: Callable[[], Any], max_waiting: int | None) -> None:
    """The engine process: build the engine, report ready, then serve commands until ``stop`` or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server process decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        built = factory()
        engine = getattr(built, "engine", built)
        if not isinstance(engine, LLMEngine):
            raise UserError(f"the engine factory returned a {type(built).__name__}: it must be an LLM or LLMEngine")
        info = {"tokenizer": engine.tokenizer, "max_model_len": engine.max_model_len}
    except BaseException as exc:  # reported to the parent, which raises it
        conn.send(("error", str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"))
        conn.close()
        return
    try:
        conn.send(("ready", info))
    except Exception as exc:  # an unpicklable tokenizer
        conn.send(("error", f"cannot send the tokenizer to the server process ({exc}); serve with a thread instead"))
        conn.close()
        return
    try:
        _ChildLoop(conn, EngineCore(engine, max_waiting=max_waiting)).run()
    finally:
        conn.close()


class _ChildLoop:
    """The child's loop: read every waiting command, step once, send the step's outputs; again."""

    def __init__(self, conn: Connection, core: EngineCore) -> None:
        self.conn, self.core = conn, core

    def send(self, message: dict[str, Any]) -> None:
        self.conn.send_bytes(json.dumps(message).encode())

    def run(self) -> None:
        conn, core = self.conn, self.core
        while True:
            try:
                if conn.poll(0 if core.has_work() else 1.0):
                    while True:
                        if not self.handle(json.loads(conn.recv_bytes())):
                            return
                        if not conn.poll(0):
                            break
            except (EOFError, OSError):  # the server process went away: nobody to serve
                core.abort_all()
                return
            if not core.has_work():
                continue
            try:
                deltas = core.step()
            except Exception as exc:  # a bug in the model or engine: fail the running requests, keep serving
                _log.exception("engine step failed; aborting the running requests")
                self.send({"op": "failed", "ids": core.fail_all(), "message": f"{type(exc).__name__}: {exc}"})
                continue
            if deltas:
                self.send({"op": "out", "outputs": [d.to_wire() for d in deltas]})

    def handle(self, message: dict[str, Any]) -> bool:
        """Carry out one command; False on ``stop``."""
        op = message.get("op")
        if op == "abort":
            self.core.abort([int(i) for i in message["ids"]])
        elif op == "add":
            token = message["token"]
            try:
                requests = [
                    ([int(t) for t in prompt], _params_from_wire(fields)) for prompt, fields in message["requests"]
                ]
                self.core.add([int(i) for i in message["ids"]], requests, float(message["arrival"]))
            except UserError as exc:
                self.send({"op": "rejected", "token": token, "kind": "user", "message": str(exc)})
            except QueueFull as exc:
                self.send({"op": "rejected", "token": token, "kind": "queue_full", "message": str(exc)})
            except Exception as exc:
                self.send(
                    {"op": "rejected", "token": token, "kind": "error", "message": f"{type(exc).__name__}: {exc}"}
                )
            else:
                self.send({"op": "added", "token": token})
        elif op == "stats":
            self.send({"op": "stats", "token": message["token"], "stats": self.core.stats()})
        elif op == "stop":
            self.core.abort_all()
            self.send({"op": "stopped"})
            return False
        return True
