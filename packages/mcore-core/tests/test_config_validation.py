"""Config values that cannot work are refused when the config is resolved, as one line and exit code 2.

NaN and infinite floats, ranges checked in each ``Config.__post_init__`` (named by section and
key), rules across sections (``check_run``), unreadable config files, an ``out_dir`` that is a
file, and ``parallel.device = 'cuda'`` without CUDA; through ``resolve_config``, ``mcore config``
and ``mcore train``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import mcore.plugins
from mcore.cli import main as mcore_main
from mcore.config import ALLOW_INF, build_dataclass, load_raw, resolve_config
from mcore.config.sections import DataConfig, LogConfig, ParallelConfig, TrainConfig
from mcore.errors import ConfigError, UserError
from mcore.plugins import hookimpl
from mcore.train.cli import main as train_main
from mcore_testing.hosts import isolated_host
from mcore_testing.reference import TinyModelFactory

BASE = ["--model.name=reference-tiny", "--optimizer.name=reference-adamw"]


class StrictOptimizer:
    """An optimizer whose ``Config`` checks itself the way plugins do: messages start with the bare key."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        lr: float = 1e-3
        momentum: float = 0.9

        def __post_init__(self) -> None:
            if not self.lr >= 0:
                raise ValueError(f"lr = {self.lr!r}; allowed: a number >= 0")
            if self.momentum > 0.99:
                raise TypeError(f"momentum = {self.momentum!r}\nis too close to 1")


class SeqLenModel(TinyModelFactory):
    """``reference-tiny`` with the cross-section hook: a row must fit its position table."""

    @staticmethod
    def check_run(config: Any, run: Any) -> None:
        if run.train.seq_len > config.max_seq_len:
            raise ValueError(
                f"train.seq_len = {run.train.seq_len} is more than model.max_seq_len = {config.max_seq_len}"
            )


class TestPlugin:
    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        registry.add("optimizer", "strict", StrictOptimizer)
        registry.add("model", "seq-len-tiny", SeqLenModel)


@pytest.fixture
def host() -> Any:
    return isolated_host("mcore_testing.plugin", TestPlugin())


@pytest.fixture
def cli_host(host: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(mcore.plugins, "load_plugins", lambda **kw: host)
    return host


def resolve(host: Any, *overrides: str, path: Path | None = None) -> Any:
    return resolve_config(load_raw(path, [*BASE, *overrides]), host)


def one_line_error(host: Any, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(host, *overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- floats: NaN never, infinity only where a field opts in ----------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--optimizer.lr=nan", "optimizer.lr = 'nan': expected a number, not NaN"),
        ("--optimizer.lr=inf", "optimizer.lr = 'inf': expected a finite number"),
        ("--optimizer.lr=-inf", "optimizer.lr = '-inf': expected a finite number"),
        ("--train.grad_clip=nan", "train.grad_clip = 'nan': expected a number, not NaN"),
        ("--train.min_lr_ratio=NaN", "train.min_lr_ratio = 'NaN': expected a number, not NaN"),
        ("--data.weights=1,nan", "data.weights[1] = 'nan': expected a number, not NaN"),
        ("--log.peak_tflops=nan", "log.peak_tflops = 'nan': expected a number, not NaN"),
        ("--parallel.timeout_s=inf", "parallel.timeout_s = 'inf': expected a finite number"),
    ],
)
def test_non_finite_floats_are_refused(host: Any, override: str, message: str) -> None:
    assert one_line_error(host, override) == message


def test_non_finite_floats_from_toml(host: Any, tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[train]\ngrad_clip = nan\n")
    with pytest.raises(ConfigError, match=r"^train.grad_clip = nan: expected a number, not NaN$"):
        resolve(host, path=path)
    path.write_text("[optimizer]\nlr = inf\n")
    with pytest.raises(ConfigError, match=r"^optimizer.lr = inf: expected a finite number$"):
        resolve(host, path=path)


def test_a_field_may_allow_infinity_but_never_nan() -> None:
    @dataclass(kw_only=True)
    class Limits:
        max_norm: float = field(default=math.inf, metadata={ALLOW_INF: True})
        scale: float = 1.0

    assert build_dataclass(Limits, {"max_norm": "inf"}, "limits").max_norm == math.inf
    with pytest.raises(ConfigError, match=r"^limits.max_norm = 'nan': expected a number, not NaN$"):
        build_dataclass(Limits, {"max_norm": "nan"}, "limits")
    with pytest.raises(ConfigError, match=r"^limits.scale = 'inf': expected a finite number$"):
        build_dataclass(Limits, {"scale": "inf"}, "limits")


# -- ranges of the core's sections -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--parallel.timeout_s=0", "parallel.timeout_s = 0.0: must be finite and > 0"),
        ("--parallel.timeout_s=-5", "parallel.timeout_s = -5.0: must be finite and > 0"),
        ("--train.grad_clip=-1", "train.grad_clip = -1.0: must be a finite number >= 0 (0 disables clipping)"),
        ("--train.spike_factor=0.5", "train.spike_factor = 0.5: must be 0 (off) or a finite number > 1"),
        ("--data.weights=1,0", "data.weights = [1.0, 0.0]: every weight must be finite and > 0"),
        ("--log.peak_tflops=0", "log.peak_tflops = 0.0: must be finite and > 0, or none"),
        ("--log.profile_from=-1", "log.profile_from = -1: must be >= 0 (0 is off)"),
        ("--log.profile_steps=0", "log.profile_steps = 0: must be >= 1"),
    ],
)
def test_core_ranges(host: Any, override: str, message: str) -> None:
    assert one_line_error(host, override) == message


