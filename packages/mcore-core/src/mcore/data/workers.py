"""An ordered ``map`` over worker processes that cannot hang silently.

``multiprocessing.Pool.imap`` hung ``mcore data prepare`` (and the data step of ``mcore train``)
when it stopped early at ``max_tokens``: leaving the pool calls ``Pool.terminate``, which first
tells the thread reading results to stop (it leaves as soon as the result pipe is momentarily
empty, or after ten more results) and then writes a sentinel into that pipe under the pipe's
write lock. A worker finishing its
chunk takes that lock to write its result, larger than the pipe's buffer, and blocks forever
because nobody reads the pipe any more; ``terminate`` waits forever for the lock (CPython 3.11
``pool.py``, ``_terminate_pool``). ``Pool`` also loses the task of a worker that dies, so
``imap`` then waits forever, and it reads the whole input ahead of the consumer in a helper
thread, holding every result in memory.

Here each worker has a private duplex pipe and gets one task at a time; the calling thread does
all reading and writing (the input iterator runs in it, so its exceptions surface as they are);
at most ``window`` tasks are out or waiting to be consumed; and the parent waits on each busy
worker's pipe *and* its process sentinel, with a timeout. A worker that dies or goes silent
becomes a one-line ``UserError``; stopping early kills the workers, which share no lock with the
parent, so nothing can be left holding one.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import signal
from collections.abc import Callable, Generator, Iterable
from contextlib import suppress
from multiprocessing.connection import Connection, wait
from typing import Any, TypeVar

from mcore.errors import UserError

T = TypeVar("T")
R = TypeVar("R")

_READY = -1  # the sequence number of a worker's "initialized" message
_END = object()


def _send(conn: Connection, seq: int, ok: bool, value: Any) -> None:
    try:
        conn.send((seq, ok, value))
    except (pickle.PicklingError, TypeError, AttributeError) as exc:  # pickled before anything is written
        conn.send((seq, False, RuntimeError(f"cannot send {type(value).__name__} to the parent: {exc}")))


def _worker_main(
    conn: Connection, fn: Callable[[Any], Any], initializer: Callable[..., None] | None, initargs: tuple[Any, ...]
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    init_error: Exception | None = None
    try:
        if initializer is not None:
            initializer(*initargs)
    except Exception as exc:
        init_error = exc
    try:
        _send(conn, _READY, init_error is None, init_error)
        while True:
            message = conn.recv()
            if message is None:
                return
            seq, item = message
            try:
                result = fn(item)
            except Exception as exc:
                _send(conn, seq, False, exc)
            else:
                _send(conn, seq, True, result)
    except (EOFError, OSError):  # the parent is gone or closed our pipe: nothing left to do
        return


def _died(w: int, procs: list[Any], task: str, hint: str) -> UserError:
    proc = procs[w]
    proc.join(timeout=1.0)
    code = proc.exitcode
    if code is None:
        how = "closed its pipe"
    elif code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        how = f"was killed by {name}" + (" (often the out-of-memory killer)" if -code == signal.SIGKILL else "")
    else:
        how = f"exited with code {code}"
    return UserError(f"worker process {w} of {len(procs)} (pid {proc.pid}) {how} while {task}; {hint}")


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    task: str,
    hint: str,
    timeout_s: float,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    window: int | None = None,
) -> Generator[R, None, None]:
    """``fn(item)`` for each item, computed by ``workers`` spawned processes, yielded in order.

    ``fn`` and ``initializer`` must be importable module-level functions. ``task`` says what the
    workers do (``"tokenizing data.source = 'x'"``) and ``hint`` what the user can do when one
    dies or sends nothing for ``timeout_s`` seconds; both go into the ``UserError``. An exception
    raised by ``fn`` is raised here. Closing the generator early stops the workers at once.
    """
    assert workers > 0 and timeout_s > 0
    window = window or 2 * workers
    ctx = mp.get_context("spawn")  # the parent may hold threads (torch); never fork it
    procs: list[Any] = []
    conns: list[Connection] = []
    finished = False
    try:
        for i in range(workers):
            parent, child = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=_worker_main, args=(child, fn, initializer, initargs), name=f"mcore-worker-{i}", daemon=True
            )
            proc.start()
            child.close()  # the worker holds the only other end: its exit reads as EOF here
            procs.append(proc)
            conns.append(parent)
        busy: dict[int, int] = {w: _READY for w in range(workers)}  # worker -> sequence number it owes
        idle: list[int] = []
        done: dict[int, R] = {}
        it = iter(items)
        sent = taken = 0
        exhausted = False
        while True:
            while idle and not exhausted and sent - taken < window:
                item = next(it, _END)
                if item is _END:
                    exhausted = True
                    break
                w = idle.pop()
                try:
                    conns[w].send((sent, item))  # the worker is idle, blocked reading: this cannot deadlock
                except OSError:
                    raise _died(w, procs, task, hint) from None
                busy[w] = sent
                sent += 1
            if taken in done:
                yield done.pop(taken)
                taken += 1
                continue
            if exhausted and taken == sent:
                finished = True
                return
            waiting = {**{conns[w]: w for w in busy}, **{procs[w].sentinel: w for w in busy}}
            ready = wait(list(waiting), timeout=timeout_s)
            if not ready:
                raise UserError(
                    f"no result from {workers} worker process(es) in {timeout_s:g} s while {task} "
                    f"(a worker is stuck); {hint}"
                )
            for w in sorted({waiting[r] for r in ready}):
                conn = conns[w]
                message = None
                if conn.poll():
                    with suppress(EOFError, OSError):  # EOF: the worker is gone (and said why, if at all)
                        message = conn.recv()
                if message is None:
                    raise _died(w, procs, task, hint)
                seq, ok, value = message
                if not ok:
                    raise value
                del busy[w]
                idle.append(w)
                if seq != _READY:
                    done[seq] = value
    finally:
        _stop(procs, conns, graceful=finished)


def _stop(procs: list[Any], conns: list[Connection], *, graceful: bool) -> None:
    """Let idle workers exit (``graceful``) or kill them; either way none is left behind."""
    if graceful:
        for conn in conns:
            with suppress(OSError):
                conn.send(None)
        for proc in procs:
            proc.join(timeout=5.0)
    for proc in procs:
        if proc.is_alive():
            proc.kill()  # holds no lock or resource shared with us
    for proc in procs:
        proc.join(timeout=5.0)
    for conn in conns:
        conn.close()
