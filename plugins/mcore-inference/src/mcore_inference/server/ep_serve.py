"""``mcore serve PATH --ep N`` under torchrun: one engine per rank, the model's experts sharded over the ranks.

Why it exists: ``LockstepEngine`` (``lockstep.py``) serves a model sharded by the ``ep`` layout, but someone has to
start the ranks. ``torchrun --nproc-per-node N -m mcore serve PATH --ep N`` starts N processes; each one

* checks torchrun's environment (``RANK``, ``WORLD_SIZE`` = ``--ep``) before loading anything;
* loads the checkpoint whole (mcore or Hugging Face directory, as ``LLM`` does) and checks it against the layout
  before any process group exists (no moe block, experts not divisible by ``--ep``: one line, exit 2); then applies
  the layout registered as ``ep`` (the core's registry: mcore-moe's, never imported from here) with the
  ``allgatherv`` dispatcher over the ``ep`` dimension of the core's mesh: each rank keeps ``E / N`` experts of
  every moe block;
* builds its ``LLM`` with the same options and seed (``--seed``, default 0) and a gloo group for the lockstep
  records, whose timeout (``--lockstep-timeout`` seconds) also bounds the mesh's collectives;
* rank 0 serves HTTP from an ``EngineLoop`` in its own process (``--engine-process`` does not apply: the engine
  must live in the rank that holds its shard of the model), which sends keepalives while idle and the stop record
  at shutdown; every other rank ``follow()``s until that record, then exits 0.

Stopping: SIGINT/SIGTERM on rank 0 is uvicorn's graceful shutdown, which ends with the stop record. A follower
that gets the signal too (torchrun forwards it to every rank; a terminal's Ctrl-C reaches the whole process group)
keeps following until the leader's stop record (a second signal kills it). Lost ranks: a follower that dies fails
rank 0's next record or step (gloo: connection closed); one that hangs may not (a broadcast from rank 0 can complete
while its receiver's socket takes the bytes), so every rank also runs a ``Heartbeat`` (an all-reduce over a gloo
group every ``min(2, timeout / 4)`` seconds), which fails within the timeout. Either way rank 0 shuts the server
down and exits 1 with a one-line message. A leader that dies fails the followers' wait the same way (exit 1).

Limits: each rank loads the whole model before sharding it (host memory for the full checkpoint on every rank);
on a GPU without ``--num-blocks`` each rank sizes its cache from its own free memory, and ranks that disagree are
refused (the lockstep fingerprint): give ``--num-blocks``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from types import FrameType
from typing import Any

from mcore.errors import UserError
from mcore_inference.lockstep import LockstepEngine

#: The dispatcher the ``ep`` layout gets for serving (fixed-capacity buffers: no host sync, capturable).
DISPATCHER = "allgatherv"
#: Longest pause between an idle leader's records (seconds); shorter when the timeout is short.
KEEPALIVE_S = 10.0
#: Longest pause between two liveness checks of every rank (seconds); shorter when the timeout is short.
HEARTBEAT_S = 2.0


def launch_ranks(ep: int, env: Mapping[str, str]) -> tuple[int, int]:
    """``(rank, local_rank)`` from torchrun's environment, checked against ``--ep`` (one-line ``UserError``s)."""
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        raise UserError(f"--ep {ep!r}: must be an int >= 1 (the number of ranks the experts are split over)")
    missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
    if missing:
        raise UserError(
            f"--ep {ep}: {' and '.join(missing)} not set (not started by torchrun); allowed: "
            f"torchrun --nproc-per-node {ep} -m mcore serve PATH --ep {ep}"
        )
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))
    except ValueError:
        raise UserError(f"--ep {ep}: RANK = {env['RANK']!r}, WORLD_SIZE = {env['WORLD_SIZE']!r}: not ints") from None
    if world != ep:
        raise UserError(
            f"--ep {ep} but WORLD_SIZE = {world}; allowed: --ep equal to the number of processes "
            f"(torchrun --nproc-per-node {ep})"
        )
    return rank, local


