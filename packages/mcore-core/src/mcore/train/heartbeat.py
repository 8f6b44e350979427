"""Heartbeats: a rank waiting for a stopped or lagging rank ends within ``parallel.timeout_s``, on NCCL too.

A collective that waits for a rank that stopped fails only when its process group's timeout has
passed, and on NCCL that failure is the watchdog aborting the process with a C++ report, never
the run's one-line message. So each rank of a multi-process run also runs a small thread that

1. publishes, every ``beat_s``, where its main thread is: a beat counter, its position in the
   run (``2 * n`` inside the n-th phase of ``HangGuard``, ``2 * n + 1`` after it) and the phase's
   name, under its rank in the rendezvous store (the ``MASTER_ADDR:MASTER_PORT`` store that
   ``torchrun`` serves);
2. once its own position has lasted ``deadline_s = timeout_s - 2 * check_s``, reads every rank's
   record twice, ``check_s`` apart. A rank whose beat did not move is stopped (SIGSTOP, a dead
   node, a process frozen in the kernel); a rank at an earlier position is behind. Either makes
   this rank's wait a hang: the thread prints one line

       mcore: error: rank 0: gradient sync of step 12 waited 540 s for the other ranks
       (parallel.timeout_s = 600 s); late: rank 3 (no heartbeat for 30 s: stopped or gone; last in
       forward/backward of step 12)

   and ends the process with exit code 2, ``check_s`` before the process group's own timeout.

A rank that ends on a hang publishes so first (state ``ENDED``): the ranks that waited with it do not name it
late, and a rank left behind ends too, with a line saying the run ended on a hang. Rank 0, whose process
serves the store when no torchrun agent does, stays up to ``check_s`` more, until the ranks waiting with it
have decided: ``deadline + check + linger <= timeout_s``.

When no rank is stopped or behind, this rank is the slow one or every rank is in the same long
phase (a first-step compile): not a hang, and nothing happens (rank 0 says so once per phase).
Positions compare because every rank runs the same phases in the same order; where they do
not, the process group's timeout is still there (``HangGuard.phase`` names it).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from mcore.errors import EXIT_USER_ERROR

#: The longest pause between the two reads of a check: a live rank's beat moves within it.
MAX_CHECK_S = 30.0
#: The shortest pause between beats (a tiny ``timeout_s`` must not turn the thread into a busy loop on the store).
MIN_BEAT_S = 0.05
#: Where this rank's records live in the store (one key per rank under it).
STORE_PREFIX = "mcore-heartbeat"
#: A record's state: the rank is running; its run ended normally (``close``); it ended on a hang it saw.
RUNNING, DONE, ENDED = "run", "done", "hang"


@dataclass(frozen=True)
class Record:
    """One rank's published state."""

    beat: int  # counts publications: a live rank's moves every beat_s
    position: int  # 2n inside the n-th phase, 2n+1 after it
    label: str  # the phase's name, or "after <name>"
    state: str = RUNNING  # RUNNING, DONE or ENDED

    def encode(self) -> bytes:
        return f"{self.beat}|{self.position}|{self.state}|{self.label}".encode()

    @classmethod
    def decode(cls, raw: bytes) -> Record:
        beat, position, state, label = raw.decode(errors="replace").split("|", 3)
        if state not in (RUNNING, DONE, ENDED):
            raise ValueError(f"unknown heartbeat state {state!r}")
        return cls(int(beat), int(position), label, state)


def check_seconds(timeout_s: float) -> float:
    """How far apart a check's two reads are: a fifth of the timeout, at most ``MAX_CHECK_S``."""
    return min(MAX_CHECK_S, timeout_s / 5)


