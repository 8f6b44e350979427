"""Checkpoints on one process: exact resume, async + atomic saves under injected failures,
incompatible models, and loading that never unpickles code."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import torch.distributed.checkpoint as dcp
from test_checkpoint_safety import SGDPlugin, make_legacy, payloads
from test_train_loop import make_config, make_corpus, merge

from mcore.checkpoint.store import (
    CheckpointSaveError,
    LegacyCheckpointWarning,
    latest_checkpoint,
    list_checkpoints,
    read_meta,
)
from mcore.errors import UserError
from mcore.train import run
from mcore_testing.hosts import isolated_host


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture
def host() -> Any:
    return isolated_host("mcore_testing.plugin")


@pytest.mark.parametrize("async_save", [False, True])
def test_interrupted_and_resumed_equals_uninterrupted(host: Any, corpus: str, tmp_path: Path, async_save: bool) -> None:
    full = run(make_config(host, tmp_path / "full", corpus, {"train": {"steps": 8}}), host)
    update = {"train": {"steps": 8, "resume": "latest"}, "checkpoint": {"every": 2, "async_save": async_save}}
    first = run(make_config(host, tmp_path / "cut", corpus, update), host, stop_at_step=5)
    assert first.steps_done == 5 and first.last_checkpoint is not None and first.last_checkpoint.name == "step_00000004"
    second = run(make_config(host, tmp_path / "cut", corpus, update), host)
    assert second.start_step == 4
    assert {s: second.losses[s] for s in range(5, 9)} == {s: full.losses[s] for s in range(5, 9)}  # bit for bit
    steps = [
        int(line.split('"step": ')[1].split(",")[0])
        for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(set(steps))  # the interrupted run's step 5 was replaced, not duplicated


def test_resume_latest_without_checkpoints_starts_fresh(host: Any, corpus: str, tmp_path: Path) -> None:
    result = run(make_config(host, tmp_path / "r", corpus, {"train": {"steps": 2, "resume": "latest"}}), host)
    assert result.start_step == 0 and result.steps_done == 2


@pytest.mark.parametrize("async_save", [False, True])
def test_failed_save_keeps_last_good_checkpoint(
    host: Any, corpus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, async_save: bool
) -> None:
    real_write = dcp.FileSystemWriter.write_data
    calls = [0]

    def failing_write(self: Any, plan: Any, planner: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", failing_write)
    cfg = make_config(
        host, tmp_path / "r", corpus, {"train": {"steps": 6}, "checkpoint": {"every": 2, "async_save": async_save}}
    )
    with pytest.raises(CheckpointSaveError, match="No space left on device.*last good checkpoint is .*step_00000002"):
        run(cfg, host)
    root = tmp_path / "r" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002"]
    assert not list(root.glob("*.tmp")) and not (root / "step_00000004").exists()
    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", real_write)
    resumed = run(make_config(host, tmp_path / "r", corpus, {"train": {"steps": 6, "resume": "latest"}}), host)
    assert resumed.start_step == 2 and resumed.steps_done == 6


def test_partial_tmp_dir_is_never_loaded(host: Any, corpus: str, tmp_path: Path) -> None:
    run(make_config(host, tmp_path / "r", corpus, {"train": {"steps": 2}, "checkpoint": {"save_final": True}}), host)
    root = tmp_path / "r" / "checkpoints"
    (root / "step_00000009.tmp").mkdir()
    (root / "step_00000010").mkdir()  # a directory without meta.json: not complete
    assert latest_checkpoint(root) == root / "step_00000002"


def test_incompatible_model_is_refused(host: Any, corpus: str, tmp_path: Path) -> None:
    run(make_config(host, tmp_path / "r", corpus, {"train": {"steps": 1}, "checkpoint": {"save_final": True}}), host)
    cfg = make_config(
        host, tmp_path / "r", corpus, {"train": {"steps": 2, "resume": "latest"}, "model": {"hidden_size": 48}}
    )
    with pytest.raises(UserError, match="another model config \\(model.hidden_size: 32 -> 48\\).*allow_model_change"):
        run(cfg, host)
    # a deliberate change is allowed, but the tensors must still fit
    allow = {"train": {"steps": 2, "resume": "latest", "allow_model_change": True}}
    cfg = make_config(host, tmp_path / "r", corpus, merge(allow, {"model": {"hidden_size": 48}}))
    with pytest.raises(
        UserError, match="does not fit this model: 'embed.weight' has shape \\(257, 32\\).*\\(257, 48\\)"
    ):
        run(cfg, host)
    cfg = make_config(host, tmp_path / "r", corpus, merge(allow, {"model": {"num_layers": 3}}))
    with pytest.raises(UserError, match="it has no parameter 'layers.2"):
        run(cfg, host)


def test_loading_never_unpickles_code(host: Any, corpus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run(
        make_config(host, tmp_path / "r", corpus, {"train": {"steps": 1}, "checkpoint": {"save_final": True}}), host
    )
    ckpt = result.last_checkpoint
    assert ckpt is not None and read_meta(ckpt)["step"] == 1
    marker = tmp_path / "pwned"
    real = (ckpt / ".metadata").read_bytes()
    (ckpt / ".metadata").write_bytes(payloads(real, marker)["dotted os.system via filesystem"])
    monkeypatch.chdir(tmp_path)
    cfg = make_config(host, tmp_path / "r", corpus, {"train": {"steps": 2, "resume": str(ckpt)}})
    with pytest.raises(UserError, match=".metadata has .* bytes"):  # the manifest's checksums catch it first
        run(cfg, host)
    make_legacy(ckpt)  # and without a manifest, the allow-list
    with pytest.warns(LegacyCheckpointWarning), pytest.raises(UserError, match="os.system, which is not allowed"):
        run(cfg, host)
    assert not marker.exists()


def test_resume_with_another_optimizer_is_one_line(corpus: str, tmp_path: Path) -> None:
    host = isolated_host("mcore_testing.plugin", SGDPlugin())
    run(make_config(host, tmp_path / "r", corpus, {"train": {"steps": 1}, "checkpoint": {"save_final": True}}), host)
    cfg = make_config(
        host, tmp_path / "r", corpus, {"train": {"steps": 2, "resume": "latest"}, "optimizer": {"name": "test-sgd"}}
    )
    with pytest.raises(UserError, match="optimizer 'reference-adamw'.*does not load") as exc:
        run(cfg, host)
    assert "\n" not in str(exc.value)