class _ServingLockstep(LockstepEngine):
    """``LockstepEngine`` that keeps the first failure of a record or step (a rank gone) for the exit message."""

    error: BaseException | None = None

    def step(self) -> Any:
        return self._noting(super().step)

    def keepalive(self) -> bool:
        return bool(self._noting(super().keepalive))

    def stop(self) -> None:
        self._noting(super().stop)

    def _noting(self, call: Any) -> Any:
        try:
            return call()
        except Exception as exc:
            if self.error is None:
                self.error = exc
            raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def shard_over_ep(model: Any, mesh: Any, ep: int) -> Any:
    """``model`` with its moe blocks' experts split over ``mesh``'s ``ep`` dimension by the registered ``ep``
    layout (``allgatherv`` dispatcher); its refusals (no moe block, experts not divisible) as ``UserError``.
    ``mesh`` without a device mesh (before the process group exists) only checks: the model is left whole."""
    from mcore.plugins import load_plugins

    host = load_plugins()
    try:
        layout_cls = host.load("layout", "ep")
    except Exception as exc:  # not installed, or fails to import
        raise UserError(f"--ep {ep}: no 'ep' layout installed ({_first_line(exc)}); pip install mcore-moe") from None
    layout = layout_cls(layout_cls.Config(dispatcher=DISPATCHER))
    try:
        return layout.apply(model, mesh)
    except ValueError as exc:
        raise UserError(f"--ep {ep}: {str(exc).splitlines()[0]}") from None