def judge(
    me: int,
    mine: Record,
    waited_s: float,
    timeout_s: float,
    check_s: float,
    first: Mapping[int, Record | None],
    second: Mapping[int, Record | None],
) -> str | None:
    """The hang message, or ``None``: no rank is stopped (beat unchanged across the reads) or behind ``mine``, and
    none has ended the run on a hang it saw (then this rank, left behind, ends too)."""
    stopped: list[str] = []
    behind: list[str] = []
    ended: list[str] = []
    for rank in sorted(second):
        if rank == me:
            continue
        before, now = first.get(rank), second[rank]
        if now is not None and now.state == ENDED:
            ended.append(f"rank {rank} (in {now.label})")
            continue  # not late: it saw a hang and said so
        if now is not None and now.state == DONE:
            continue  # it ended its run normally
        if now is None or before is None or now.beat == before.beat:
            if now is None:
                where = "; it never published one"
            elif now.position > mine.position:
                where = f"; it was ahead of this rank, in {now.label}"
            else:
                where = f"; last in {now.label}"
            stopped.append(f"rank {rank} (no heartbeat for {check_s:g} s: stopped or gone{where})")
        elif now.position < mine.position:
            behind.append(f"rank {rank} (alive, still in {now.label})")
    # a stopped rank holds up every rank: those behind are most likely waiting for it too, so named apart
    late = stopped or behind
    also = f"; behind it: {', '.join(behind)}" if stopped and behind else ""
    if not late and ended:
        return (
            f"rank {me}: {mine.label} has lasted {waited_s:.0f} s, and the run ended on a hang: "
            f"{', '.join(ended)} waited more than the timeout for the other ranks (their lines name the late ones)"
        )
    if not late:
        return None
    return (
        f"rank {me}: {mine.label} waited {waited_s:.0f} s for the other ranks (parallel.timeout_s = {timeout_s:g} s); "
        f"late: {', '.join(late)}{also}; if that phase is legitimately slow, raise --parallel.timeout_s"
    )


