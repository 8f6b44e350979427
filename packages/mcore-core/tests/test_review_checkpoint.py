"""Defects of the checkpoint store, its loaders and ``mcore export`` found by review (items 2, 3, 5, 7, 8, 9,
16, 21): each test reproduces one, failing before its fix."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_checkpoint_safety import SGDPlugin, make_run, one_line
from test_export_safety import TOML, ExportableTiny, snapshot
from test_train_loop import make_config

import mcore.plugins
from mcore.checkpoint.load import load_checkpoint, read_meta, stored_tokenizer
from mcore.checkpoint.manifest import MANIFEST
from mcore.checkpoint.state import rng_state, set_rng_state
from mcore.checkpoint.store import CheckpointManager, list_checkpoints
from mcore.cli import main
from mcore.errors import UserError
from mcore.outputs import check_output_dir, publish_dir
from mcore.train.export import MANIFEST as EXPORT_MANIFEST
from mcore.train.export import check_export_dir
from mcore.train.health import Health
from mcore.train.rundir import plan_start
from mcore_testing.hosts import isolated_host

# -- #2: pruning deletes only what the manifest lists --------------------------------------------


@pytest.fixture
def host() -> Any:
    return isolated_host("mcore_testing.plugin", SGDPlugin())


def test_pruning_leaves_files_it_did_not_write(host: Any, tmp_path: Path) -> None:
    r = make_run(host, tmp_path / "run")
    first = r.save(1)
    (first / "NOTES.md").write_text("mine")
    (first / "other_run").mkdir()
    (first / "other_run" / "metrics.jsonl").write_text("{}\n")
    with pytest.warns(UserWarning, match="NOTES.md, other_run.*mcore did not write"):
        r.save(2, r.manager(keep_last=1))
    assert [p.name for p in list_checkpoints(r.root)] == ["step_00000002"]
    assert sorted(p.name for p in first.iterdir()) == ["NOTES.md", "other_run"]  # only the checkpoint's files went
    assert (first / "NOTES.md").read_text() == "mine" and (first / "other_run" / "metrics.jsonl").is_file()
    assert not list(r.root.glob("*.deleting"))


def test_interrupted_removal_is_finished_without_deleting_foreign_files(host: Any, tmp_path: Path) -> None:
    r = make_run(host, tmp_path / "run")
    first, _ = r.save(1), r.save(2)
    (first / "NOTES.md").write_text("mine")
    # a kill after the manifest was set aside and the directory renamed
    (first / MANIFEST).rename(first / f".retired-{MANIFEST}")
    trash = first.with_name(first.name + ".deleting")
    first.rename(trash)
    with pytest.warns(UserWarning, match="NOTES.md"):
        r.save(3, r.manager(keep_last=1))
    assert [p.name for p in list_checkpoints(r.root)] == ["step_00000003"]
    assert sorted(p.name for p in first.iterdir()) == ["NOTES.md"] and not trash.exists()


def test_pruning_a_clean_checkpoint_removes_its_directory(host: Any, tmp_path: Path) -> None:
    r = make_run(host, tmp_path / "run")
    first = r.save(1)
    r.save(2, r.manager(keep_last=1))
    assert not first.exists() and not list(r.root.glob("*.deleting"))


def test_out_dir_or_export_inside_a_checkpoint_is_refused(host: Any, tmp_path: Path) -> None:
    r = make_run(host, tmp_path / "run")
    ckpt = r.save(1)
    config = make_config(host, ckpt / "nested", str(tmp_path / "no-data"))
    with pytest.raises(UserError, match="lies inside checkpoint") as exc:
        plan_start(config)
    one_line(exc)
    for out in (ckpt, ckpt / "export", ckpt / "a" / "b"):
        with pytest.raises(UserError, match="lies inside checkpoint") as exc:
            check_output_dir(out, manifest=EXPORT_MANIFEST, what="mcore export", overwrite=True)
        one_line(exc)
    assert not (ckpt / "nested").exists() and not (ckpt / "export").exists()


# -- #3: export --overwrite over a malformed mcore_export.json -----------------------------------


@pytest.mark.parametrize("text", ['{"files": "all"}', "not json", '{"format": "hf"}', "[1, 2]", '{"files": [1]}'])
def test_overwrite_with_a_malformed_export_manifest_deletes_nothing(tmp_path: Path, text: str) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / EXPORT_MANIFEST).write_text(text)
    (out / "config.json").write_text("{}")
    (out / "MY_NOTES.md").write_text("mine")
    before = snapshot(out)
    with pytest.raises(UserError, match="deletes nothing") as exc:
        check_export_dir(out, overwrite=True)
    one_line(exc)
    assert snapshot(out) == before


# -- #5: a full disk while publishing an output --------------------------------------------------


def test_full_disk_inside_publish_dir_is_one_line_and_publishes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with (
        pytest.raises(UserError, match="No space left on device") as exc,
        publish_dir(out, manifest="index.json", what="prepared dataset", overwrite=False) as tmp,
    ):
        (tmp / "part").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "part"))
    assert str(out) in one_line(exc) and str(tmp / "part") in one_line(exc)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary sibling, no half output


@pytest.fixture(scope="module")
def export_host() -> Any:
    return isolated_host("mcore_testing.plugin", ExportableTiny())


@pytest.fixture(scope="module")
def trained(export_host: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("review-export")
    corpus = root / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    (root / "run.toml").write_text(TOML.format(out=root / "run", source=corpus))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mcore.plugins, "load_plugins", lambda **kw: export_host)
        assert main(["train", str(root / "run.toml")]) == 0
    return root / "run"


@pytest.fixture
def cli(export_host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mcore.plugins, "load_plugins", lambda **kw: export_host)


def _no_space(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device", "/full/disk/file")


@pytest.mark.parametrize("where", ["safetensors", "tokenizer"])
def test_full_disk_during_export_is_one_line_and_keeps_the_previous_export(
    cli: None, trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any, where: str
) -> None:
    out = tmp_path / "hf"
    assert main(["export", str(trained), "--out", str(out)]) == 0
    before = snapshot(out)
    if where == "safetensors":
        import safetensors
        import safetensors.torch

        def fail(*args: Any, **kwargs: Any) -> None:
            raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device)")

        monkeypatch.setattr(safetensors.torch, "save_file", fail)
    else:
        monkeypatch.setattr("mcore.data.tokenizer._write_hf_files", _no_space)
    capsys.readouterr()
    assert main(["export", str(trained), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "No space left on device" in err and str(out) in err
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no half-written temporary sibling


# -- #7, #8: the tokenizer of generate/export ----------------------------------------------------


def _copy_checkpoint(run_dir: Path, dest: Path) -> Path:
    """A copy of the run (so edits stay local); its newest checkpoint."""
    shutil.copytree(run_dir, dest)
    return list_checkpoints(dest / "checkpoints")[-1]


def _edit_meta(ckpt: Path, edit: Any) -> None:
    """Edit meta.json and drop the manifest: a legacy checkpoint, whose files are not verified."""
    meta = json.loads((ckpt / "meta.json").read_text())
    edit(meta)
    meta.pop("manifest", None)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (ckpt / MANIFEST).unlink()


@pytest.mark.parametrize("value", ["drop", 5, "byte", [1], {"kind": "byte", "vocab_size": "257"}])
def test_meta_tokenizer_missing_or_malformed_is_one_line(
    cli: None, trained: Path, tmp_path: Path, capsys: Any, value: Any
) -> None:
    ckpt = _copy_checkpoint(trained, tmp_path / "run")
    _edit_meta(ckpt, lambda m: m.pop("tokenizer") if value == "drop" else m.update(tokenizer=value))
    if value != "drop":
        with pytest.raises(UserError, match="'tokenizer' is malformed") as exc:
            read_meta(ckpt)
        one_line(exc)
    with pytest.raises(UserError, match="'tokenizer' is malformed"):
        stored_tokenizer(ckpt, read_meta(ckpt) if value == "drop" else {"tokenizer": value})
    for argv in (["generate", str(ckpt), "--engine", "none"], ["export", str(ckpt), "--out", str(tmp_path / "e")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and "'tokenizer' is malformed" in err
    assert not (tmp_path / "e").exists()


@pytest.fixture(scope="module")
def bpe_trained(export_host: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained with a small BPE tokenizer (its own tokenizer/ saved in the run)."""
    from mcore.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("review-bpe")
    corpus = root / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    tok = train_bpe(iter(["def f(x): return x + 1\n" * 50]), vocab_size=300, out=root / "tok300")
    toml = TOML.format(out=root / "run", source=corpus).replace("vocab_size = 257", f"vocab_size = {tok.vocab_size}")
    toml = toml.replace("workers = 0\n", f'workers = 0\ntokenizer = "{root / "tok300"}"\n', 1)
    (root / "run.toml").write_text(toml)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mcore.plugins, "load_plugins", lambda **kw: export_host)
        assert main(["train", str(root / "run.toml")]) == 0
    return root / "run"