def serve_ep(args: Any, options: dict[str, Any], common: dict[str, Any], template: str | None) -> int:
    """Run this rank of ``mcore serve --ep`` (module docstring); the exit code."""
    import torch
    import torch.distributed as dist

    from mcore.mesh import ParallelMesh, build_mesh
    from mcore_inference.llm import LLM, _dtype, load_model

    ep = args.ep
    rank, local_rank = launch_ranks(ep, os.environ)
    timeout = args.lockstep_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise UserError(f"--lockstep-timeout {timeout!r}: must be > 0 (seconds)")
    if rank == 0 and args.engine_process:
        print("mcore serve: --engine-process does not apply with --ep: the engine runs in each rank's own process",
              file=sys.stderr)  # fmt: skip
    want = _dtype(options.pop("dtype"))
    device = torch.device(options.pop("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        want = torch.bfloat16 if want is None else want
    model, tokenizer = load_model(args.path, device)
    if want is not None:
        model = model.to(want)
    shard_over_ep(model, ParallelMesh(("ep",), (ep,), device.type, None, local_rank), ep)  # refusals, no group yet
    mesh = build_mesh(["ep"], {"ep": ep}, device_type=device.type, timeout_s=float(timeout))
    beat: Heartbeat | None = None
    try:
        span = timedelta(seconds=float(timeout))
        group = dist.new_group(backend="gloo", timeout=span)
        beat = Heartbeat(dist.new_group(backend="gloo", timeout=span), interval_s=min(HEARTBEAT_S, timeout / 4))
        model = shard_over_ep(model, mesh, ep)
        print(f"mcore serve: rank {rank} of {ep}: {_sharding(model)}", file=sys.stderr)
        seed = options.pop("seed")
        if options.get("overlap_decode") is None:  # lockstep ranks with overlap: not yet run on several GPUs
            options["overlap_decode"] = False
        llm = LLM(model, tokenizer=tokenizer, seed=0 if seed is None else seed, lockstep_group=group, **options)
        lock = _ServingLockstep(llm.engine, keepalive_s=min(KEEPALIVE_S, timeout / 4))
        if rank == 0:
            return _lead(lock, beat, args, common, template)
        return _follow(lock, beat)
    finally:
        if dist.is_initialized() and (beat is None or not beat.alive):  # never under a thread in a collective
            dist.destroy_process_group()


def _sharding(model: Any) -> str:
    """What this rank holds of the tensors the layout sharded (rows of the first dimension)."""
    from torch.distributed.tensor import DTensor

    sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
    if not sharded:
        return "no tensor is sharded"
    rows, local = sharded[0].shape[0], sharded[0].to_local().shape[0]
    first = sharded[0].device_mesh.get_local_rank(0) * local
    return f"{len(sharded)} expert tensors sharded, rows {first}..{first + local - 1} of {rows} of each"


class Heartbeat:
    """Every rank's liveness, both ways: a thread per rank all-reduces a flag over ``group`` (gloo, with a timeout)
    every ``interval_s`` seconds. The lockstep records are broadcasts from rank 0, which may complete while a hung
    receiver's socket still takes the bytes; an all-reduce needs every rank, so a rank that died or hangs fails
    the others' next beat (connection closed, or the group's timeout): ``lost`` is set, ``error`` kept,
    ``on_lost`` called. ``finish()`` on any rank ends every rank's beats at the next one (the flag is a max)."""

    def __init__(self, group: Any, *, interval_s: float) -> None:
        self.group = group
        self.interval_s = interval_s
        self.error: BaseException | None = None
        self.lost = threading.Event()
        self.on_lost: Any = None
        self._finish = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mcore-ep-heartbeat", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def finish(self, timeout: float) -> None:
        """End the beats (every rank's, at the next one) and wait at most ``timeout`` seconds for this one's."""
        self._finish.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        import torch
        import torch.distributed as dist

        while True:
            flag = torch.tensor([1.0 if self._finish.is_set() else 0.0])
            try:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            except Exception as exc:
                self.error = exc
                self.lost.set()
                if self.on_lost is not None:
                    self.on_lost()
                return
            if flag.item() > 0:
                return
            self._finish.wait(self.interval_s)


def _lead(lock: _ServingLockstep, beat: Heartbeat, args: Any, common: dict[str, Any], template: str | None) -> int:
    """Rank 0: serve HTTP until SIGINT/SIGTERM or a lost rank; 0 after a clean stop, else 1 with a message."""
    import uvicorn

    from mcore_inference.server.app import build_app
    from mcore_inference.server.cli import _quiet_exit_server

    app = build_app(lock, chat_template=template, max_waiting=args.max_waiting, **common)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.shutdown_timeout)  # fmt: skip
    server = _quiet_exit_server()(config)
    loop = app.state.engine_loop
    stopped_loop = threading.Event()
    done = threading.Event()

    def stop_serving() -> None:
        server.should_exit = True

    def watch() -> None:  # the engine loop stops on its own only when a record or step failed (a rank gone)
        while not done.wait(0.2):
            if server.started and not server.should_exit and not loop.running:
                stopped_loop.set()
                stop_serving()
                return

    beat.on_lost = stop_serving
    beat.start()
    watchdog = threading.Thread(target=watch, name="mcore-ep-watchdog", daemon=True)
    watchdog.start()
    try:
        server.run()
    finally:
        done.set()
        watchdog.join(5)
        loop.stop()  # a no-op after the lifespan's; the thread is gone before this one sends a record
        if not lock.stopped and not beat.lost.is_set():
            with contextlib.suppress(Exception):  # the server ended before its lifespan sent the stop record
                lock.stop()
        beat.finish(beat.interval_s + 30)
    error = beat.error or lock.error
    if error is not None or stopped_loop.is_set():
        reason = _first_line(error) if error is not None else "the engine loop stopped"
        print(f"mcore: error: --ep {lock.size}: rank 0 lost a rank that follows ({reason}); stopped serving",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"mcore serve: rank 0 of {lock.size} stopped after {lock.lockstep_steps} lockstep steps", file=sys.stderr)
    return 0


def _follow(lock: LockstepEngine, beat: Heartbeat) -> int:
    """A rank that follows: replay the leader's steps until its stop record; 0, or 1 with a message when the
    leader is gone (or this rank diverged)."""

    def defer(sig: int, _: FrameType | None) -> None:  # the leader's shutdown sends the stop record
        print(f"mcore serve: rank {lock.rank} got signal {sig}: waiting for rank 0's stop record (again: exit now)",
              file=sys.stderr)  # fmt: skip
        signal.signal(sig, signal.SIG_DFL)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, defer)
    beat.start()
    start = time.monotonic()
    try:
        steps = lock.follow()
    except Exception as exc:
        print(f"mcore: error: --ep {lock.size}: rank {lock.rank} lost the leader, rank 0 ({_first_line(exc)})",
              file=sys.stderr)  # fmt: skip
        return 1
    finally:
        beat.finish(beat.interval_s + 30)
    took = time.monotonic() - start
    print(f"mcore serve: rank {lock.rank} of {lock.size} stopped after {steps} lockstep steps ({took:.0f} s)",
          file=sys.stderr)  # fmt: skip
    return 0
