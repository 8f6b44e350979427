"""The ``mcore`` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fakedist import make_distribution, plugin_source

import mcore


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mcore", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=120
    )


def test_version_flag():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"mcore-core {mcore.__version__}"


def test_plugins_lists_kind_name_distribution_version():
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["kind", "name", "distribution", "version", "summary"]
    for name in ("bf16", "fp32"):
        assert any(line.split()[:4] == ["precision", name, "mcore-core", mcore.__version__] for line in lines)


def test_plugins_json():
    result = run_cli("plugins", "--json")
    payload = json.loads(result.stdout)
    assert payload["core"] == {"version": mcore.__version__, "plugin_api": 1}
    names = {(row["kind"], row["name"]) for row in payload["implementations"] if row["distribution"] == "mcore-core"}
    assert {("layout", "single"), ("precision", "fp32"), ("precision", "bf16")} <= names


def test_plugins_imports_no_torch_and_reports_startup_time():
    code = (
        "import sys, time, io, contextlib\n"
        "t = time.perf_counter()\n"
        "from mcore.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    rc = main(['plugins'])\n"
        "print(rc, 'torch' in sys.modules, time.perf_counter() - t)\n"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - start
    rc, torch_loaded, in_process = out.stdout.split()
    assert (rc, torch_loaded) == ("0", "False"), out.stderr
    print(f"mcore plugins: {float(in_process):.3f} s in process, {wall:.3f} s with interpreter start")


def test_unknown_name_exits_2_with_message():
    result = run_cli(
        "config",
        "--model.name=reference-tiny",
        "--optimizer.name=reference-adamw",
        "--precision.recipe=bf61",
        env={"MCORE_PLUGINS": "mcore_testing.plugin"},
    )
    assert result.returncode == 2
    assert result.stderr.startswith(
        "mcore: error: unknown precision 'bf61' (did you mean 'bf16'?); available precision"
    )
    assert len(result.stderr.strip().splitlines()) == 1


def test_config_prints_resolved_toml(tmp_path: Path):
    import tomllib

    run_toml = tmp_path / "run.toml"
    run_toml.write_text('[model]\nname = "reference-tiny"\npreset = "micro"\n[optimizer]\nname = "reference-adamw"\n')
    result = run_cli(
        "config", str(run_toml), "--train.steps=5", "--optimizer.lr=0.01", env={"MCORE_PLUGINS": "mcore_testing.plugin"}
    )
    assert result.returncode == 0, result.stderr
    resolved = tomllib.loads(result.stdout)
    assert resolved["model"]["hidden_size"] == 16 and resolved["train"]["steps"] == 5
    assert resolved["optimizer"] == {
        "name": "reference-adamw",
        "lr": 0.01,
        "weight_decay": 0.0,
        "beta1": 0.9,
        "beta2": 0.95,
    }
    assert resolved["parallel"]["layouts"] == ["single"]


def test_config_override_whose_value_holds_a_space_is_an_override(tmp_path: Path):
    """argparse takes a `--x=a b` argument for a positional: it was read as the config file."""
    import tomllib

    out_dir = tmp_path / "my runs" / "a b"
    result = run_cli(
        "config",
        "--model.name=reference-tiny",
        "--optimizer.name=reference-adamw",
        f"--train.out_dir={out_dir}",
        env={"MCORE_PLUGINS": "mcore_testing.plugin"},
    )
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["train"]["out_dir"] == str(out_dir)


def test_config_bad_key_exits_2():
    result = run_cli(
        "config",
        "--model.name=reference-tiny",
        "--optimizer.name=reference-adamw",
        "--train.bogus=1",
        env={"MCORE_PLUGINS": "mcore_testing.plugin"},
    )
    assert result.returncode == 2 and "unknown key 'train.bogus'" in result.stderr


def test_plugin_subcommand_runs_with_its_arguments(tmp_path: Path):
    site = tmp_path / "site"
    site.mkdir()
    body = (
        "def main(argv):\n"
        "    print('greetings', *argv)\n"
        "    return 3\n"
        "@hookimpl\n"
        "def mcore_cli_commands(add):\n"
        "    add('greet', 'fake_cli:main', help='print a greeting')\n"
    )
    make_distribution(site, "greet-mcore", "0.2", "fake_cli", plugin_source(body=body))
    env = {"PYTHONPATH": str(site)}
    result = run_cli("greet", "a", "--b=c", env=env)
    assert (result.returncode, result.stdout.strip()) == (3, "greetings a --b=c")
    listing = run_cli("plugins", env=env)
    assert any(line.split()[:3] == ["greet", "greet-mcore", "0.2"] for line in listing.stdout.splitlines())
    assert "greet" in run_cli("--help", env=env).stdout


def test_broken_plugin_does_not_break_the_cli(tmp_path: Path):
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "broken-mcore", "0.4.1", "fake_broken_cli", "raise ImportError('missing dep')\n")
    result = run_cli("plugins", env={"PYTHONPATH": str(site)})
    assert result.returncode == 0
    assert "mcore-core" in result.stdout
    assert (
        "skipped: mcore plugin 'fake_broken_cli' from broken-mcore 0.4.1 failed to import: ImportError: missing dep"
        in result.stdout
    )
    strict = run_cli("plugins", env={"PYTHONPATH": str(site), "MCORE_STRICT_PLUGINS": "1"})
    assert strict.returncode != 0 and "PluginLoadError" in strict.stderr


def test_version_command_lists_torch():
    result = run_cli("version")
    assert result.returncode == 0 and "torch " in result.stdout and f"mcore-core {mcore.__version__}" in result.stdout