def test_a_replaced_tokenizer_is_refused_by_generate_and_export(
    cli: None, bpe_trained: Path, tmp_path: Path, capsys: Any
) -> None:
    from mcore.data.tokenizer import train_bpe

    ckpt = _copy_checkpoint(bpe_trained, tmp_path / "run")
    assert main(["generate", str(ckpt), "--engine", "none", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    saved = json.loads((ckpt / "meta.json").read_text())["tokenizer"]["vocab_size"]
    other = train_bpe(iter(["hello world, hello there\n" * 50]), vocab_size=saved - 3, out=tmp_path / "other")
    assert other.vocab_size != saved
    shutil.copy(tmp_path / "other" / "tokenizer.json", tmp_path / "run" / "tokenizer" / "tokenizer.json")
    for argv in (
        ["generate", str(ckpt), "--engine", "none", "--prompt", "hello"],
        ["export", str(ckpt), "--out", str(tmp_path / "e")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and f"vocab_size {saved}" in err, err
    assert not (tmp_path / "e").exists()


# -- #9: rng and health state are checked before use ---------------------------------------------

_RNG_LEN = len(torch.get_rng_state())


@pytest.mark.parametrize(
    "state",
    [
        {"cpu": [1, 2, 3]},
        "x",
        {},
        [1],
        {"cpu": [256] * _RNG_LEN},
        {"cpu": [-1] * _RNG_LEN},
        {"cpu": [True] * _RNG_LEN},
        {"cpu": [1.0] * _RNG_LEN},
        {"cpu": "abc"},
    ],
)
def test_malformed_rng_state_is_one_line(state: Any) -> None:
    before = torch.get_rng_state()
    with pytest.raises(UserError, match="'rng' state is malformed") as exc:
        set_rng_state(state)
    one_line(exc)
    assert torch.equal(torch.get_rng_state(), before)  # nothing half-restored


def test_rng_state_round_trips() -> None:
    saved = json.loads(json.dumps(rng_state()))
    expected = torch.rand(4)
    torch.rand(7)
    set_rng_state(saved)
    assert torch.equal(torch.rand(4), expected)


def _health() -> Health:
    return Health(spike_factor=3.0, spike_warmup_steps=5, max_skipped=2)


@pytest.mark.parametrize(
    "state",
    [5, "x", [1], {"ema": "x"}, {"ema": float("nan")}, {"good_steps": -1}, {"skipped_in_row": 1.5}, {"ema": True}],
)
def test_malformed_health_state_is_one_line(state: Any) -> None:
    with pytest.raises(UserError, match="'health' is malformed") as exc:
        _health().load(state)
    one_line(exc)


def test_health_load_reads_only_its_own_keys() -> None:
    h = _health()
    h.load({"ema": 2.5, "good_steps": 7, "skipped_in_row": 1, "skipped_total": 3, "spike_factor": 1e9, "verdict": 1})
    assert (h.ema, h.good_steps, h.skipped_in_row, h.skipped_total) == (2.5, 7, 1, 3)
    assert h.spike_factor == 3.0 and callable(h.verdict)
    h.load({"skipped_in_row": 1}, fresh_counter=True)
    assert h.skipped_in_row == 0 and h.ema is None


# -- #16: Ctrl-C during a blocking save ----------------------------------------------------------


@pytest.mark.parametrize("where", ["torch.distributed.checkpoint.save", "write_data"])
def test_ctrl_c_during_a_blocking_save_is_not_a_failed_save(
    host: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    import torch.distributed.checkpoint as dcp

    r = make_run(host, tmp_path / "run")
    good = r.save(1)
    manager: CheckpointManager = r.manager()

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    if where == "write_data":  # inside DCP, which wraps it in a CheckpointException
        monkeypatch.setattr(dcp.FileSystemWriter, "write_data", interrupted)
    else:
        monkeypatch.setattr(where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        r.save(2, manager)
    assert list_checkpoints(r.root) == [good] and not list(r.root.glob("*.tmp"))
    assert manager.wait() == good  # the interrupt is not kept to be reported again


# -- #21: resume with another precision recipe ---------------------------------------------------


class _NeedsMaster:
    """An optimizer whose state holds fp32 master weights under a bf16 recipe: fp32's state lacks them."""

    def state_dict(self) -> dict[str, Any]:
        return {"state": {}, "param_groups": []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise KeyError("master")


def _config_with_recipe(r: Any, recipe: str | None) -> dict[str, Any]:
    config = r.config.to_dict()
    if recipe is None:
        config.pop("precision", None)
    else:
        config["precision"] = {**config.get("precision", {}), "recipe": recipe}
    return config


def test_resume_with_another_precision_recipe_names_it(host: Any, tmp_path: Path) -> None:
    r = make_run(host, tmp_path / "run")
    assert r.config.to_dict()["precision"]["recipe"] == "fp32"
    ckpt = r.save(1)
    with pytest.raises(UserError, match=r"precision\.recipe: fp32 -> bf16.*--precision\.recipe=fp32") as exc:
        load_checkpoint(
            ckpt, model=r.model, optimizer=_NeedsMaster(), precision=r.precision, config=_config_with_recipe(r, "bf16")
        )
    assert "master" in one_line(exc)
    # without a recipe to compare with, the message still points at it
    with pytest.raises(UserError, match="another precision.recipe is a likely cause") as exc:
        load_checkpoint(ckpt, model=r.model, optimizer=_NeedsMaster(), precision=r.precision, config=None)
    one_line(exc)
