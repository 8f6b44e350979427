"""``[model]`` resolution: registered presets, per-block tables, the schema version, HF families as a kind.

A small composed model is registered here (two mixers, one MLP, presets of two models), so the
core's rules are tested without any model plugin.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mcore.config import CONFIG_SCHEMA_VERSION, load_raw, resolve_config
from mcore.config.model import presets_of
from mcore.errors import ConfigError, UnknownNameError, UserError
from mcore.helptext import config_reference
from mcore.hf import HFFamily, export_family, load_hf
from mcore.plugins import hookimpl
from mcore.presets import Preset, deep_merge
from mcore_testing.hosts import isolated_host


class Mixer:
    @dataclass(kw_only=True)
    class Config:
        num_heads: int = 4
        """Heads."""

        def __post_init__(self) -> None:
            if self.num_heads < 1:
                raise ValueError(f"num_heads = {self.num_heads}: must be >= 1")


class Other:
    @dataclass(kw_only=True)
    class Config:
        rank: int = 8


class Dense:
    @dataclass(kw_only=True)
    class Config:
        ffn_hidden_size: int = 16


class Composed:
    @dataclass(kw_only=True)
    class Config:
        preset: str | None = None
        hidden_size: int = 8
        mixer: str = "mix"
        blocks: dict[str, Any] = field(default_factory=dict)

        def block_names(self) -> list[str]:
            return [self.mixer, "dense"]

    @staticmethod
    def check_blocks(config: Any, *, block_lookup: Any) -> None:
        heads = getattr(config.blocks.get("mix"), "num_heads", 4)
        if config.hidden_size % heads:
            raise ValueError(f"model.mix.num_heads = {heads}: must divide hidden_size = {config.hidden_size}")

    @staticmethod
    def hf_family(config: Any) -> str:
        return "toy"


class Flat:
    @dataclass(kw_only=True)
    class Config:
        preset: str | None = None
        width: int = 3


class ToyFamily:
    model = "composed"

    def load(self, path: Path, *, device: Any, block_lookup: Any) -> tuple[Any, Any]:
        if json.loads((path / "config.json").read_text()).get("rope_type") == "ntk":
            raise ValueError("config.json rope type = 'ntk':\n allowed: default")
        return ("config-of", path.name), block_lookup("mix")

    def export(self, model: Any, config: Any, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")


SMALL = Preset("composed", {"hidden_size": 12, "mix": {"num_heads": 3}, "dense": {"ffn_hidden_size": 24}})
FLAT = Preset("flat", {"width": 5})


class Plugin:
    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        for name, obj in (("mix", Mixer), ("other", Other), ("dense", Dense)):
            registry.add("block", name, obj)
        registry.add("model", "composed", Composed)
        registry.add("model", "flat", Flat)
        registry.add("preset", "small", SMALL)
        registry.add("preset", "flat-5", FLAT)
        registry.add("hf", "toy", ToyFamily())


@pytest.fixture
def host():
    return isolated_host("mcore_testing.plugin", Plugin())


BASE = ["--optimizer.name=reference-adamw"]


def resolve(host, *overrides, path=None):
    return resolve_config(load_raw(path, [*BASE, *overrides]), host)


def test_block_tables_validate_against_each_block(host):
    config = resolve(host, "--model.name=composed", "--model.mix.num_heads=2", "--model.dense.ffn_hidden_size=32")
    blocks = config.model.config.blocks
    assert blocks["mix"] == Mixer.Config(num_heads=2) and blocks["dense"] == Dense.Config(ffn_hidden_size=32)
    with pytest.raises(ConfigError, match=r"unknown key 'model.mix.num_head' .*block 'mix'.*num_heads"):
        resolve(host, "--model.name=composed", "--model.mix.num_head=2")
    with pytest.raises(ConfigError, match=r"^model\.mix\.num_heads = 0: must be >= 1$"):
        resolve(host, "--model.name=composed", "--model.mix.num_heads=0")
    with pytest.raises(ConfigError, match=r"\[model.mixx\]: a table in \[model\] configures a block by name; .*'mix'"):
        resolve(host, "--model.name=composed", "--model.mixx.num_heads=2")


def test_table_of_a_block_the_model_does_not_use(host):
    with pytest.raises(ConfigError, match=r"\[model.other\] configures block 'other', which this model does not use"):
        resolve(host, "--model.name=composed", "--model.other.rank=4")
    config = resolve(host, "--model.name=composed", "--model.mixer=other", "--model.other.rank=4")
    assert config.model.config.blocks == {"other": Other.Config(rank=4)}


def test_a_model_without_blocks_refuses_tables(host):
    with pytest.raises(ConfigError, match=r"unknown key 'model.mix'.*model 'flat'"):
        resolve(host, "--model.name=flat", "--model.mix.num_heads=2")


def test_check_blocks_runs_at_config_time(host):
    with pytest.raises(ConfigError, match=r"^model.mix.num_heads = 3: must divide hidden_size = 8$"):
        resolve(host, "--model.name=composed", "--model.mix.num_heads=3")


def test_registered_preset_merges_under_user_keys_and_names_its_model(host):
    config = resolve(host, "--model.preset=small", "--model.dense.ffn_hidden_size=40")
    assert config.model.name == "composed"  # the preset's model, since model.name was not given
    cfg = config.model.config
    assert cfg.hidden_size == 12 and cfg.blocks["mix"].num_heads == 3 and cfg.blocks["dense"].ffn_hidden_size == 40
    # the preset's table of the mixer the user swapped out is dropped, not an error
    swapped = resolve(host, "--model.preset=small", "--model.mixer=other")
    assert set(swapped.model.config.blocks) == {"dense"}


def test_preset_of_another_model_and_unknown_preset(host):
    with pytest.raises(ConfigError, match=r"'flat-5' is a preset of model 'flat', not of model.name = 'composed'"):
        resolve(host, "--model.name=composed", "--model.preset=flat-5")
    with pytest.raises(ConfigError, match=r"model.preset = 'smal': unknown preset .* allowed: small; did you mean"):
        resolve(host, "--model.name=composed", "--model.preset=smal")
    assert presets_of(host, Composed, "composed") == ["small"]


def test_resolved_config_round_trips_with_block_tables_and_schema_version(host):
    config = resolve(host, "--model.preset=small")
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["schema_version"] == CONFIG_SCHEMA_VERSION
    assert stored["model"]["mix"] == {"num_heads": 3} and "blocks" not in stored["model"]
    again = resolve_config(stored, host)
    assert again.model.config == config.model.config


def test_schema_versions(host):
    raw = load_raw(None, [*BASE, "--model.name=flat"])
    with pytest.raises(ConfigError, match=r"schema_version = 3 was written by a newer mcore"):
        resolve_config({**raw, "schema_version": 3}, host)
    with pytest.raises(ConfigError, match=r"schema_version = 1 is not supported"):
        resolve_config({**raw, "schema_version": 1}, host)


def test_old_checkpoint_config_is_refused(tmp_path: Path):
    from mcore.checkpoint.load import check_stored_schema

    old = {"model": {"name": "gpt", "num_heads": 4}}
    with pytest.raises(UserError, match=r"written before run config schema 2 .* cannot read it"):
        check_stored_schema(tmp_path, old)
    with pytest.raises(UserError, match=r"schema_version = 3, newer than this mcore reads"):
        check_stored_schema(tmp_path, {**old, "schema_version": 3})
    check_stored_schema(tmp_path, {**old, "schema_version": CONFIG_SCHEMA_VERSION})


def test_help_lists_presets_and_block_tables(host):
    text = config_reference(load_raw(None, ["--model.preset=small"]), host, width=200)
    assert "presets of 'composed': small" in text
    assert "[model.mix]" in text and "num_heads" in text and "[model.dense]" in text


def test_hf_family_is_a_registered_kind(host, tmp_path: Path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "toy"}))
    name, config, model = load_hf(model_dir, host)
    assert (name, config, model) == ("composed", ("config-of", "m"), Mixer)
    assert isinstance(host.load("hf", "toy"), HFFamily)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "toy", "rope_type": "ntk"}))
    with pytest.raises(UserError, match=r"^.*/m: config.json rope type = 'ntk': allowed: default$"):
        load_hf(model_dir, host)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnknownNameError, match=r"unknown hf 'llama'.*toy"):
        load_hf(model_dir, host)
    family = export_family(Composed, "composed", None, host)
    assert family.model == "composed"
    with pytest.raises(UserError, match=r"model 'flat' has no Hugging Face mapping"):
        export_family(Flat, "flat", None, host)


def test_preset_values_are_read_only_and_checked():
    with pytest.raises(TypeError):
        SMALL.values["hidden_size"] = 3  # type: ignore[index]
    with pytest.raises(ValueError, match="may not set 'name'"):
        Preset("composed", {"name": "x"})
    merged = deep_merge(SMALL.values, {"mix": {"num_heads": 1}})
    assert merged == {"hidden_size": 12, "mix": {"num_heads": 1}, "dense": {"ffn_hidden_size": 24}}
    assert dataclasses.is_dataclass(Preset)
