"""A rank that waits for a stopped or lagging rank ends with one line within ``parallel.timeout_s``.

The judge on its own; two heartbeats on a real ``HashStore`` in one process (one stopped, one
behind, both in one long phase); then ``python -m mcore train`` on two processes joined as torchrun
joins them: a rank SIGSTOPped mid-run, a rank that falls behind, and every rank in a long phase.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from test_train_loop import make_corpus

from mcore.train.heartbeat import DONE, ENDED, Heartbeat, Record, check_seconds, judge
from mcore_testing.dist import free_port

TIMEOUT_S = 5.0


# -- the judge ------------------------------------------------------------------------------


def test_judge_names_stopped_and_behind_ranks_and_lets_finished_and_ahead_ones_be() -> None:
    mine = Record(40, 10, "gradient sync of step 3")
    first = {
        0: Record(39, 10, "gradient sync of step 3"),
        1: Record(7, 9, "after forward/backward of step 3"),  # behind, alive
        2: Record(12, 10, "gradient sync of step 3"),  # same place, stopped
        3: Record(3, 8, "after gradient norm of step 2", DONE),  # ended its run: never late
        7: Record(30, 10, "gradient sync of step 3", ENDED),  # ended on a hang it saw: not late either
        4: Record(20, 12, "gradient norm of step 3"),  # ahead, alive
        6: Record(5, 11, "after gradient sync of step 3"),  # ahead, gone
    }
    second = {**first, 1: Record(9, 9, "after forward/backward of step 3"), 4: Record(22, 12, "x"), 5: None}
    message = judge(0, mine, 41.7, 60.0, 6.0, first, {**second, 0: mine})
    assert message == (
        "rank 0: gradient sync of step 3 waited 42 s for the other ranks (parallel.timeout_s = 60 s); late: "
        "rank 2 (no heartbeat for 6 s: stopped or gone; last in gradient sync of step 3), "
        "rank 5 (no heartbeat for 6 s: stopped or gone; it never published one), "
        "rank 6 (no heartbeat for 6 s: stopped or gone; it was ahead of this rank, in after gradient sync of step 3); "
        "behind it: rank 1 (alive, still in after forward/backward of step 3); "
        "if that phase is legitimately slow, raise --parallel.timeout_s"
    )
    everyone_fine = {0: mine, 4: Record(22, 12, "x"), 3: first[3]}
    assert (
        judge(0, mine, 50.0, 60.0, 6.0, {0: mine, 4: Record(20, 12, "x"), 3: everyone_fine[3]}, everyone_fine) is None
    )
    gave_up = {0: Record(39, 10, "gradient sync of step 3", ENDED), 4: Record(20, 12, "x")}
    moving = {**gave_up, 4: Record(22, 12, "x")}
    left_behind = judge(1, Record(3, 9, "after forward/backward of step 3"), 44.0, 60.0, 6.0, gave_up, moving)
    assert left_behind is not None and left_behind.startswith("rank 1: after forward/backward of step 3 has lasted")


def test_rank_0_stays_only_for_live_peers_at_its_place_or_later() -> None:
    mine = Record(40, 10, "gradient sync of step 3", ENDED)
    seen = {0: mine, 1: Record(7, 10, "gradient sync of step 3"), 2: Record(5, 9, "after x"), 3: Record(2, 10, "y")}
    waiting = {**seen, 1: Record(8, 10, "gradient sync of step 3")}  # rank 1 waits too and has not decided
    assert Heartbeat.peers_still_judging(mine, seen, waiting)
    decided = {**waiting, 1: Record(9, 10, "gradient sync of step 3", ENDED)}
    behind_and_stopped = {**decided, 2: Record(6, 9, "after x")}  # rank 2 behind (named late), rank 3 stopped
    assert not Heartbeat.peers_still_judging(mine, seen, behind_and_stopped)


def test_records_round_trip_and_the_check_is_a_fifth_of_the_timeout_at_most_30_s() -> None:
    for record in (Record(5, 2 * 7 + 1, "after checkpoint save of step 7 | with a bar"), Record(1, 4, "x", ENDED)):
        assert Record.decode(record.encode()) == record
    with pytest.raises(ValueError):
        Record.decode(b"1|2|sleeping|x")
    assert check_seconds(600) == 30.0 and check_seconds(5) == 1.0


# -- two heartbeats on one store ------------------------------------------------------------


class Hangs:
    """Collects ``on_hang`` calls (instead of ending this process) and when they came."""

    def __init__(self) -> None:
        self.messages: list[tuple[float, str]] = []
        self.event = threading.Event()

    def __call__(self, message: str) -> None:
        self.messages.append((time.monotonic(), message))
        self.event.set()


def pair(store: Any, timeout_s: float = TIMEOUT_S) -> tuple[Heartbeat, Heartbeat, Hangs, Hangs]:
    h0, h1 = Hangs(), Hangs()
    a = Heartbeat(store, rank=0, world_size=2, timeout_s=timeout_s, on_hang=h0)
    b = Heartbeat(store, rank=1, world_size=2, timeout_s=timeout_s, on_hang=h1)
    return a, b, h0, h1


def test_a_stopped_peer_ends_the_waiting_rank_before_the_timeout() -> None:
    waiting, stopped, hangs, _ = pair(dist.PrefixStore("t1", dist.HashStore()))
    stopped.enter("forward/backward of step 2")
    stopped.publish()  # then nothing: its thread never runs, as in a SIGSTOPped process
    waiting.start()
    try:
        waiting.enter("gradient sync of step 2")
        t0 = time.monotonic()
        assert hangs.event.wait(4 * TIMEOUT_S), "no verdict"
        (at, message), *_ = hangs.messages
        assert at - t0 < TIMEOUT_S, f"the verdict came {at - t0:.1f} s after the wait began"
        assert re.fullmatch(
            r"rank 0: gradient sync of step 2 waited \d+ s for the other ranks \(parallel\.timeout_s = 5 s\); late: "
            r"rank 1 \(no heartbeat for 1 s: stopped or gone; last in forward/backward of step 2\); "
            r"if that phase is legitimately slow, raise --parallel\.timeout_s",
            message,
        ), message
    finally:
        waiting.close()


def test_a_rank_behind_is_named_and_one_long_phase_on_every_rank_is_no_hang() -> None:
    ahead, behind, hangs_ahead, hangs_behind = pair(dist.PrefixStore("t2", dist.HashStore()))
    ahead.start(), behind.start()
    try:
        for h in (ahead, behind):  # one long phase on both ranks: a first-step compile
            h.enter("forward/backward of step 1")
        time.sleep(1.5 * TIMEOUT_S)
        assert not hangs_ahead.messages and not hangs_behind.messages
        ahead.leave(), behind.leave()
        ahead.enter("gradient sync of step 1")  # now rank 1 stays behind, alive
        assert hangs_ahead.event.wait(4 * TIMEOUT_S), "no verdict"
        message = hangs_ahead.messages[0][1]
        assert "late: rank 1 (alive, still in after forward/backward of step 1)" in message, message
        # the rank behind judged rank 0 alive and ahead (no verdict); once rank 0 ended, it says so in turn
        assert hangs_behind.event.wait(4 * TIMEOUT_S), "no verdict on the rank left behind"
        message_behind = hangs_behind.messages[0][1]
        assert re.fullmatch(
            r"rank 1: after forward/backward of step 1 has lasted \d+ s, and the run ended on a hang: rank 0 \(in "
            r"gradient sync of step 1\) waited more than the timeout for the other ranks \(their lines name the "
            r"late ones\)",
            message_behind,
        ), message_behind
    finally:
        ahead.close(), behind.close()


def test_a_finished_rank_is_not_waited_on_and_close_stops_the_thread() -> None:
    store = dist.PrefixStore("t3", dist.HashStore())
    waiting, done, hangs, _ = pair(store, timeout_s=2.5)
    done.start().close()
    assert not done.thread.is_alive()
    waiting.start()
    try:
        waiting.enter("a background checkpoint save")
        time.sleep(2.5 * 1.5)
        assert not hangs.messages
    finally:
        waiting.close()
    assert Record.decode(store.get("0")).state == DONE


def test_a_garbled_record_reads_as_none_and_a_tiny_timeout_does_not_spin() -> None:
    store = dist.PrefixStore("t4", dist.HashStore())
    beat = Heartbeat(store, rank=0, world_size=3, timeout_s=1e-6, on_hang=Hangs())
    assert beat.beat_s >= 0.05
    beat.publish()
    store.set("1", b"not|a record")
    assert beat.read() == {0: Record.decode(store.get("0")), 1: None, 2: None}


# -- two `mcore train` processes ------------------------------------------------------------


def launch(
    tmp_path: Path, corpus: str, *, sleep: str | None = None, steps: int = 100000, world: int = 2, device: str = "cpu"
) -> list[subprocess.Popen[str]]:
    """``python -m mcore train`` on ``world`` ranks joined through ``MASTER_ADDR:MASTER_PORT``, as torchrun joins them."""
    port = free_port()
    args = [
        f"--parallel.device={device}",
        "--model.name=sleepy-tiny",
        "--model.vocab_size=257",
        "--model.hidden_size=32",
        "--model.max_seq_len=32",
        "--optimizer.name=reference-adamw",
        "--parallel.layouts=test-ddp",
        f"--parallel.timeout_s={TIMEOUT_S}",
        f"--train.steps={steps}",
        "--train.seq_len=16",
        f"--train.global_batch_size={4 * world}",  # one micro-batch of 4 rows a rank: forward call n is step n
        "--train.micro_batch_size=4",
        "--train.cpu_threads=1",
        f"--train.out_dir={tmp_path / 'run'}",
        f"--data.source={corpus}",
        "--data.workers=0",
        "--log.progress=lines",
        "--log.every=1",
        "--log.tensorboard=false",
        "--log.plot=false",
        "--checkpoint.every=0",
    ]
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "MCORE_PLUGINS": "mcore_testing.plugin,mcore_testing.cli_plugin",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        env.pop("MCORE_TEST_SLEEP", None)
        if sleep is not None:
            env["MCORE_TEST_SLEEP"] = sleep
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "mcore", "train", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    return procs


def finish(procs: list[subprocess.Popen[str]], limit_s: float = 120.0) -> list[tuple[int, str]]:
    """Every process's ``(exit code, stderr)``; none outlives ``limit_s``."""
    timers = [threading.Timer(limit_s, p.kill) for p in procs]
    for t in timers:
        t.start()
    try:
        return [(p.wait(), p.communicate()[1]) for p in procs]
    finally:
        for t in timers:
            t.cancel()
        for p in procs:
            if p.poll() is None:
                p.kill()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mcore: error: ")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_corpus(tmp_path_factory.mktemp("data"))


