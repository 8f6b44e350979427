"""Optimizer settings that would poison or break a run are refused when the config is resolved.

Each optimizer's ``Config`` checks itself (finite rates, betas in [0, 1), eps > 0, valid
regular expressions, Newton-Schulz settings, layerwise options typed as the inner optimizer's
own section), so ``mcore config`` catches them; ``mcore train`` reports them as one line with
exit code 2 instead of a traceback from building the optimizer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

import mcore.plugins
from mcore.cli import main as mcore_main
from mcore.config import load_raw, resolve_config
from mcore.errors import ConfigError
from mcore.train.cli import main as train_main
from mcore_optim.adamw import AdamWFactory
from mcore_optim.distributed_adamw import DistributedAdamWFactory
from mcore_optim.layerwise import LayerwiseFactory
from mcore_optim.muon import MuonFactory
from mcore_testing.hosts import isolated_host

# the model comes from the harness: this package's tests run without mcore-models
BASE = ["--model.name=reference-tiny", "--model.vocab_size=257"]


@pytest.fixture
def host() -> Any:
    return isolated_host("mcore_optim.plugin", "mcore_testing.plugin")


def resolve(host: Any, *overrides: str) -> Any:
    return resolve_config(load_raw(None, [*BASE, *overrides]), host)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--optimizer.lr=-1"], "optimizer.lr = -1.0; allowed: a finite number >= 0"),
        (["--optimizer.lr=nan"], "optimizer.lr = 'nan': expected a number, not NaN"),
        (["--optimizer.lr=inf"], "optimizer.lr = 'inf': expected a finite number"),
        (["--optimizer.weight_decay=-0.1"], "optimizer.weight_decay = -0.1; allowed: a finite number >= 0"),
        (["--optimizer.betas=0.9,1.0"], "optimizer.betas = (0.9, 1.0); allowed: two numbers in [0, 1)"),
        (["--optimizer.betas=0.9,nan"], "optimizer.betas[1] = 'nan': expected a number, not NaN"),
        (["--optimizer.eps=0"], "optimizer.eps = 0.0; allowed: a finite number > 0"),
        (["--optimizer.eps=inf"], "optimizer.eps = 'inf': expected a finite number"),
        (
            ["--optimizer.role_overrides=(lm_head=head"],
            "optimizer.role_overrides: '(lm_head' is not a valid regular expression",
        ),
        (
            ["--optimizer.role_overrides=head=output"],
            "optimizer.role_overrides: 'head' = 'output' is not a role; allowed: embedding, head, matrix",
        ),
        (["--optimizer.no_decay_roles=norms"], "optimizer.no_decay_roles = ('norms',) names unknown role 'norms'"),
        (["--optimizer.mup_base_width=8"], "optimizer.mup_base_width = 8, mup_width = None; muP scaling needs both"),
        (["--optimizer.name=distributed-adamw", "--optimizer.lr=-1"], "optimizer.lr = -1.0; allowed"),
        (["--optimizer.name=muon", "--optimizer.momentum=1"], "optimizer.momentum = 1.0; allowed: a number in [0, 1)"),
        (["--optimizer.name=muon", "--optimizer.momentum=nan"], "optimizer.momentum = 'nan': expected a number"),
        (["--optimizer.name=muon", "--optimizer.ns_eps=0"], "optimizer.ns_eps = 0.0; allowed: a finite number > 0"),
        (["--optimizer.name=muon", "--optimizer.ns_steps=0"], "optimizer.ns_steps = 0; allowed: a positive int"),
        (
            ["--optimizer.name=muon", "--optimizer.ns_coefficients=cubic"],
            "optimizer.ns_coefficients = 'cubic'; allowed",
        ),
        (
            ["--optimizer.name=muon", "--optimizer.ns_coefficients=[[NaN, 1, 1]]"],
            "optimizer.ns_coefficients[0][0] = nan: expected a number, not NaN",
        ),
        (["--optimizer.name=muon", "--optimizer.split_heads=maybe"], "optimizer.split_heads = 'maybe': expected bool"),
        (
            ["--optimizer.name=muon", "--optimizer.role_overrides=[=head"],
            "optimizer.role_overrides: '[' is not a valid",
        ),
        (["--optimizer.name=muon", "--optimizer.adamw_lr=-1"], "optimizer.adamw_lr = -1.0; allowed: a finite number"),
        (["--optimizer.name=muon", "--optimizer.adamw_eps=0"], "optimizer.adamw_eps = 0.0; allowed: a finite number"),
        (["--optimizer.name=layerwise-distributed", "--optimizer.lr=-1"], "optimizer.lr = -1.0; allowed"),
        (["--optimizer.name=layerwise-distributed", "--optimizer.inner=sgd"], "optimizer.inner = 'sgd'; allowed"),
        (
            ["--optimizer.name=layerwise-distributed", "--optimizer.inner=muon", "--optimizer.options=momentum=1.5"],
            "optimizer.options.momentum = 1.5; allowed: a number in [0, 1)",
        ),
        (
            ["--optimizer.name=layerwise-distributed", "--optimizer.inner=muon", "--optimizer.options=ns_steps=many"],
            "optimizer.options.ns_steps = 'many': expected int or none",
        ),
        (
            ["--optimizer.name=layerwise-distributed", "--optimizer.options=momentum=0.9"],
            "optimizer.options.momentum = '0.9' is not a setting of inner optimizer 'adamw'",
        ),
    ],
)
def test_bad_optimizer_settings_are_refused_at_resolve(host: Any, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(host, *overrides)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(message), str(info.value)


def test_layerwise_options_are_typed_like_the_inner_section(host: Any) -> None:
    config = resolve(
        host,
        "--optimizer.name=layerwise-distributed",
        "--optimizer.inner=muon",
        "--optimizer.options=ns_steps=3,momentum=0.9,ns_coefficients=simple",
    )
    assert config.optimizer.config.options == {"ns_steps": 3, "momentum": 0.9, "ns_coefficients": "simple"}
    assert config.optimizer.instantiate().inner.config.ns_steps == 3


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: AdamWFactory.Config(lr=math.nan), "lr"),
        (lambda: AdamWFactory.Config(lr=math.inf), "lr"),
        (lambda: AdamWFactory.Config(eps=math.nan), "eps"),
        (lambda: AdamWFactory.Config(betas=(math.nan, 0.9)), "betas"),
        (lambda: AdamWFactory.Config(weight_decay=math.nan), "weight_decay"),
        (lambda: DistributedAdamWFactory.Config(lr=-1.0), "lr"),
        (lambda: MuonFactory.Config(momentum=math.nan), "momentum"),
        (lambda: MuonFactory.Config(adamw_weight_decay=math.inf), "adamw_weight_decay"),
        (lambda: MuonFactory.Config(ns_coefficients=[[math.nan, 1.0, 1.0]]), "ns_coefficients"),
        (lambda: LayerwiseFactory.Config(lr=math.nan), "lr"),
    ],
)
def test_configs_built_in_python_refuse_non_finite_values(build: Any, key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{key} = "):
        build()


@pytest.fixture
def cli_host(host: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(mcore.plugins, "load_plugins", lambda **kw: host)
    return host


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["--optimizer.lr=-1"], "optimizer.lr = -1.0"),
        (["--optimizer.lr=nan"], "optimizer.lr = 'nan'"),
        (["--optimizer.name=muon", "--optimizer.role_overrides=(=head"], "optimizer.role_overrides: '('"),
    ],
)
def test_commands_report_one_line_and_exit_2(
    cli_host: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], expected: str
) -> None:
    out_dir = tmp_path / "run"
    commands = [
        lambda: mcore_main(["config", *BASE, *overrides]),
        lambda: train_main([*BASE, f"--train.out_dir={out_dir}", *overrides]),
    ]
    for command in commands:
        rc = command()
        err = capsys.readouterr().err
        assert rc == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mcore: error: ") and expected in lines[0], err
    assert not out_dir.exists()
