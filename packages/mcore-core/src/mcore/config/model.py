"""The ``[model]`` section: a preset merged under the user's keys, and one section per block.

A model composed of blocks (``gpt``: a layer pattern of mixers and MLPs) takes each block's
settings from its own table, ``[model.attention]``, ``[model.swiglu]``, ``[model.moe]``...,
validated against that registered block's ``Config``: an unknown key is an error naming the block
and the keys it allows. Values every block needs (hidden size, init std, layer count) are
not in these tables; the model passes them to each block explicitly.

A factory may name keys that moved into block tables (``moved_keys = {"num_heads":
"attention.num_heads (or mla.num_heads)"}``), so an old config gets a one-line answer.

A model opts in by giving its ``Config`` a field ``blocks`` (block name -> that block's
validated ``Config``) and a method ``block_names()`` (the blocks the config uses). Its factory
may define ``check_blocks(config, *, block_lookup)`` for rules that need the blocks (a head count
against ``hidden_size``); its ``ValueError`` reaches the user as a one-line ``ConfigError``. A table
naming a block the config does not use is an error when the user wrote it, and dropped when
only the preset did (a preset's ``[model.attention]`` is moot once the user picks ``mla``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mcore.config.coerce import build_dataclass, unknown_key_error
from mcore.errors import ConfigError, UserError
from mcore.presets import Preset, deep_merge

#: Version of the run config's layout; stored with every checkpoint's config (``schema_version``).
#: 2: ``[model]`` of ``gpt`` in per-block sections, separate q/k/v and gate/up weights.
CONFIG_SCHEMA_VERSION = 2


def find_preset(host: Any, factory: Any, model: str | None, name: Any, owner: str) -> Preset:
    """The preset ``name``: registered (kind ``"preset"``) or, for older factories, from ``factory.presets()``."""
    if not isinstance(name, str):
        raise ConfigError(f"model.preset = {name!r}: expected a preset name (a string)")
    registry = host.registry
    if ("preset", name) in registry:
        preset = registry.load("preset", name)
        if not isinstance(preset, Preset):
            raise UserError(f"preset {name!r} ({registry.get('preset', name).source}) is not an mcore.presets.Preset")
        return preset
    legacy = getattr(factory, "presets", None) if factory is not None else None
    if callable(legacy) and name in dict(legacy()):
        return Preset(model=model or "", values=dict(legacy())[name])
    known = sorted({*_presets_of(host, model), *(dict(legacy()) if callable(legacy) else {})})
    import difflib

    nearest = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
    listing = ", ".join(known) if known else "none installed"
    raise ConfigError(f"model.preset = {name!r}: unknown preset of {owner}; allowed: {listing}{hint}")


def _presets_of(host: Any, model: str | None) -> list[str]:
    out = []
    for name in host.registry.names("preset"):
        try:
            preset = host.registry.load("preset", name)
        except Exception:  # a preset that fails to import is listed by `mcore plugins`, not here
            continue
        if model is None or getattr(preset, "model", None) == model:
            out.append(name)
    return out


def presets_of(host: Any, factory: Any, model: str) -> list[str]:
    """Names of the presets of ``model``: registered ones and, for older factories, ``factory.presets()``."""
    legacy = getattr(factory, "presets", None)
    return sorted({*_presets_of(host, model), *(dict(legacy()) if callable(legacy) else {})})


def preset_model(host: Any, values: dict[str, Any]) -> str | None:
    """The model a registered ``values["preset"]`` configures (to default ``model.name``), else None."""
    name = values.get("preset")
    if isinstance(name, str) and ("preset", name) in host.registry:
        preset = host.registry.load("preset", name)
        return preset.model if isinstance(preset, Preset) else None
    return None


def resolve_model_config(host: Any, impl: Any, factory: Any, values: dict[str, Any]) -> Any:
    """The model's validated ``Config`` from the ``[model]`` keys ``values`` (``name`` removed)."""
    config_cls = getattr(factory, "Config", None)
    owner = f"model {impl.name!r} ({impl.source})"
    if config_cls is None:
        return section_config(None, values, "model", owner)
    user_values = values
    if values.get("preset") is not None:
        preset = find_preset(host, factory, impl.name, values["preset"], owner)
        if preset.model and preset.model != impl.name:
            raise ConfigError(
                f"model.preset = {values['preset']!r} is a preset of model {preset.model!r}, not of "
                f"model.name = {impl.name!r}; set model.name = {preset.model!r} or choose a preset of {impl.name!r}"
            )
        values = deep_merge(preset.values, values)
    field_names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    moved = getattr(factory, "moved_keys", None) or {}
    for key in values:
        if key not in field_names and not isinstance(values[key], dict) and key in moved:
            raise ConfigError(
                f"model.{key} is no longer a [model] key (run config schema {CONFIG_SCHEMA_VERSION}): it is "
                f"{moved[key]}; e.g. --model.{moved[key].split()[0]}={values[key]}"
            )
    sections = {k: v for k, v in values.items() if isinstance(v, dict) and k not in field_names}
    if sections and "blocks" not in field_names:
        key = next(iter(sections))
        raise unknown_key_error("model.", key, sections[key], sorted(field_names), owner)
    if "blocks" in values:
        raise ConfigError("model.blocks: write each block's settings as its own table, e.g. [model.attention]")
    plain = {k: v for k, v in values.items() if k not in sections}
    blocks = {name: _block_config(host, name, section) for name, section in sections.items()}
    config = build_dataclass(config_cls, {**plain, **({"blocks": blocks} if sections else {})}, "model", owner)
    config = _drop_unused(config, sections, user_values)
    check = getattr(factory, "check_blocks", None)
    if callable(check):  # rules that need the blocks themselves (head counts against hidden_size...)
        try:
            check(config, block_lookup=lambda name: host.load("block", name))
        except (TypeError, ValueError) as exc:
            raise ConfigError(" ".join(str(exc).split())) from None
    return config


