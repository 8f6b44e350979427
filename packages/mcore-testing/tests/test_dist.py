"""The multi-process runner: results, failures, hangs, fixtures, and no orphans."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mcore_testing import DistributedTestError, distributed, run_distributed


@distributed(world_size=2)
def test_ranks_share_a_gloo_group_and_fixtures(tmp_path: Path) -> None:
    assert dist.get_backend() == "gloo" and dist.get_world_size() == 2
    assert os.environ["WORLD_SIZE"] == "2" and int(os.environ["RANK"]) == dist.get_rank()
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    assert t.item() == 3.0
    (tmp_path / f"rank{dist.get_rank()}").write_text(str(os.getpid()))


def _fail_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 would wait forever: the runner must stop it


def _hang_on_rank_zero(pid_dir: str) -> None:
    Path(pid_dir, f"{dist.get_rank()}.pid").write_text(str(os.getpid()))
    if dist.get_rank() == 0:
        time.sleep(600)


def _exit_without_reporting() -> None:
    if dist.get_rank() == 1:
        os._exit(7)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0); read its state
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_failing_rank_fails_the_run_with_its_traceback() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as err:
        run_distributed(_fail_on_rank_one, 2, timeout=60)
    message = str(err.value)
    assert "--- rank 1 failed ---" in message and "ValueError: boom on rank 1" in message
    # rank 0 was blocked in a barrier: it either errors out (peer closed) or is stopped
    assert "--- rank 0 failed ---" in message or "rank 0 was stopped after another rank failed" in message
    assert time.monotonic() - start < 30  # the stuck rank is not waited on until the timeout


def test_hang_fails_with_stack_and_leaves_no_process(tmp_path: Path) -> None:
    with pytest.raises(DistributedTestError) as err:
        run_distributed(_hang_on_rank_zero, 2, str(tmp_path), timeout=8)
    message = str(err.value)
    assert "--- rank 0 did not finish within 8 s ---" in message and "_hang_on_rank_zero" in message
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2
    time.sleep(0.5)
    assert not any(_alive(pid) for pid in pids)


def test_rank_that_dies_silently_is_reported() -> None:
    with pytest.raises(DistributedTestError, match="rank 1 exited with code 7 without reporting"):
        run_distributed(_exit_without_reporting, 2, timeout=60)


def test_world_size_one_runs_in_process() -> None:
    seen = []
    run_distributed(seen.append, 1, 5)
    assert seen == [5] and not dist.is_initialized()


def test_bad_world_size() -> None:
    with pytest.raises(ValueError, match="world_size = 0"):
        run_distributed(print, 0)


def _threads_are_shared() -> None:
    import torch

    from mcore_testing.dist import rank_threads

    assert torch.get_num_threads() == rank_threads(2) == max(1, (os.cpu_count() or 1) // 2)


def test_ranks_share_the_cores() -> None:
    run_distributed(_threads_are_shared, 2, timeout=60)
