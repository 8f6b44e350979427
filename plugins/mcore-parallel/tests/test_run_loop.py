"""The core's run loop with ``parallel.layouts = ["ddp"]``: two gloo processes equal one process over
3 steps (loss and gradient norm), and the two processes' checkpoint resumes on one process exactly
as the one-process run continues.

The plugin host is isolated: the core's built-ins, the harness's ``reference-tiny`` model and
``reference-adamw`` optimizer, and this plugin (never the installed entry points).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from parallel_run_helpers import corpus as make_corpus
from parallel_run_helpers import host as make_host
from parallel_run_helpers import metrics, run_config

from mcore.config import RunConfig
from mcore.train import run
from mcore_testing import run_distributed

STEPS = 3  # compared on two processes
TOTAL = 5  # the schedule's length; the resumed run trains steps 4 and 5


def _config(host: Any, out_dir: Path, corpus: str, *, layouts: list[str], resume: str = "none") -> RunConfig:
    parallel = {"layouts": layouts, **({"ddp": {"bucket_mb": 0.01}} if "ddp" in layouts else {})}
    train = {"steps": TOTAL, "global_batch_size": 8, "resume": resume}  # 2 micro-batches per rank on 2, 4 on one
    return run_config(host, out_dir, corpus, {"model": {"vocab_size": 257}, "parallel": parallel, "train": train})


def _two_ranks(root: str, corpus: str) -> None:
    host = make_host()
    run(_config(host, Path(root) / "ddp2", corpus, layouts=["ddp"]), host, stop_at_step=STEPS)
    dist.barrier()


def test_ddp_on_two_processes_equals_one_and_resumes_on_one(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    run_distributed(_two_ranks, 2, str(tmp_path), corpus, timeout=240)
    host = make_host()
    one = run(_config(host, tmp_path / "one", corpus, layouts=["single"]), host)
    two = metrics(tmp_path / "ddp2")
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm"):
            assert two[step][key] == pytest.approx(metrics(tmp_path / "one")[step][key], rel=1e-5), (step, key)
    ckpt = tmp_path / "ddp2" / "checkpoints" / f"step_{STEPS:08d}"
    resumed = run(_config(host, tmp_path / "resumed", corpus, layouts=["ddp"], resume=str(ckpt)), host)
    assert resumed.start_step == STEPS
    for step in range(STEPS + 1, TOTAL + 1):
        assert resumed.losses[step] == pytest.approx(one.losses[step], rel=1e-5), step
