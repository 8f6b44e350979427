"""What a run does with its ``train.out_dir``: resume the same model config, refuse another, move
the previous run aside on ``overwrite`` (never delete it), and say so on its first line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_train_loop import make_config, make_corpus, merge

import mcore.plugins
from mcore.checkpoint.store import latest_checkpoint, list_checkpoints
from mcore.cli import main
from mcore.errors import UserError
from mcore.train import run
from mcore_testing.hosts import isolated_host

SAVE = {"checkpoint": {"save_final": True}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture
def host() -> Any:
    return isolated_host("mcore_testing.plugin")


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def first_line(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().out.splitlines()[0]


def test_the_same_command_with_more_steps_resumes(
    host: Any, corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    first = run(make_config(host, out, corpus, merge(SAVE, {"train": {"steps": 3}, "log": {"every": 1}})), host)
    assert first_line(capsys) == f"starting a fresh run in {out}"
    assert first.start_step == 0 and first.last_checkpoint == out / "checkpoints" / "step_00000003"

    again = run(make_config(host, out, corpus, merge(SAVE, {"train": {"steps": 5}, "log": {"every": 1}})), host)
    assert first_line(capsys) == (
        f"resuming from {out / 'checkpoints' / 'step_00000003'} (step 3 of 5; same model config)"
    )
    assert again.start_step == 3 and sorted(again.losses) == [4, 5]
    assert steps_logged(out) == [1, 2, 3, 4, 5]  # one run's metrics, continued

    done = run(make_config(host, out, corpus, merge(SAVE, {"train": {"steps": 5}})), host)
    assert first_line(capsys) == (
        f"nothing to do: {out / 'checkpoints' / 'step_00000005'} finished at step 5 (train.steps = 5); "
        "raise --train.steps or use --train.overwrite=true"
    )
    assert done.steps_done == 5 and not done.losses and done.last_checkpoint == out / "checkpoints" / "step_00000005"


def test_another_model_config_is_refused_naming_the_keys(host: Any, corpus: str, tmp_path: Path) -> None:
    out = tmp_path / "r"
    run(make_config(host, out, corpus, merge(SAVE, {"train": {"steps": 2}})), host)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    cfg = make_config(host, out, corpus, merge(SAVE, {"train": {"steps": 4}, "model": {"num_heads": 2}}))
    with pytest.raises(UserError) as info:
        run(cfg, host)
    message = str(info.value)
    assert "\n" not in message and "model.num_heads: 4 -> 2" in message
    for way in ("--train.out_dir=", "--train.overwrite=true", "--train.allow_model_change=true"):
        assert way in message
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing touched
    # a deliberate change (same tensor shapes): resumed, and the first line says what changed
    allowed = run(
        make_config(
            host,
            out,
            corpus,
            merge(SAVE, {"train": {"steps": 4, "allow_model_change": True}, "model": {"num_heads": 2}}),
        ),
        host,
    )
    assert allowed.start_step == 2


def test_overwrite_moves_the_previous_run_aside(
    host: Any, corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    old = run(make_config(host, out, corpus, merge(SAVE, {"train": {"steps": 3}, "log": {"every": 1}})), host)
    capsys.readouterr()
    new = run(
        make_config(host, out, corpus, merge(SAVE, {"train": {"steps": 2, "overwrite": True}, "log": {"every": 1}})),
        host,
    )
    (archive,) = (out / "previous").iterdir()
    assert first_line(capsys) == (
        f"starting a fresh run in {out} (the previous run's checkpoints, metrics.jsonl moved to {archive})"
    )
    assert new.start_step == 0 and new.losses[1] == old.losses[1]
    assert [p.name for p in list_checkpoints(archive / "checkpoints")] == ["step_00000003"]
    assert [json.loads(line)["step"] for line in (archive / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (
        steps_logged(out) == [1, 2] and latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step_00000002"
    )


def test_resume_none_refuses_a_directory_holding_a_run(host: Any, corpus: str, tmp_path: Path) -> None:
    out = tmp_path / "r"
    run(make_config(host, out, corpus, merge(SAVE, {"train": {"steps": 2}})), host)
    with pytest.raises(UserError, match="already holds a run .*--train.overwrite=true"):
        run(make_config(host, out, corpus, {"train": {"steps": 2, "resume": "none"}}), host)
    fresh = run(make_config(host, out, corpus, {"train": {"steps": 2, "resume": "none", "overwrite": True}}), host)
    assert fresh.start_step == 0 and len(list((out / "previous").iterdir())) == 1


def test_a_run_without_checkpoints_is_set_aside_not_mixed(
    host: Any, corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    run(make_config(host, out, corpus, {"train": {"steps": 3}, "log": {"every": 1}}), host)  # no checkpoint saved
    capsys.readouterr()
    run(make_config(host, out, corpus, {"train": {"steps": 2}, "log": {"every": 1}}), host)
    assert "no checkpoint to resume; the previous run's metrics.jsonl moved to" in first_line(capsys)
    (archive,) = (out / "previous").iterdir()
    assert steps_logged(archive) == [1, 2, 3] and steps_logged(out) == [1, 2]


def test_the_checkpoint_resumed_from_is_never_pruned_and_later_ones_are_set_aside(
    host: Any, corpus: str, tmp_path: Path
) -> None:
    out, every = tmp_path / "r", {"checkpoint": {"every": 2, "keep_last": 2, "save_final": True}}
    run(make_config(host, out, corpus, merge(every, {"train": {"steps": 4}})), host)
    step2 = out / "checkpoints" / "step_00000002"
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002", "step_00000004"]
    # go back to step 2 (say, before a loss spike) and train on with keep_last = 1
    again = {"train": {"steps": 5, "resume": str(step2)}, "checkpoint": {"every": 1, "keep_last": 1}}
    result = run(make_config(host, out, corpus, merge(every, again)), host)
    assert result.start_step == 2
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002", "step_00000005"]
    (archive,) = (out / "previous").iterdir()  # the abandoned continuation, kept but out of 'latest's way
    assert [p.name for p in list_checkpoints(archive / "checkpoints")] == ["step_00000004"]


def test_resuming_another_runs_checkpoint_into_a_used_directory_is_refused(
    host: Any, corpus: str, tmp_path: Path
) -> None:
    a = run(make_config(host, tmp_path / "a", corpus, merge(SAVE, {"train": {"steps": 2}})), host)
    run(make_config(host, tmp_path / "b", corpus, merge(SAVE, {"train": {"steps": 2}})), host)
    cfg = make_config(host, tmp_path / "b", corpus, {"train": {"steps": 4, "resume": str(a.last_checkpoint)}})
    with pytest.raises(UserError, match="would mix two runs"):
        run(cfg, host)
    fresh_dir = run(
        make_config(host, tmp_path / "c", corpus, {"train": {"steps": 4, "resume": str(a.last_checkpoint)}}), host
    )
    assert fresh_dir.start_step == 2


def test_out_dir_that_is_a_file_is_a_user_error(host: Any, corpus: str, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        run(make_config(host, tmp_path / "f", corpus), host)


TOML = """
[model]
name = "reference-tiny"
vocab_size = 257
max_seq_len = 32

