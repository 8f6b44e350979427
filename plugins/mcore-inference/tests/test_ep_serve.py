"""``server/ep_serve.py`` pieces without a model: torchrun's environment checked against ``--ep`` (one line each),
and the ``Heartbeat`` over two gloo ranks: ``finish()`` on one rank ends both ranks' beats, and a rank that stops
beating fails the other's next beat within the group's timeout (``lost``, ``error``, ``on_lost``). The whole
``mcore serve --ep`` (model, HTTP, torchrun) is ``integration_tests/test_serve_ep.py``."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
from mcore_inference.server.ep_serve import Heartbeat, launch_ranks

from mcore.errors import UserError
from mcore_testing.dist import run_distributed


def test_launch_ranks_reads_torchrun_env_and_refuses_bad_launches_in_one_line() -> None:
    assert launch_ranks(2, {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 1)
    assert launch_ranks(1, {"RANK": "0", "WORLD_SIZE": "1"}) == (0, 0)
    cases = [
        (2, {}, r"^--ep 2: RANK and WORLD_SIZE not set \(not started by torchrun\); allowed: torchrun "),
        (2, {"RANK": "0"}, r"^--ep 2: WORLD_SIZE not set"),
        (2, {"RANK": "0", "WORLD_SIZE": "4"}, r"^--ep 2 but WORLD_SIZE = 4; allowed: --ep equal to the number"),
        (2, {"RANK": "x", "WORLD_SIZE": "2"}, r"^--ep 2: RANK = 'x', WORLD_SIZE = '2': not ints$"),
        (0, {"RANK": "0", "WORLD_SIZE": "1"}, r"^--ep 0: must be an int >= 1"),
    ]
    for ep, env, match in cases:
        with pytest.raises(UserError, match=match) as info:
            launch_ranks(ep, env)
        assert "\n" not in str(info.value)


def _beats() -> None:
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=2))
    rank = dist.get_rank()
    # finish() on rank 1 alone ends both ranks' beats, without error
    beat = Heartbeat(group, interval_s=0.05)
    beat.start()
    time.sleep(0.3)
    if rank == 1:
        beat.finish(10)
    else:
        beat._thread.join(10)  # ends at the beat after rank 1's finish
    assert not beat.alive and beat.error is None and not beat.lost.is_set()
    dist.barrier()
    # rank 1 stops beating (never starts): rank 0's next beat fails at the group's timeout
    beat = Heartbeat(dist.new_group(backend="gloo", timeout=timedelta(seconds=2)), interval_s=0.05)
    called = threading.Event()
    beat.on_lost = called.set
    if rank == 0:
        start = time.monotonic()
        beat.start()
        assert beat.lost.wait(20), "a silent rank was not noticed"
        assert called.is_set() and beat.error is not None and time.monotonic() - start < 15
        assert not beat.alive
    dist.barrier()


def test_heartbeat_ends_on_finish_and_notices_a_silent_rank() -> None:
    run_distributed(_beats, 2, timeout=60)
