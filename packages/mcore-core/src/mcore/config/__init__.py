"""Typed run configuration: TOML file + dotted command-line overrides -> ``RunConfig``.

``load_raw`` reads a TOML file and applies ``--section.key=value`` overrides;
``resolve_config`` validates every section against its schema (core sections against
``mcore.config.sections``, implementation sections against the chosen implementation's
``Config``) and returns a ``RunConfig``. Errors name the key, the value and what is allowed.

Rules that cross sections (the model's longest sequence against ``train.seq_len``) belong to
the implementation that knows them: any chosen implementation (model, optimizer, precision
recipe, layout) may define ``check_run(config, run)``, called with its own validated
``Config`` and the whole ``RunConfig`` once every section is resolved. It raises
``ValueError`` naming the keys (``"train.seq_len = 8192 is more than ..."``); the user gets
that message as a one-line ``ConfigError``. So ``mcore config`` refuses what ``mcore train``
would, before any data is prepared.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcore.config.coerce import ALLOW_INF, build_dataclass, coerce, field_types, to_plain, unknown_key_error
from mcore.config.model import (
    CONFIG_SCHEMA_VERSION,
    check_schema_version,
    load_implementation,
    preset_model,
    resolve_model_config,
    section_config,
)
from mcore.config.sections import (
    CORE_SECTIONS,
    SELECTED_SECTIONS,
    CheckpointConfig,
    DataConfig,
    LogConfig,
    ParallelConfig,
    TrainConfig,
)
from mcore.errors import ConfigError, UserError

if TYPE_CHECKING:
    from mcore.plugins import Implementation, PluginHost

__all__ = [
    "ALLOW_INF",
    "CONFIG_SCHEMA_VERSION",
    "ConfigError",
    "DataConfig",
    "ParallelConfig",
    "RunConfig",
    "Selection",
    "TrainConfig",
    "build_dataclass",
    "check_run",
    "coerce",
    "load_raw",
    "parse_overrides",
    "resolve_config",
]


@dataclass
class Selection:
    """An implementation chosen by name, with its validated ``Config`` instance (or ``None``)."""

    kind: str
    name: str
    config: Any
    implementation: Implementation

    def instantiate(self) -> Any:
        """``cls(config)`` for implementations with a ``Config``, else ``cls()``."""
        factory = self.implementation.load()
        return factory(self.config) if self.config is not None else factory()


@dataclass
class RunConfig:
    """A fully resolved run: every section typed and every name resolved."""

    model: Selection
    optimizer: Selection
    precision: Selection
    parallel: ParallelConfig
    layouts: list[Selection]
    train: TrainConfig
    data: DataConfig
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain values (what ``mcore config`` prints as TOML)."""
        out: dict[str, Any] = {"schema_version": CONFIG_SCHEMA_VERSION}
        for section, (selector, _kind, _default) in SELECTED_SECTIONS.items():
            sel: Selection = getattr(self, section)
            values = to_plain(sel.config) if sel.config is not None else {}
            blocks = values.pop("blocks", None) if section == "model" else None
            out[section] = {selector: sel.name, **values, **(blocks or {})}  # block sections: [model.<block>]
        parallel = to_plain(self.parallel)
        for layout in self.layouts:
            if layout.config is not None:
                parallel[layout.name] = to_plain(layout.config)
        out["parallel"] = parallel
        for name in CORE_SECTIONS:
            if name != "parallel":
                out[name] = to_plain(getattr(self, name))
        out.update(copy.deepcopy(self.extra))
        return out


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``["--model.hidden_size=1024", "--parallel.layouts=tp,fsdp"]`` -> nested dict of strings."""
    tree: dict[str, Any] = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like --section.key=value (e.g. --train.steps=100)")
        dotted, value = arg[2:].split("=", 1)
        parts = dotted.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {arg!r}: the key must be section.key (e.g. --model.hidden_size=1024)")
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {arg!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


#: Largest run config file read: a run config is a few KiB; /dev/zero or a huge file would be read until memory ran out.
MAX_CONFIG_BYTES = 1 << 20


def _read_toml(path: Path) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict; every way it can be unusable is a one-line ``UserError``."""
    if path.is_dir():
        raise UserError(f"config file '{path}' is a directory; give a run config .toml file")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"config file '{path}' does not exist") from None
    except OSError as exc:
        raise UserError(f"config file '{path}' cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file '{path}' is larger than {MAX_CONFIG_BYTES >> 20} MiB; allowed: a run config .toml file "
            "(a few KiB)"
        )
    try:
        text = data.decode("utf-8-sig")  # TOML is UTF-8; a leading byte-order mark is harmless
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"config file '{path}' is not UTF-8 text (byte {data[exc.start]:#04x} on line {line}); "
            "save it as UTF-8, as TOML requires"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not valid TOML: {' '.join(str(exc).split())}") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(f"config file '{path}' nests arrays or tables too deeply to be a run config") from None


