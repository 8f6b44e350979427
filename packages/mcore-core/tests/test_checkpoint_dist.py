"""Two gloo processes: exact resume across ranks, reload under another world size and layout,
and a layout that does not fit the world size.

The core ships no data-parallel layout (those are plugins), so the harness's stand-ins
(``mcore_testing.layouts``: ``test-ddp`` all-reduce DP, ``test-fsdp`` torch's ``fully_shard``)
stand in for ``ddp`` and ``fsdp``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from test_train_loop import make_config, make_corpus, merge

from mcore.errors import ConfigError
from mcore.train import run
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host
from mcore_testing.layouts import LayoutsPlugin

DDP = {"parallel": {"layouts": ["test-ddp"]}}


def _host() -> Any:
    return isolated_host("mcore_testing.plugin", LayoutsPlugin())


def _two_ranks(root: str, corpus: str) -> None:
    root_path, host = Path(root), _host()
    full = run(
        make_config(
            host, root_path / "full", corpus, merge(DDP, {"train": {"steps": 6}, "checkpoint": {"save_final": True}})
        ),
        host,
    )
    cut_cfg = merge(DDP, {"train": {"steps": 6, "resume": "latest"}, "checkpoint": {"every": 2, "async_save": True}})
    first = run(make_config(host, root_path / "cut", corpus, cut_cfg), host, stop_at_step=3)
    assert first.steps_done == 3
    resumed = run(make_config(host, root_path / "cut", corpus, cut_cfg), host)
    assert resumed.start_step == 2
    assert {s: resumed.losses[s] for s in (3, 4, 5, 6)} == {s: full.losses[s] for s in (3, 4, 5, 6)}  # bit for bit
    cont = run(
        make_config(
            host, root_path / "cont", corpus, merge(DDP, {"train": {"steps": 8, "resume": str(full.last_checkpoint)}})
        ),
        host,
    )
    if dist.get_rank() == 0:
        (root_path / "losses.json").write_text(json.dumps({"full": full.losses, "cont": cont.losses}))
    with pytest.raises(ConfigError, match="world size is 2"):
        run(make_config(host, root_path / "bad", corpus), host)  # layout 'single' on 2 processes


def test_two_processes_resume_exactly_and_reload_on_one(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    run_distributed(_two_ranks, 2, str(tmp_path), corpus, timeout=240)
    losses = json.loads((tmp_path / "losses.json").read_text())
    host = _host()
    # the 2-process checkpoint of step 6, loaded on one process with layout 'single'
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000006"
    single = run(make_config(host, tmp_path / "single", corpus, {"train": {"steps": 8, "resume": str(ckpt)}}), host)
    assert single.start_step == 6
    for step in (7, 8):
        assert single.losses[step] == pytest.approx(losses["cont"][str(step)], rel=1e-5)
    # and the single-process run of the same batches matches the 2-process one
    one = run(make_config(host, tmp_path / "one", corpus, {"train": {"steps": 6}}), host)
    for step in range(1, 7):
        assert one.losses[step] == pytest.approx(losses["full"][str(step)], rel=1e-5)


FSDP = {"parallel": {"layouts": ["test-fsdp"]}, "train": {"micro_batch_size": 4}}


def _two_ranks_sharded(root: str, corpus: str) -> None:
    root_path, host = Path(root), _host()
    # a single-process checkpoint, resharded onto two ranks
    single_ckpt = root_path / "single_full" / "checkpoints" / "step_00000004"
    grown = run(
        make_config(
            host, root_path / "grown", corpus, merge(FSDP, {"train": {"steps": 6, "resume": str(single_ckpt)}})
        ),
        host,
    )
    assert grown.start_step == 4
    if dist.get_rank() == 0:
        (root_path / "grown.json").write_text(json.dumps(grown.losses))
    full = run(
        make_config(
            host, root_path / "full", corpus, merge(FSDP, {"train": {"steps": 4}, "checkpoint": {"save_final": True}})
        ),
        host,
    )
    cont = run(
        make_config(
            host, root_path / "cont", corpus, merge(FSDP, {"train": {"steps": 6, "resume": str(full.last_checkpoint)}})
        ),
        host,
    )
    if dist.get_rank() == 0:
        (root_path / "losses.json").write_text(json.dumps({"full": full.losses, "cont": cont.losses}))


def test_sharded_checkpoints_reshard_between_one_and_two_processes(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    host = _host()
    single_cfg = {"train": {"steps": 6, "micro_batch_size": 4}, "checkpoint": {"every": 4}}
    single_full = run(make_config(host, tmp_path / "single_full", corpus, single_cfg), host)
    run_distributed(_two_ranks_sharded, 2, str(tmp_path), corpus, timeout=240)
    grown = json.loads((tmp_path / "grown.json").read_text())
    for step in (5, 6):  # 1 -> 2 processes (sharded) continues like the single-process run
        assert grown[str(step)] == pytest.approx(single_full.losses[step], rel=1e-5)
    losses = json.loads((tmp_path / "losses.json").read_text())
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000004"
    from mcore.checkpoint.safe_reader import SafeFileSystemReader

    stored = SafeFileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert len(stored["model/embed.weight"].chunks) == 2  # saved as two shards
    assert len(stored["optimizer/state/embed.weight/exp_avg"].chunks) == 2
    single = run(make_config(host, tmp_path / "single", corpus, {"train": {"steps": 6, "resume": str(ckpt)}}), host)
    for step in (5, 6):
        assert single.losses[step] == pytest.approx(losses["cont"][str(step)], rel=1e-5)
