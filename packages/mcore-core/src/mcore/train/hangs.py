"""No silent hangs: a rank that waits too long for the others ends the run with one line saying what it waited for.

Two mechanisms, the first to fire wins. Each rank's ``Heartbeat`` thread (``heartbeat.py``) sees
its own phase last ``timeout_s - 2 * check`` while another rank is stopped or behind, prints the
line naming them and ends the process (exit code 2) before any collective's own timeout, which
is the only way to end cleanly on NCCL, whose watchdog otherwise aborts the process. Behind it,
every process group of a run is created with ``[parallel] timeout_s``, so a rank that stopped
(SIGSTOP, a dead node, a deadlock) makes the others' next collective fail after that long
instead of waiting forever. The run loop wraps each phase of a step in ``HangGuard.phase``;
when a collective in it times out, the guard asks which ranks are late with a
``monitored_barrier`` on a gloo group of its own (rank 0 collects every rank that does not
arrive), and raises ``CollectiveTimeout``:

    rank 0: gradient sync of step 12 waited more than parallel.timeout_s = 600 s for the other
    ranks; late: rank 3 (it did not reach a check within 30 s); ...

``CollectiveTimeout`` is a ``UserError`` so the CLI prints it as one line (exit code 2), like
every other way a run ends on purpose; torchrun then stops the remaining ranks. The NCCL
watchdog, which aborts the process itself, is not intercepted here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from mcore.errors import UserError
from mcore.train.heartbeat import Heartbeat

#: The longest ``monitored_barrier`` wait after a timeout: ranks that are merely waiting for
#: the same late rank arrive within moments of each other.
MAX_CHECK_S = 30.0

_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_GONE = re.compile(r"connection (closed|reset) by peer|broken pipe", re.IGNORECASE)
_LATE = re.compile(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier")


class CollectiveTimeout(UserError):
    """A collective waited longer than ``parallel.timeout_s``, or a peer rank vanished."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def classify(exc: BaseException) -> str | None:
    """``"timeout"``, ``"gone"`` (a peer closed its connection) or ``None`` (not a communication failure)."""
    for e in _chain(exc):
        if not isinstance(e, (RuntimeError, ConnectionError)):  # gloo/NCCL errors; not a UserError's own text
            continue
        text = str(e)
        if _TIMED_OUT.search(text):
            return "timeout"
        if _GONE.search(text):
            return "gone"
    return None


class HangGuard:
    """Names the phase a collective timed out in and the ranks that are late.

    ``group`` is a gloo group over every rank reserved for the late-rank check (``None`` on one
    process, where nothing can hang on another rank).
    """

    def __init__(
        self, timeout_s: float, *, rank: int, world_size: int, group: Any = None, heartbeat: Heartbeat | None = None
    ) -> None:
        self.timeout_s, self.rank, self.world_size, self.group = timeout_s, rank, world_size, group
        self.heartbeat = heartbeat

    @classmethod
    def for_run(cls, timeout_s: float) -> HangGuard:
        """A guard for this process (collective: every rank calls it, once); ``close`` it when the run ends."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return cls(timeout_s, rank=0, world_size=1)
        rank, world_size = dist.get_rank(), dist.get_world_size()
        heartbeat = Heartbeat.from_env(rank, world_size, timeout_s)
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        return cls(
            timeout_s,
            rank=rank,
            world_size=world_size,
            group=group,
            heartbeat=heartbeat.start() if heartbeat is not None else None,
        )

    def close(self) -> None:
        """Stop this rank's heartbeat, telling the other ranks it has finished (idempotent)."""
        if self.heartbeat is not None:
            self.heartbeat.close()
            self.heartbeat = None

    @contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """Turn a timed-out collective inside the block into ``CollectiveTimeout`` naming ``what``."""
        if self.heartbeat is not None:
            self.heartbeat.enter(what)
        try:
            yield
        except CollectiveTimeout:
            raise
        except Exception as exc:
            kind = classify(exc) if self.world_size > 1 else None
            if kind is None:
                raise
            raise CollectiveTimeout(self.describe(what, kind)) from exc
        finally:
            if self.heartbeat is not None:
                self.heartbeat.leave()

    def describe(self, what: str, kind: str) -> str:
        if kind == "gone":
            return (
                f"rank {self.rank}: lost the connection to another rank during {what}; that rank failed or was "
                "stopped (its own message says why)"
            )
        return (
            f"rank {self.rank}: {what} waited more than parallel.timeout_s = {self.timeout_s:g} s for the other ranks; "
            f"{self.late_ranks()}; if that phase is legitimately slow, raise --parallel.timeout_s"
        )

    def late_ranks(self) -> str:
        """Which ranks are late: every rank that misses a ``monitored_barrier`` (rank 0 knows them all)."""
        check_s = min(self.timeout_s, MAX_CHECK_S)
        try:
            dist.monitored_barrier(group=self.group, timeout=timedelta(seconds=check_s), wait_all_ranks=True)
        except RuntimeError as exc:
            found = _LATE.search(str(exc))
            if found:
                ranks = [r.strip() for r in found.group(1).split(",") if r.strip()]
                label = "rank" if len(ranks) == 1 else "ranks"
                return f"late: {label} {', '.join(ranks)} (did not reach a check within {check_s:g} s)"
            if self.rank != 0 and self.world_size == 2:
                return f"late: rank 0 (did not answer a check within {check_s:g} s)"
            if self.rank != 0:
                return "late: rank 0 or a rank it waited for (rank 0's message names them)"
            return "the late ranks could not be checked (a rank's connection is gone)"
        return (
            "every rank answered a check afterwards, so the ranks were in different collectives (a desynchronised run)"
        )