@pytest.mark.parametrize(
    ("cls", "values", "key"),
    [
        (TrainConfig, {"grad_clip": math.nan}, "train.grad_clip"),
        (TrainConfig, {"grad_clip": math.inf}, "train.grad_clip"),
        (TrainConfig, {"spike_factor": math.nan}, "train.spike_factor"),
        (ParallelConfig, {"timeout_s": math.nan}, "parallel.timeout_s"),
        (DataConfig, {"weights": [math.nan]}, "data.weights"),
        (LogConfig, {"peak_tflops": math.inf}, "log.peak_tflops"),
    ],
)
def test_configs_built_in_python_refuse_non_finite_values(cls: type, values: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{key} = "):
        cls(**values)


def test_out_dir_and_cache_dir_that_are_files(host: Any, tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("not a run")
    assert one_line_error(host, f"--train.out_dir={file}") == (
        f"train.out_dir = '{file}' is a file; choose a directory (it is created if missing)"
    )
    assert one_line_error(host, f"--train.out_dir={file}/run") == (
        f"train.out_dir = '{file}/run' lies under the file '{file}'; choose a directory (it is created if missing)"
    )
    assert "data.cache_dir" in one_line_error(host, f"--data.cache_dir={file}")
    assert resolve(host, f"--train.out_dir={tmp_path}/new/run").train.out_dir == tmp_path / "new" / "run"


# -- errors from any Config's __post_init__ name the section and key -------------------------------
def test_plugin_post_init_errors_name_section_and_key(host: Any) -> None:
    assert one_line_error(host, "--optimizer.name=strict", "--optimizer.lr=-1") == (
        "optimizer.lr = -1.0; allowed: a number >= 0"
    )
    # a TypeError too, and a message over two lines arrives as one
    assert one_line_error(host, "--optimizer.name=strict", "--optimizer.momentum=1") == (
        "optimizer.momentum = 1.0 is too close to 1"
    )


def test_required_field_is_named() -> None:
    @dataclass(kw_only=True)
    class Needs:
        path: str

    with pytest.raises(ConfigError, match=r"^data.path is required \(str\)$"):
        build_dataclass(Needs, {}, "data")


# -- rules across sections: the chosen implementations' check_run ----------------------------------
def test_check_run_sees_the_whole_run(host: Any) -> None:
    message = one_line_error(host, "--model.name=seq-len-tiny", "--model.max_seq_len=64", "--train.seq_len=65")
    assert message == "train.seq_len = 65 is more than model.max_seq_len = 64"
    assert resolve(host, "--model.name=seq-len-tiny", "--model.max_seq_len=64", "--train.seq_len=64")


# -- config files ----------------------------------------------------------------------------------
def test_unreadable_config_files(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"[train]\nsteps = 3\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xe9 on line 3\); save it as UTF-8"):
        load_raw(latin1)
    with pytest.raises(UserError, match=r"is a directory; give a run config .toml file$"):
        load_raw(tmp_path)
    broken = tmp_path / "broken.toml"
    broken.write_text('[train]\nsteps = "3\n')
    with pytest.raises(ConfigError, match=r"is not valid TOML: .*line 2"):
        load_raw(broken)
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[train]\nsteps = 3\n")
    assert load_raw(bom) == {"train": {"steps": 3}}


# -- the commands: one line on stderr, exit code 2 -------------------------------------------------
def bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    """``(arguments after the command, text the one-line error must hold)``."""
    good = tmp_path / "run.toml"
    good.write_text('[model]\nname = "reference-tiny"\n\n[optimizer]\nname = "reference-adamw"\n')
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(good.read_bytes() + b"# \xff\n")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    file = tmp_path / "a_file"
    file.write_text("x")
    return [
        ([str(good), "--optimizer.lr=nan"], "optimizer.lr = 'nan'"),
        ([str(good), "--train.grad_clip=nan"], "train.grad_clip = 'nan'"),
        ([str(good), "--parallel.timeout_s=0"], "parallel.timeout_s = 0.0"),
        ([str(good), "--train.steps=0"], "train.steps = 0"),
        ([str(good), f"--train.out_dir={file}"], f"train.out_dir = '{file}' is a file"),
        ([str(good), "--bad.value"], "'--bad.value'"),
        ([str(good), "--optimizer.name=strict", "--optimizer.lr=-1"], "optimizer.lr = -1.0"),
        ([str(latin1)], "is not UTF-8 text (byte 0xff"),
        ([str(broken)], "is not valid TOML"),
        ([str(tmp_path / "missing.toml")], "does not exist"),
        ([str(tmp_path)], "is a directory"),
    ]


def assert_one_line_exit_2(rc: int, err: str, expected: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mcore: error: "), err
    assert expected in lines[0]


def test_mcore_config_bad_input_is_one_line_exit_2(
    cli_host: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for args, expected in bad_inputs(tmp_path):
        rc = mcore_main(["config", *args])
        assert_one_line_exit_2(rc, capsys.readouterr().err, expected)


def test_mcore_train_bad_input_is_one_line_exit_2(
    cli_host: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default train.out_dir, runs/default, is relative
    for args, expected in bad_inputs(tmp_path):
        rc = train_main(args)
        assert_one_line_exit_2(rc, capsys.readouterr().err, expected)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: parallel.device = 'cuda' is valid here")
def test_cuda_device_without_cuda_is_one_line_exit_2(
    cli_host: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    rc = mcore_main(["train", *BASE, "--model.vocab_size=257", "--parallel.device=cuda", f"--train.out_dir={run}"])
    err = capsys.readouterr().err
    assert_one_line_exit_2(rc, err, "parallel.device = 'cuda', but torch")
    assert "--parallel.device=cpu" in err
    assert not (run / "checkpoints").exists()
