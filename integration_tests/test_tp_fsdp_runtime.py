"""The run loop with ``parallel.layouts = ["tp", "fsdp"]``: gpt (mcore-models), adamw (mcore-optim), tp
(mcore-parallel) and fsdp (mcore-fsdp) on 4 gloo processes (``tp2 x fsdp2``).

* It trains ``tiny`` with the parameters as 2-D DTensors (the model built on the meta device, each
  rank initialising its own part), two micro-batches per data-parallel rank (both layouts'
  ``no_grad_sync``), and equals one process: loss and gradient norm of every step (rel 1e-5);
* interrupted after step 3 and resumed from its checkpoint (DCP, real files), it continues bit for bit;
* its step-3 checkpoint reshards: resumed under ``fsdp4``, ``tp4`` (4 processes) and ``single`` (one
  process, ``tp1``), the next steps' losses equal the uninterrupted run's (rel 1e-5).

``tp2 x hsdp 2x1`` resuming the same checkpoint is ``slow``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from run_helpers import merged, metrics, run_update

from mcore.config import RunConfig, resolve_config
from mcore.data.shards import prepare
from mcore.data.sources import iter_documents
from mcore.train import run
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host

CUT, TOTAL = 3, 5  # the interrupted run stops (and the reshards start) after step CUT
BASE: dict[str, Any] = {
    "model": {"name": "gpt", "preset": "tiny", "max_position_embeddings": 64},
    "optimizer": {"name": "adamw", "lr": 3e-3, "eps": 1e-6},
    "train": {
        "steps": TOTAL,
        "seq_len": 32,
        "global_batch_size": 8,
        "micro_batch_size": 2,  # 2 micro-batches per data-parallel rank under tp2 x fsdp2
        "warmup_steps": 1,
        "grad_clip": 0.5,
        "deterministic": True,
        "cpu_threads": 1,
        "resume": "none",
    },
    "data": {"workers": 0},
    "log": {"progress": "none", "tensorboard": False, "plot": False, "every": 1},
    "checkpoint": {"async_save": False, "save_final": True},
}
TP_FSDP = {"layouts": ["tp", "fsdp"], "sizes": {"tp": 2}}
RESHARDS: dict[str, dict[str, Any]] = {
    "fsdp4": {"layouts": ["fsdp"]},
    "tp4": {"layouts": ["tp"], "sizes": {"tp": 4}},
}
SLOW_RESHARDS: dict[str, dict[str, Any]] = {
    "tp2 x hsdp 2x1": {"layouts": ["tp", "hsdp"], "sizes": {"tp": 2, "dp_replicate": 2, "dp_shard": 1}},
}


def _host() -> Any:
    return isolated_host("mcore_models.plugin", "mcore_optim.plugin", "mcore_parallel.plugin", "mcore_fsdp.plugin")


def _config(
    out_dir: Path, corpus: str, parallel: dict[str, Any], train: dict[str, Any] | None = None, every: int = 0
) -> RunConfig:
    return resolve_config(merged(BASE, run_update(out_dir, corpus, parallel, train, every)), _host())


def _checkpoint(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step_{step:08d}"


def _four_ranks(root: str, corpus: str, reshards: dict[str, dict[str, Any]]) -> None:
    root_path, host = Path(root), _host()
    full = run(_config(root_path / "full", corpus, TP_FSDP, every=CUT), host)
    cut = run(_config(root_path / "cut", corpus, TP_FSDP), host, stop_at_step=CUT)
    assert cut.steps_done == CUT
    resumed = run(_config(root_path / "cut", corpus, TP_FSDP, {"resume": "latest"}), host)
    assert resumed.start_step == CUT
    losses: dict[str, dict[int, float]] = {"full": full.losses, "resumed": resumed.losses}
    for name, parallel in reshards.items():  # the uninterrupted run's step-CUT checkpoint under other layouts
        ckpt = str(_checkpoint(root_path / "full", CUT))
        other = run(_config(root_path / name, corpus, parallel, {"resume": ckpt}), host)
        assert other.start_step == CUT, name
        losses[name] = other.losses
    if dist.get_rank() == 0:
        (root_path / "losses.json").write_text(json.dumps(losses))


def _run(tmp_path: Path, reshards: dict[str, dict[str, Any]]) -> dict[str, dict[int, float]]:
    corpus = tmp_path / "corpus"
    prepare(iter_documents("stdlib"), corpus, tokenizer_spec="byte", workers=0, max_tokens=30_000)
    run_distributed(_four_ranks, 4, str(tmp_path), str(corpus), reshards, timeout=600)
    raw = json.loads((tmp_path / "losses.json").read_text())
    return {name: {int(s): v for s, v in d.items()} for name, d in raw.items()}


def test_tp2_fsdp2_trains_like_one_process_resumes_exactly_and_reshards(tmp_path: Path) -> None:
    losses = _run(tmp_path, RESHARDS)
    full = losses["full"]
    assert {s: losses["resumed"][s] for s in range(CUT + 1, TOTAL + 1)} == {
        s: full[s] for s in range(CUT + 1, TOTAL + 1)
    }  # bit for bit
    for name in RESHARDS:
        for step in range(CUT + 1, TOTAL + 1):
            assert losses[name][step] == pytest.approx(full[step], rel=1e-5), (name, step)
    host, corpus = _host(), str(tmp_path / "corpus")
    run(_config(tmp_path / "one", corpus, {"layouts": ["single"]}), host, stop_at_step=CUT)
    four, ref = metrics(tmp_path / "full"), metrics(tmp_path / "one")
    for step in range(1, CUT + 1):
        for key in ("loss", "grad_norm"):
            assert four[step][key] == pytest.approx(ref[step][key], rel=1e-5), (step, key)
    ckpt = _checkpoint(tmp_path / "full", CUT)  # tp1: one process, no layout
    single = run(_config(tmp_path / "single", corpus, {"layouts": ["single"]}, {"resume": str(ckpt)}), host)
    assert single.start_step == CUT
    for step in range(CUT + 1, TOTAL + 1):
        assert single.losses[step] == pytest.approx(full[step], rel=1e-5), step


@pytest.mark.slow
def test_tp2_fsdp2_checkpoint_resumes_under_tp2_hsdp(tmp_path: Path) -> None:
    losses = _run(tmp_path, SLOW_RESHARDS)
    for name in SLOW_RESHARDS:
        for step in range(CUT + 1, TOTAL + 1):
            assert losses[name][step] == pytest.approx(losses["full"][step], rel=1e-5), (name, step)