[optimizer]
name = "reference-adamw"

[train]
steps = {steps}
seq_len = 16
global_batch_size = 4
out_dir = "{out}"
cpu_threads = 1

[data]
source = "{source}"
workers = 0

[log]
progress = "none"
tensorboard = false
plot = false
"""


def test_cli_first_line_and_rerun(
    monkeypatch: pytest.MonkeyPatch, corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = isolated_host("mcore_testing.plugin")
    monkeypatch.setattr(mcore.plugins, "load_plugins", lambda **kw: host)
    out = tmp_path / "run"
    toml = tmp_path / "run.toml"
    toml.write_text(TOML.format(steps=2, out=out, source=corpus))
    assert main(["train", str(toml)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"starting a fresh run in {out}"
    assert main(["train", str(toml), "--train.steps=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"resuming from {out / 'checkpoints' / 'step_00000002'} (step 2 of 3")
    assert "trained steps 3..3" in lines[1]
    assert main(["train", str(toml), "--train.steps=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("nothing to do:") and f"checkpoint: {out / 'checkpoints' / 'step_00000003'}" in lines


def test_a_checkpoint_from_before_schema_2_is_refused_on_resume_and_generate(
    host: Any, corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "r"
    run(make_config(host, out, corpus, merge(SAVE, {"train": {"steps": 2}})), host)
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["config"].pop("schema_version") == 2  # what a run stores, removed: a checkpoint of before
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"written before run config schema 2 .* start a fresh run"):
        run(make_config(host, out, corpus, merge(SAVE, {"train": {"steps": 4}})), host)
    monkeypatch.setattr(mcore.plugins, "load_plugins", lambda **kw: host)
    assert main(["generate", str(ckpt), "--prompt", "a", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written before run config schema 2" in err[0]