def load_raw(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read ``path`` (TOML; ``None`` for none) and merge the command-line overrides over it."""
    raw = _read_toml(Path(path)) if path is not None else {}
    return _merge(raw, parse_overrides(overrides))


def _load(impl: Implementation) -> Any:
    return load_implementation(impl)


def check_run(run: RunConfig) -> None:
    """Call ``check_run(config, run)`` of every chosen implementation that defines it.

    Its ``ValueError`` (or ``TypeError``) reaches the user as a one-line ``ConfigError``.
    """
    for selection in (run.model, run.optimizer, run.precision, *run.layouts):
        check = getattr(_load(selection.implementation), "check_run", None)
        if not callable(check):
            continue
        try:
            check(selection.config, run)
        except (TypeError, ValueError) as exc:
            raise ConfigError(" ".join(str(exc).split())) from None


def _implementation_config(impl: Implementation, values: dict[str, Any], prefix: str) -> Any:
    """Validate ``values`` against the implementation's ``Config`` (presets applied first)."""
    factory = _load(impl)
    config_cls = getattr(factory, "Config", None)
    owner = f"{impl.kind} {impl.name!r} ({impl.source})"
    if config_cls is None:
        return section_config(None, values, prefix, owner)
    preset_name = values.get("preset")
    presets_fn = getattr(factory, "presets", None)
    if preset_name is not None and callable(presets_fn):
        presets = dict(presets_fn())
        if preset_name not in presets:
            nearest = difflib.get_close_matches(str(preset_name), list(presets), n=1)
            hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
            raise ConfigError(
                f"{prefix}.preset = {preset_name!r}: unknown preset of {owner}; allowed: {', '.join(sorted(presets))}{hint}"
            )
        values = {**presets[preset_name], **values}
    return build_dataclass(config_cls, values, prefix, owner)


def resolve_model(values: dict[str, Any], host: PluginHost) -> Selection:
    """The ``[model]`` section alone: its name (or its registered preset's model), preset, block tables."""
    values = dict(values)
    selector, kind, default = SELECTED_SECTIONS["model"]
    if selector not in values:
        default = preset_model(host, values) or default  # a registered preset names its model
    name = coerce(values.pop(selector, default), str, f"model.{selector}")
    impl = host.get(kind, name)
    return Selection(kind, name, resolve_model_config(host, impl, _load(impl), values), impl)


def resolve_config(raw: dict[str, Any], host: PluginHost) -> RunConfig:
    """Validate ``raw`` (from ``load_raw``) into a ``RunConfig`` using the plugins in ``host``.

    Sections first, each against its schema; then the chosen implementations' ``check_run``.
    """
    allowed_sections = list(CORE_SECTIONS) + list(SELECTED_SECTIONS)
    raw = dict(raw)
    check_schema_version(raw.pop("schema_version", None), "run config")
    for section, value in raw.items():
        if section not in allowed_sections:
            raise unknown_key_error("", section, value, allowed_sections, "a run config")
        if not isinstance(value, dict):
            raise ConfigError(f"{section} = {value!r}: expected a table [{section}]")

    selections: dict[str, Selection] = {}
    for section, (selector, kind, default) in SELECTED_SECTIONS.items():
        values = dict(raw.get(section, {}))
        if section == "model":
            selections[section] = resolve_model(values, host)
            continue
        name = coerce(values.pop(selector, default), str, f"{section}.{selector}")
        impl = host.get(kind, name)
        selections[section] = Selection(kind, name, _implementation_config(impl, values, section), impl)

    parallel_raw = dict(raw.get("parallel", {}))
    layout_tables = {
        k: parallel_raw.pop(k) for k in list(parallel_raw) if isinstance(parallel_raw[k], dict) and k != "sizes"
    }
    parallel: ParallelConfig = build_dataclass(ParallelConfig, parallel_raw, "parallel")
    layouts = []
    for name in parallel.layouts:
        impl = host.get("layout", name)
        layouts.append(
            Selection(
                "layout", name, _implementation_config(impl, layout_tables.pop(name, {}), f"parallel.{name}"), impl
            )
        )
    if layout_tables:
        stray = next(iter(layout_tables))
        raise ConfigError(
            f"[parallel.{stray}] configures layout {stray!r}, which parallel.layouts = {parallel.layouts!r} does not use; "
            f"add it to parallel.layouts or remove the table"
        )

    core = {
        name: build_dataclass(cls, dict(raw.get(name, {})), name)
        for name, cls in CORE_SECTIONS.items()
        if name != "parallel"
    }
    train: TrainConfig = core["train"]
    host.get("lr_schedule", train.lr_schedule)  # named implementations of [train]: refused now, not after the data
    if train.attention != "auto":
        host.get("attention", train.attention)
    run = RunConfig(
        model=selections["model"],
        optimizer=selections["optimizer"],
        precision=selections["precision"],
        parallel=parallel,
        layouts=layouts,
        **core,
    )
    check_run(run)
    return run


def field_names(cls: type) -> list[str]:
    """Field names of a config dataclass (for help texts)."""
    return list(field_types(cls))
