"""The core's run loop with ``parallel.layouts = ["ddp"]``: two gloo processes equal one process over
3 steps (loss and gradient norm), and the two processes' checkpoint resumes on one process exactly
as the one-process run continues.

The plugin host is isolated: the core's built-ins, the harness's ``reference-tiny`` model and
``reference-adamw`` optimizer, and this plugin (never the installed entry points).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from mcore.config import RunConfig, resolve_config
from mcore.data.shards import prepare
from mcore.data.sources import iter_documents
from mcore.train import run
from mcore_parallel import plugin
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host

STEPS = 3  # compared on two processes
TOTAL = 5  # the schedule's length; the resumed run trains steps 4 and 5


def _config(host: Any, out_dir: Path, corpus: str, *, layouts: list[str], resume: str = "none") -> RunConfig:
    raw: dict[str, Any] = {
        "model": {"name": "reference-tiny", "vocab_size": 257, "hidden_size": 32, "max_seq_len": 32},
        "optimizer": {"name": "reference-adamw", "lr": 3e-3},
        "parallel": {"layouts": layouts, "ddp": {"bucket_mb": 0.01}} if "ddp" in layouts else {"layouts": layouts},
        "train": {
            "steps": TOTAL,
            "seq_len": 16,
            "global_batch_size": 8,
            "micro_batch_size": 2,  # 2 micro-batches per rank on 2 ranks, 4 on one: accumulation on both
            "warmup_steps": 1,
            "grad_clip": 0.5,
            "deterministic": True,
            "cpu_threads": 1,
            "out_dir": str(out_dir),
            "resume": resume,
        },
        "data": {"workers": 0, "source": corpus, "packing": "concat"},
        "log": {"progress": "none", "tensorboard": False, "plot": False, "every": 1},
        "checkpoint": {"async_save": False, "save_final": True},  # stop_at_step saves there too
    }
    return resolve_config(raw, host)


def _host() -> Any:
    return isolated_host("mcore_testing.plugin", plugin)


def _metrics(out_dir: Path) -> dict[int, dict[str, Any]]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "step" in r}


def _two_ranks(root: str, corpus: str) -> None:
    host = _host()
    run(_config(host, Path(root) / "ddp2", corpus, layouts=["ddp"]), host, stop_at_step=STEPS)
    dist.barrier()


def test_ddp_on_two_processes_equals_one_and_resumes_on_one(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    prepare(iter_documents("stdlib"), corpus, tokenizer_spec="byte", workers=0, max_tokens=20_000)
    run_distributed(_two_ranks, 2, str(tmp_path), str(corpus), timeout=240)
    host = _host()
    one = run(_config(host, tmp_path / "one", str(corpus), layouts=["single"]), host)
    two = _metrics(tmp_path / "ddp2")
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm"):
            assert two[step][key] == pytest.approx(_metrics(tmp_path / "one")[step][key], rel=1e-5), (step, key)
    ckpt = tmp_path / "ddp2" / "checkpoints" / f"step_{STEPS:08d}"
    resumed = run(_config(host, tmp_path / "resumed", str(corpus), layouts=["ddp"], resume=str(ckpt)), host)
    assert resumed.start_step == STEPS
    for step in range(STEPS + 1, TOTAL + 1):
        assert resumed.losses[step] == pytest.approx(one.losses[step], rel=1e-5), step
