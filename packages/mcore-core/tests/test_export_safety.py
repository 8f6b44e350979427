"""``mcore export --out DIR`` never deletes what it did not write, and writes files with normal modes."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mcore.plugins
from mcore.cli import main
from mcore.plugins import hookimpl
from mcore.train.export import MANIFEST
from mcore_testing.hosts import isolated_host

TOML = """
[model]
name = "exportable-tiny"
vocab_size = 257
max_seq_len = 16
hidden_size = 16
num_layers = 1
ffn_size = 32

[optimizer]
name = "reference-adamw"

[train]
steps = 1
seq_len = 16
global_batch_size = 2
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


class ExportableTiny:
    """``reference-tiny`` with a stand-in ``export_hf`` that writes like the real one (safetensors + config.json)."""

    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        from mcore_testing.reference import TinyModelFactory

        class Factory(TinyModelFactory):
            @staticmethod
            def export_hf(model: Any, config: Any, out_dir: Path) -> None:
                from safetensors.torch import save_file

                tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
                save_file(tensors, str(Path(out_dir) / "model.safetensors"))  # 0600 with safetensors >= 0.7
                (Path(out_dir) / "config.json").write_text(json.dumps({"hidden_size": config.hidden_size}))

        registry.add("model", "exportable-tiny", Factory)


@pytest.fixture(scope="module")
def host() -> Any:
    return isolated_host("mcore_testing.plugin", ExportableTiny())


@pytest.fixture(scope="module")
def trained_run(host: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run directory with one checkpoint (trained once for the module)."""
    root = tmp_path_factory.mktemp("export")
    corpus = root / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    run_toml = root / "run.toml"
    run_toml.write_text(TOML.format(out=root / "run", source=corpus))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mcore.plugins, "load_plugins", lambda **kw: host)
        assert main(["train", str(run_toml)]) == 0
    return root / "run"


@pytest.fixture
def cli(host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mcore.plugins, "load_plugins", lambda **kw: host)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_export_into_the_run_directory_is_refused_and_deletes_nothing(
    cli: None, trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before, listing = snapshot(trained_run), siblings(trained_run)
    assert any("checkpoints" in name for name in before)
    assert main(["export", str(trained_run), "--out", str(trained_run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a mcore export" in err and "never deletes" in err
    assert snapshot(trained_run) == before and siblings(trained_run) == listing
    assert main(["export", str(trained_run), "--out", str(trained_run), "--overwrite"]) == 2  # not even then
    assert snapshot(trained_run) == before and siblings(trained_run) == listing


def test_export_onto_a_file_is_refused(
    cli: None, trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main(["export", str(trained_run), "--out", str(target), "--overwrite"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert target.read_text() == "mine" and siblings(target) == ["notes.txt"]


def test_previous_export_is_replaced_only_with_overwrite(
    cli: None, trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    out.mkdir()  # an empty directory is fine
    assert main(["export", str(trained_run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"exported to {out}"
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == "hf" and manifest["source_checkpoint"].endswith("step_00000001")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    (out / "config.json").write_text("{}")  # mark this export, to see whether it is replaced

    assert main(["export", str(trained_run), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "{}"

    assert main(["export", str(trained_run), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text()) == {"hidden_size": 16}
    assert siblings(out) == ["hf"]  # no temporary or old directory left beside it


def test_files_added_to_a_previous_export_are_never_deleted(
    cli: None, trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--overwrite`` replaced the whole directory, with a README the user had added beside the export."""
    out = tmp_path / "hf"
    assert main(["export", str(trained_run), "--out", str(out)]) == 0
    (out / "README.md").write_text("mine")
    before = snapshot(out)
    capsys.readouterr()
    assert main(["export", str(trained_run), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did not write (README.md)" in err and "never deletes" in err
    assert snapshot(out) == before and siblings(out) == ["hf"]


def test_marker_without_config_json_is_not_an_export(
    cli: None, trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / MANIFEST).write_text("{}")
    (out / "weights.bin").write_bytes(b"user data")
    assert main(["export", str(trained_run), "--out", str(out), "--overwrite"]) == 2
    assert "not a complete export" in capsys.readouterr().err
    assert (out / "weights.bin").read_bytes() == b"user data"


def test_exported_files_get_normal_permissions(
    cli: None, trained_run: Path, tmp_path: Path, umask_022: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "deep" / "hf"
    assert main(["export", str(trained_run), "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_a_model_the_mapping_cannot_express_is_one_line_and_publishes_nothing(
    cli: None,
    host: Any,
    trained_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(model: Any, config: Any, out_dir: Path) -> None:
        (Path(out_dir) / "partial.bin").write_bytes(b"x")  # half-written before it notices
        raise ValueError("model cannot be exported as Hugging Face 'llama':\n qk_norm = true (needs false)")

    monkeypatch.setattr(host.load("model", "exportable-tiny"), "export_hf", staticmethod(refuse))
    out = tmp_path / "hf"
    assert main(["export", str(trained_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mcore: error: model cannot be exported as Hugging Face 'llama': qk_norm = true (needs false)"]
    assert not out.exists() and siblings(out) == []  # the temporary sibling is gone too