def stop_one_rank(tmp_path: Path, corpus: str, *, world: int, device: str) -> None:
    """SIGSTOP the last rank of a training run at step 3: every other rank ends with one line naming it, in time."""
    procs = launch(tmp_path, corpus, world=world, device=device)
    *waiting, stopped = procs
    ended: list[tuple[int, float, str]] = []
    try:
        assert waiting[0].stderr is not None
        seen = []
        for line in waiting[0].stderr:  # rank 0 reports steps: every rank is training
            seen.append(line)
            if line.startswith("step 3"):
                break
        assert seen and seen[-1].startswith("step 3"), "".join(seen)
        os.kill(stopped.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        for p in waiting:
            code = p.wait(timeout=6 * TIMEOUT_S)
            assert p.stderr is not None
            ended.append((code, time.monotonic() - stopped_at, p.stderr.read()))
    finally:
        os.kill(stopped.pid, signal.SIGKILL)
        finish(procs)
    late = world - 1
    for rank, (code, ended_after, stderr) in enumerate(ended):
        assert code == 2, stderr
        (line,) = error_lines(stderr)
        assert re.fullmatch(
            rf"mcore: error: rank {rank}: .+ waited \d+ s for the other ranks \(parallel\.timeout_s = 5 s\); late: "
            rf"rank {late} \(no heartbeat for 1 s: stopped or gone; (last in|it was ahead of this rank, in) [^)]+\); "
            r"(behind it: (rank \d+ \(alive, still in [^)]+\)(, )?)+; )?if that phase is legitimately slow, raise --parallel\.timeout_s",
            line,
        ), line
        assert "Traceback" not in stderr, stderr
        # The wait began after the stop (a step lasts milliseconds): each rank ended within the timeout
        # (the processes are waited for in rank order, so a later rank's time is an upper bound).
        assert ended_after < TIMEOUT_S + 1.0, f"rank {rank} ended {ended_after:.1f} s after rank {late} stopped"


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_a_sigstopped_rank_ends_every_other_rank_with_one_line_within_the_timeout(
    tmp_path: Path, corpus: str, world: int
) -> None:
    stop_one_rank(tmp_path, corpus, world=world, device="cpu")


@pytest.mark.gpu
def test_on_nccl_a_sigstopped_rank_ends_every_other_rank_with_one_line_within_the_timeout(
    tmp_path: Path, corpus: str
) -> None:
    """The NCCL watchdog would abort the processes at the timeout; the heartbeat ends them first, in one line each."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip(f"needs 2 or more GPUs for NCCL ranks on distinct devices; this machine has {gpus}")
    stop_one_rank(tmp_path, corpus, world=min(gpus, 8), device="cuda")


def test_a_rank_behind_is_named_and_every_rank_ends_with_a_line(tmp_path: Path, corpus: str) -> None:
    procs = launch(tmp_path, corpus, sleep=f"1:3:{20 * TIMEOUT_S}")  # rank 1 sleeps in its 3rd forward
    results = finish(procs)
    (code0, err0), (code1, err1) = results
    assert code0 == 2 and code1 == 2, results
    (line0,) = error_lines(err0)
    assert line0.startswith(
        "mcore: error: rank 0: "
    ) and "late: rank 1 (alive, still in forward/backward of step 3)" in (line0), line0
    # the sleeper outlives rank 0 and sees that it ended the run (or, when rank 0 was the store's host and left
    # first, that the store is gone)
    (line1,) = error_lines(err1)
    assert line1.startswith("mcore: error: rank 1: forward/backward of step 3 "), line1
    assert "the run ended on a hang: rank 0 (in " in line1 or "the launcher's store stopped answering" in line1, line1
    assert "Traceback" not in err0 + err1


def test_one_long_phase_on_every_rank_is_not_a_hang(tmp_path: Path, corpus: str) -> None:
    procs = launch(tmp_path, corpus, sleep=f"*:2:{1.3 * TIMEOUT_S}", steps=4)  # every rank sleeps in step 2
    (code0, err0), (code1, err1) = finish(procs)
    assert code0 == 0 and code1 == 0, err0 + err1
    assert "forward/backward of step 2 has lasted" in err0 and "(a long phase, not a hang)" in err0, err0
    assert not error_lines(err0 + err1)
