"""The first run: ``mcore`` alone prints help, help texts are generated from the configs, output into
a closed pipe ends quietly, ``mcore plugins`` is a table and ``mcore train`` prints absolute paths."""

from __future__ import annotations

import dataclasses
import os
import pty
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import mcore.plugins
from mcore.cli import EXIT_BROKEN_PIPE, main
from mcore.config.sections import CORE_SECTIONS
from mcore.helptext import field_docs, format_section, toml_value
from mcore_testing.hosts import isolated_host

ROOT = Path(__file__).resolve().parents[3]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_")}
    return subprocess.run(
        [sys.executable, "-m", "mcore", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


@pytest.fixture
def reference_host(monkeypatch: pytest.MonkeyPatch) -> Any:
    host = isolated_host("mcore_testing.plugin")
    monkeypatch.setattr(mcore.plugins, "load_plugins", lambda **kw: host)
    return host


# -- `mcore` alone ---------------------------------------------------------------------------------
def test_mcore_alone_prints_help_and_trains_nothing(tmp_path: Path) -> None:
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("train", "generate", "export", "plan", "config", "plugins"):
        assert f"\n    {command} " in result.stdout
    assert "\n  mcore train " in result.stdout and "built-in demo" in result.stdout
    assert list(tmp_path.iterdir()) == []  # no runs/default


def test_mcore_alone_in_process_does_not_start_the_demo(
    reference_host: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([]) == 0  # the demo's model is not in this host: starting it would exit 2
    assert "first run:" in capsys.readouterr().out


# -- closed pipes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["plugins", "--json"], ["plugins"], ["train", "--help"]])
def test_output_into_a_closed_pipe_ends_quietly(args: list[str]) -> None:
    """``mcore plugins --json | head -1``: the reader is gone before mcore writes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcore", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the only reader: every write of mcore now fails with EPIPE
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == EXIT_BROKEN_PIPE and err == ""


# -- `mcore plugins` ------------------------------------------------------------------------------------
def test_plugins_table_has_one_row_per_implementation_with_its_summary() -> None:
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["kind", "name", "distribution", "version", "summary"]
    assert set(lines[1]) <= {"-", " "}
    row = next(line for line in lines if line.split()[:2] == ["precision", "bf16"])
    assert row.split()[2:4] == ["mcore-core", mcore.__version__] and "fp32 master weights" in row
    assert any(line.split()[:2] == ["train", "mcore-core"] for line in lines)  # the commands table


def test_plugins_on_a_terminal_is_a_rich_table_without_torch() -> None:
    code = "import sys\nfrom mcore.cli import main\nmain(['plugins'])\nprint('torch' in sys.modules, file=sys.stderr)\n"
    primary, secondary = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_")} | {"COLUMNS": "120", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=secondary, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert proc.stderr is not None
    torch_loaded = proc.stderr.read().decode().strip()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 0 and torch_loaded == "False"
    text = b"".join(chunks).decode(errors="replace")
    assert "distribution" in text and "bf16 compute, fp32 master weights" in text and "-----" not in text


# -- help texts ---------------------------------------------------------------------------------------
@dataclass(kw_only=True, slots=True)
class _Base:
    """A base config."""

    inherited: int = 1
    """Comes from the base class."""


@dataclass(kw_only=True, slots=True)
class _Documented(_Base):
    """``[demo]``: a section.

    Fields without docs are described here.
    """

    steps: int = 10
    """Optimizer steps.

    More detail that the help leaves out.
    """
    #: documented by a comment block
    #: over two lines
    commented: str = "x"
    trailing: float | None = None  # documented at the end of the line
    names: list[str] = field(default_factory=lambda: ["a", "b"])
    sizes: dict[str, int] = field(default_factory=dict)


def test_field_docs_reads_docstrings_comments_and_inherited_fields() -> None:
    assert field_docs(_Documented) == {
        "inherited": "Comes from the base class.",
        "steps": "Optimizer steps.",
        "commented": "documented by a comment block over two lines",
        "trailing": "documented at the end of the line",
    }
    lines = format_section("demo", _Documented, width=100)
    text = "\n".join(lines)
    assert lines[0] == "[demo]"
    assert "Fields without docs are described here." in text  # the class docstring stands in
    assert any(line.split() == ["steps", "=", "10", "Optimizer", "steps."] for line in lines)
    assert 'names = ["a", "b"]' in text and "sizes = {}" in text
    assert "trailing = none" in text and "(float or none)" in text
    assert [toml_value(v) for v in (True, None, Path("runs/x"), 0.5, {"tp": 2})] == [
        "true",
        "none",
        '"runs/x"',
        "0.5",
        "{tp = 2}",
    ]


def test_every_core_config_key_has_a_one_line_doc() -> None:
    missing = [
        f"{section}.{f.name}"
        for section, cls in CORE_SECTIONS.items()
        for f in dataclasses.fields(cls)
        if not field_docs(cls).get(f.name)
    ]
    assert missing == []


def test_train_help_lists_sections_keys_defaults_and_the_run_directory(
    reference_host: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--help", "--model.name=reference-tiny", "--optimizer.name=reference-adamw"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mcore train")
    assert "train.resume" in out and "--train.overwrite=true" in out and "allow_model_change" in out
    assert "--parallel.<layout>.key" in out
    for section in ("[model]", "[optimizer]", "[precision]", *(f"[{name}]" for name in CORE_SECTIONS)):
        assert f"\n{section}" in out, section
    assert 'name = "reference-tiny"' in out and "hidden_size = 32" in out  # the chosen model's own keys
    assert "presets of 'reference-tiny': micro, tiny" in out
    steps_doc = field_docs(CORE_SECTIONS["train"])["steps"]
    line = next(line for line in out.splitlines() if line.lstrip().startswith("steps = 1000"))
    assert steps_doc.split()[0] in line
    assert main(["train", "--help", "--model.name=nope"]) == 0
    assert "unknown model 'nope'" in capsys.readouterr().out


def test_plan_help_shows_plans_own_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mcore plan")
    assert "--world-size N" in out and "--device-memory-gb G" in out and "--json" in out
    assert "mcore train [RUN.toml]" not in out


def test_plan_bad_flag_value_is_one_line_exit_2(reference_host: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--world-size=two"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mcore: error:") and "--world-size" in err and err.count("\n") == 1


def test_config_help_explains_overrides() -> None:
    result = run_cli("config", "--help")
    assert result.returncode == 0
    assert "--section.key=value" in result.stdout and "--parallel.<layout>.key" in result.stdout
    assert "--parallel.layouts='[" in result.stdout and "none" in result.stdout


# -- `mcore train` prints absolute paths ------------------------------------------------------------------
def test_train_prints_absolute_paths(
    reference_host: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 100)
    monkeypatch.chdir(tmp_path)
    args = [
        "--model.name=reference-tiny",
        "--model.preset=micro",
        "--model.vocab_size=257",
        "--optimizer.name=reference-adamw",
    ]
    args += ["--train.steps=1", "--train.seq_len=16", "--train.global_batch_size=2", "--train.out_dir=runs/x"]
    args += ["--data.source=corpus.txt", "--data.workers=0", "--log.progress=none", "--log.tensorboard=false"]
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    paths = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in out.splitlines() if ": /" in line}
    assert paths["metrics"] == str(tmp_path / "runs" / "x" / "metrics.jsonl")
    assert Path(paths["checkpoint"]).is_absolute() and Path(paths["checkpoint"]).is_dir()
    assert Path(paths["plot"]).is_absolute()
