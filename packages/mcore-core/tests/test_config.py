"""Typed config: TOML + dotted overrides, per-implementation schemas, and the error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcore.config import load_raw, parse_overrides, resolve_config
from mcore.errors import ConfigError, UnknownNameError, UserError
from mcore_testing.hosts import isolated_host

BASE = ["--model.name=reference-tiny", "--optimizer.name=reference-adamw"]


@pytest.fixture
def host():
    return isolated_host("mcore_testing.plugin")


def resolve(host, *overrides, path=None):
    return resolve_config(load_raw(path, [*BASE, *overrides]), host)


def test_defaults_resolve(host):
    config = resolve(host)
    assert config.model.name == "reference-tiny" and config.model.config.hidden_size == 32
    assert config.precision.name == "fp32" and config.parallel.layouts == ["single"]
    assert config.optimizer.config.lr == 1e-3


def test_toml_then_overrides_win(host, tmp_path: Path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[model]\nname = "reference-tiny"\nhidden_size = 48\n\n[train]\nsteps = 7\nseq_len = 32\n\n'
        '[precision]\nrecipe = "bf16"\nparams = "fp32"\n'
    )
    config = resolve_config(
        load_raw(path, ["--train.steps=9", "--optimizer.name=reference-adamw", "--optimizer.lr=3e-4"]), host
    )
    assert config.model.config.hidden_size == 48
    assert (config.train.steps, config.train.seq_len) == (9, 32)
    assert config.optimizer.config.lr == pytest.approx(3e-4)
    assert config.precision.config.params == "fp32"


def test_preset_values_apply_under_explicit_keys(host):
    config = resolve(host, "--model.preset=micro", "--model.num_layers=3")
    assert (config.model.config.hidden_size, config.model.config.num_layers) == (16, 3)


def test_unknown_preset_lists_presets(host):
    with pytest.raises(
        ConfigError, match=r"model.preset = 'mirco': unknown preset .* allowed: micro, tiny; did you mean 'micro'\?"
    ):
        resolve(host, "--model.preset=mirco")


def test_list_override_for_layouts(host):
    raw = load_raw(None, ["--parallel.layouts=single", "--parallel.sizes=dp_shard=2"])
    assert raw["parallel"] == {"layouts": "single", "sizes": "dp_shard=2"}


def test_unknown_key_in_implementation_section(host):
    with pytest.raises(ConfigError) as err:
        resolve(host, "--model.hiden_size=64")
    assert str(err.value).startswith("unknown key 'model.hiden_size' (value '64'); model 'reference-tiny' (")
    assert str(err.value).endswith("did you mean 'hidden_size'?")
    assert "allows: ffn_size, fused, hidden_size, max_seq_len" in str(err.value)


def test_unknown_key_in_core_section(host):
    with pytest.raises(
        ConfigError, match=r"unknown key 'train.stpes' \(value '5'\); \[train\] allows: .*did you mean 'steps'\?"
    ):
        resolve(host, "--train.stpes=5")


def test_unknown_section(host):
    with pytest.raises(ConfigError, match=r"unknown key 'trian' .* a run config allows: .*did you mean 'train'\?"):
        resolve(host, "--trian.steps=5")


def test_bad_value_names_key_value_and_type(host):
    with pytest.raises(ConfigError, match=r"^train.steps = 'many': expected int$"):
        resolve(host, "--train.steps=many")
    with pytest.raises(ConfigError, match=r"^precision.params = 'fp8': expected one of: 'bf16', 'fp32'$"):
        resolve(host, "--precision.recipe=bf16", "--precision.params=fp8")


def test_validation_in_post_init_names_key(host):
    with pytest.raises(ConfigError, match=r"train.steps = 0: must be a positive int"):
        resolve(host, "--train.steps=0")


def test_unknown_implementation_name(host):
    with pytest.raises(UnknownNameError, match="did you mean 'bf16'"):
        resolve(host, "--precision.recipe=bf17")


def test_options_for_unused_layout_are_an_error(host):
    with pytest.raises(ConfigError, match=r"\[parallel.fsdp\] configures layout 'fsdp', which parallel.layouts"):
        resolve(host, "--parallel.fsdp.reshard=true")


def test_implementation_without_config_rejects_keys(host):
    with pytest.raises(
        ConfigError, match=r"unknown key 'precision.foo' .* precision 'fp32' \(mcore-core .*\) allows: none"
    ):
        resolve(host, "--precision.foo=1")


def test_bad_override_shapes():
    with pytest.raises(ConfigError, match="must look like --section.key=value"):
        parse_overrides(["--train.steps"])
    with pytest.raises(ConfigError, match="the key must be section.key"):
        parse_overrides(["--steps=3"])


def test_missing_and_invalid_files(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        load_raw(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps=")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_raw(bad)
    deep = tmp_path / "deep.toml"  # a RecursionError traceback in tomllib (found by trying it)
    deep.write_text("x = " + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nests arrays or tables too deeply"):
        load_raw(deep)


def test_to_dict_round_trips_through_toml(host, tmp_path: Path):
    import tomli_w

    config = resolve(host, "--precision.recipe=bf16", "--train.steps=3")
    path = tmp_path / "resolved.toml"
    path.write_text(tomli_w.dumps(config.to_dict()))
    again = resolve_config(load_raw(path), host)
    assert again.to_dict() == config.to_dict()