def _drop_unused(config: Any, sections: dict[str, Any], user_values: dict[str, Any]) -> Any:
    """Refuse a block table the user wrote for a block the config does not use; drop a preset's."""
    used = getattr(config, "block_names", None)
    if not sections or not callable(used):
        return config
    in_use = list(used())
    unused = [name for name in sections if name not in in_use]
    written = [name for name in unused if isinstance(user_values.get(name), dict)]
    if written:
        raise ConfigError(
            f"[model.{written[0]}] configures block {written[0]!r}, which this model does not use "
            f"(its blocks: {', '.join(in_use)}); remove the table or choose the block in the layer pattern"
        )
    if unused:
        config = dataclasses.replace(config, blocks={k: v for k, v in config.blocks.items() if k not in unused})
    return config


def load_implementation(impl: Any) -> Any:
    """``impl.load()``; an ``ImportError`` becomes a one-line ``UserError`` saying what to reinstall."""
    try:
        return impl.load()
    except ImportError as exc:
        raise UserError(
            f"{impl.kind} {impl.name!r} is registered by {impl.source} but fails to import ({exc}); "
            f"reinstall {impl.source.distribution}"
        ) from None


def section_config(config_cls: type | None, values: dict[str, Any], prefix: str, owner: str) -> Any:
    """``values`` validated against ``config_cls``; with no ``Config``, any key is an unknown key."""
    if config_cls is None:
        if values:
            key, value = next(iter(values.items()))
            raise unknown_key_error(f"{prefix}.", key, value, [], owner)
        return None
    return build_dataclass(config_cls, values, prefix, owner)


def _block_config(host: Any, name: str, values: dict[str, Any]) -> Any:
    """Block ``name``'s ``Config`` from table ``[model.<name>]``."""
    try:
        impl = host.get("block", name)
    except UserError as exc:
        raise ConfigError(f"[model.{name}]: a table in [model] configures a block by name; {exc}") from None
    block = load_implementation(impl)
    return section_config(getattr(block, "Config", None), values, f"model.{name}", f"block {name!r} ({impl.source})")


def check_schema_version(value: Any, where: str) -> None:
    """Refuse a config written for another layout than ``CONFIG_SCHEMA_VERSION`` (one line, saying what to do)."""
    if value is None or value == CONFIG_SCHEMA_VERSION:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value > CONFIG_SCHEMA_VERSION:
        raise ConfigError(
            f"{where}: schema_version = {value} was written by a newer mcore (this one reads {CONFIG_SCHEMA_VERSION}); "
            "upgrade mcore-core and the plugins"
        )
    raise ConfigError(
        f"{where}: schema_version = {value!r} is not supported (this mcore reads {CONFIG_SCHEMA_VERSION}: "
        "per-block [model.<block>] tables, separate q/k/v and gate/up weights)"
    )