def end_process(message: str) -> None:
    """Print ``message`` as the CLI prints a ``UserError`` and end the process (exit code 2) from any thread."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    try:
        print(f"mcore: error: {message}", file=sys.stderr, flush=True)
    finally:
        os._exit(EXIT_USER_ERROR)  # the main thread is blocked in a collective: nothing else can end it


class Heartbeat:
    """The publishing and judging thread of one rank (see the module docstring)."""

    def __init__(
        self,
        store: Any,
        *,
        rank: int,
        world_size: int,
        timeout_s: float,
        on_hang: Callable[[str], None] = end_process,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.rank, self.world_size, self.timeout_s = store, rank, world_size, timeout_s
        self.on_hang, self.clock = on_hang, clock
        self.check_s = check_seconds(timeout_s)
        self.deadline_s = timeout_s - 2 * self.check_s
        self.beat_s = max(MIN_BEAT_S, min(1.0, self.check_s / 4))
        self.lock = threading.Lock()
        self.phases = 0
        self.position, self.label, self.since = 1, "startup", clock()
        self.state = RUNNING
        self.beats = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.loop, name=f"mcore-heartbeat-{rank}", daemon=True)

    @classmethod
    def from_env(cls, rank: int, world_size: int, timeout_s: float) -> Heartbeat | None:
        """A heartbeat on the launcher's store (``MASTER_ADDR``/``MASTER_PORT``); ``None`` where there is none."""
        import torch.distributed as dist

        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
        if not host or not port.isdigit():
            return None
        check = timedelta(seconds=check_seconds(timeout_s))
        try:
            client = dist.TCPStore(host, int(port), is_master=False, timeout=check, wait_for_workers=False)
        except (RuntimeError, OSError, ValueError):
            return None  # no store to reach: the process group's timeout still ends a hang
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"{STORE_PREFIX}/{attempt}", client)
        return cls(store, rank=rank, world_size=world_size, timeout_s=timeout_s)

    # -- the main thread's side ------------------------------------------------------------
    def start(self) -> Heartbeat:
        self.publish()
        self.thread.start()
        return self

    def enter(self, label: str) -> None:
        with self.lock:
            self.phases += 1
            self.position, self.label, self.since = 2 * self.phases, label, self.clock()

    def leave(self) -> None:
        with self.lock:
            self.position, self.label, self.since = 2 * self.phases + 1, f"after {self.label}", self.clock()

    def close(self) -> None:
        """Stop the thread and publish that this rank has finished (its peers then never wait on it)."""
        self.stopped.set()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=2 * self.beat_s + self.check_s)
        with self.lock:
            self.state = DONE
        self.publish()

    # -- the thread ------------------------------------------------------------------------
    def current(self) -> tuple[Record, float]:
        with self.lock:
            self.beats += 1
            return Record(self.beats, self.position, self.label, self.state), self.clock() - self.since

    def publish(self) -> Record:
        mine, _ = self.current()
        with contextlib.suppress(RuntimeError, OSError):  # a missed beat is not a hang: the store is judged on a wait
            self.store.set(str(self.rank), mine.encode())
        return mine

    def read(self) -> dict[int, Record | None]:
        keys = [str(r) for r in range(self.world_size)]
        # one request when every rank has published (the usual case), one per rank only otherwise
        present = keys if self.store.check(keys) else [k for k in keys if self.store.check([k])]
        values = self.store.multi_get(present) if hasattr(self.store, "multi_get") else map(self.store.get, present)
        found: dict[int, Record | None] = {}
        for key, raw in zip(present, values, strict=True):
            try:
                found[int(key)] = Record.decode(bytes(raw))
            except ValueError:  # not a record this code wrote: as if that rank never published one
                found[int(key)] = None
        return {r: found.get(r) for r in range(self.world_size)}

    def end(self, mine: Record, seen: Mapping[int, Record | None]) -> None:
        """Publish that this rank ends on a hang; rank 0 (the store's host unless torchrun's agent is) then stays up
        to ``check_s`` more, until every rank that waits as it does has seen the hang too (or the store goes)."""
        with self.lock:
            self.state = ENDED
        self.publish()
        if self.rank != 0:
            return
        until = self.clock() + self.check_s
        with contextlib.suppress(RuntimeError, OSError, ValueError):
            while self.clock() < until:
                time.sleep(1.5 * self.beat_s)  # a live rank's beat moves within it
                if not self.peers_still_judging(mine, seen, self.read()):
                    break

    @staticmethod
    def peers_still_judging(mine: Record, seen: Mapping[int, Record | None], now: Mapping[int, Record | None]) -> bool:
        """Whether a rank still runs, its beat moving, at this rank's position or later: it waits, undecided."""
        for rank, record in now.items():
            before = seen.get(rank)
            if record is None or before is None or record.state != RUNNING or record.beat == before.beat:
                continue
            if record.position >= mine.position:
                return True
        return False

    def loop(self) -> None:
        first: dict[int, Record | None] | None = None
        first_at = 0.0
        told: int | None = None  # the position rank 0 said was long on every rank
        while not self.stopped.wait(self.beat_s):
            self.publish()
            mine, waited = self.current()
            if waited < self.deadline_s:
                first = None
                continue
            try:
                if first is None or first_at < self.since:
                    first, first_at = self.read(), self.clock()
                    continue
                if self.clock() - first_at < self.check_s:
                    continue
                second = self.read()
            except (RuntimeError, OSError, ValueError) as exc:
                self.on_hang(
                    f"rank {self.rank}: {mine.label} waited {waited:.0f} s for the other ranks (parallel.timeout_s = "
                    f"{self.timeout_s:g} s), and the launcher's store stopped answering ({type(exc).__name__}): "
                    "rank 0 or the launcher has ended"
                )
                return
            verdict = judge(self.rank, mine, waited, self.timeout_s, self.check_s, first, second)
            if self.position != mine.position:  # the wait ended while the records were read: no verdict
                first = None
                continue
            if verdict is not None and not self.stopped.is_set():
                self.end(mine, second)
                self.on_hang(verdict)
                return
            first, first_at = second, self.clock()
            if self.rank == 0 and told != mine.position:
                told = mine.position
                print(
                    f"rank 0: {mine.label} has lasted {waited:.0f} s; every rank is alive and none is behind it "
                    "(a long phase, not a hang)",
                    file=sys.stderr,
                    flush=True,
                )
