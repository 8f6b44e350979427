"""Run a function in N processes joined by a gloo process group, as ``torchrun`` would.

Each rank gets the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT`` on a free port) and an initialised default process group.
A failure in any rank fails the whole run with that rank's traceback; a hang past
``timeout`` fails it with every live rank's stack; no process outlives the call.

The ranks are forked from Python's fork server (``forkserver``, Python's default start method on Linux from 3.14)
with torch imported once in that server (``PRELOAD``), not spawned as fresh interpreters that each import torch
again: 4 ranks start in ~0.1 s instead of 8-9 s on 2 busy cores, and the test suites call this ~100 times. The
server only imports (no torch op has run there, so no thread pool exists to be lost in a fork). Multiprocessing
hands each rank the caller's ``sys.path`` and working directory at the call, and ``_child`` installs the caller's
environment. Unlike spawned ranks: what torch reads from the environment while it is imported (``TORCH_LOGS``,
``TORCH_DISTRIBUTED_DEBUG``, OpenMP's variables) is the server's, i.e. the environment of the first call in this
process; the ranks write to the stdout/stderr the server was started with (pytest's session-wide capture); they
share the server's string-hash seed; and they end with ``os._exit``, so ``atexit`` handlers do not run in them
(after the suites' runs no process of a rank was left behind). Where there is no fork server (not POSIX), the
ranks are spawned.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import importlib
import multiprocessing as mp
import os
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

#: Modules the fork server imports once for every rank it forks (module docstring).
PRELOAD = ("torch", "torch.distributed")

#: Seconds the other ranks get to finish after one rank failed (they are often stuck in a
#: collective waiting for it).
FAILURE_GRACE_S = 3.0


class DistributedTestError(AssertionError):
    """One or more ranks failed or hung; the message carries their tracebacks."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _ByName:
    """A picklable pointer to a decorated test function: module + qualified name."""

    def __init__(self, module: str, qualname: str) -> None:
        self.module, self.qualname = module, qualname

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        obj: Any = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj.__wrapped__(*args, **kwargs)


def rank_threads(world_size: int) -> int:
    """Intra-op threads each of ``world_size`` ranks on this machine gets: its share of the cores, at least 1."""
    return max(1, (os.cpu_count() or 1) // max(1, world_size))


def _start_context() -> Any:
    """The multiprocessing context the ranks start from (module docstring)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))  # read when the server starts: the first call of a process
    return context


def _child(
    environ: dict[str, str],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    stack_dir: str,
    target: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    results: Any,
) -> None:
    os.setpgrp()  # our own process group, so the parent can kill whatever we start
    os.environ.clear()  # the caller's environment now, not the fork server's of its first call
    os.environ.update(environ)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    stack_file = open(Path(stack_dir) / f"rank{rank}.stack", "w")  # noqa: SIM115 - lives as long as the process
    faulthandler.dump_traceback_later(max(timeout_s - 2.0, 1.0), exit=False, file=stack_file)
    import torch
    import torch.distributed as dist

    # the ranks share the machine's cores: each gets its share of intra-op threads, not all of them
    torch.set_num_threads(rank_threads(world_size))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        target(*args, **kwargs)
        results.put((rank, None))
    except BaseException:
        results.put((rank, traceback.format_exc()))
    finally:
        faulthandler.cancel_dump_traceback_later()
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _kill(process: mp.process.BaseProcess) -> None:
    if process.pid is None or not process.is_alive():
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    **kwargs: Any,
) -> None:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; raise if any rank fails.

    ``fn`` and its arguments must be picklable (a module-level function). With
    ``world_size == 1`` the function runs in this process with no process group, which is
    how a single-process run of mcore works.
    """
    if world_size < 1:
        raise ValueError(f"world_size = {world_size}: must be >= 1")
    if world_size == 1:
        fn(*args, **kwargs)
        return
    ctx = _start_context()
    results = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mcore-dist-") as stack_dir:
        procs = [
            ctx.Process(
                target=_child,
                args=(dict(os.environ), rank, world_size, port, backend, timeout, stack_dir, fn, args, kwargs, results),
                name=f"mcore-rank{rank}",
            )
            for rank in range(world_size)
        ]
        failures: dict[int, str] = {}
        done: set[int] = set()
        try:
            for p in procs:
                p.start()
            deadline = time.monotonic() + timeout
            while len(done) < world_size:
                now = time.monotonic()
                if failures:
                    deadline = min(deadline, now + FAILURE_GRACE_S)
                if now > deadline:
                    break
                try:
                    rank, error = results.get(timeout=0.2)
                except Exception:
                    for rank, p in enumerate(procs):
                        if rank not in done and p.exitcode is not None and results.empty():
                            time.sleep(0.2)  # let a last queue write land
                            if results.empty():
                                done.add(rank)
                                failures[rank] = f"rank {rank} exited with code {p.exitcode} without reporting"
                    continue
                done.add(rank)
                if error is not None:
                    failures[rank] = error
        finally:
            for p in procs:
                _kill(p)
            for p in procs:
                p.join(timeout=5)
            results.close()
        hung = [r for r in range(world_size) if r not in done]
        if not failures and not hung:
            return
        parts = []
        for rank in sorted(failures):
            parts.append(f"--- rank {rank} failed ---\n{failures[rank]}")
        for rank in hung:
            stack = (
                (Path(stack_dir) / f"rank{rank}.stack").read_text()
                if (Path(stack_dir) / f"rank{rank}.stack").exists()
                else ""
            )
            reason = "was stopped after another rank failed" if failures else f"did not finish within {timeout:.0f} s"
            parts.append(f"--- rank {rank} {reason} ---\n{stack or '(no stack dump)'}")
        name = getattr(fn, "qualname", getattr(fn, "__qualname__", repr(fn)))
        raise DistributedTestError(f"distributed run of {name} on {world_size} ranks failed:\n" + "\n".join(parts))


def distributed(world_size: int = 2, *, timeout: float = 120.0, backend: str = "gloo") -> Callable[[F], F]:
    """Decorate a module-level test so its body runs on ``world_size`` gloo ranks.

    Pytest fixtures requested by the test (``tmp_path``...) are passed to every rank.
    """

    def decorate(fn: F) -> F:
        target = _ByName(fn.__module__, fn.__qualname__)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            run_distributed(target, world_size, *args, timeout=timeout, backend=backend, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
