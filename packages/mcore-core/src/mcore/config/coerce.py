"""Turn TOML values and command-line strings into the types a config dataclass declares.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``pathlib.Path``,
``Literal[...]``, ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]`` and nested
keyword-only dataclasses. Every failure is a ``ConfigError`` naming the key, the value and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from mcore.errors import ConfigError

_NONE_WORDS = {"none", "null", "~"}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def describe_type(tp: Any) -> str:
    """A short human name for a type hint (``'int'``, ``'one of: a, b'``, ``'list of int'``)."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of: " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in get_args(tp) if a is not type(None)]
        none = " or none" if type(None) in get_args(tp) else ""
        return " or ".join(parts) + none
    if origin in (list, tuple):
        return f"list of {describe_type(get_args(tp)[0])}"
    if origin is dict:
        return f"table of {describe_type(get_args(tp)[1])}"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"table ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _fail(key: str, value: Any, tp: Any, extra: str = "") -> ConfigError:
    return ConfigError(f"{key} = {value!r}: expected {describe_type(tp)}{extra}")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (TOML-typed or a CLI string) to ``tp``; raise ``ConfigError`` if it cannot."""
    origin = get_origin(tp)
    from_cli = isinstance(value, str)

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if type(None) in options and (value is None or (from_cli and value.strip().lower() in _NONE_WORDS)):
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        raise _fail(key, value, tp)
    if origin is Literal:
        allowed = get_args(tp)
        for a in allowed:
            if value == a or (from_cli and str(a) == value):
                return a
        nearest = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        raise _fail(key, value, tp, f"; did you mean {nearest[0]!r}?" if nearest else "")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _fail(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if from_cli:
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    raise _fail(key, value, tp) from None
                if as_float.is_integer():
                    return int(as_float)
        raise _fail(key, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_cli:
            try:
                return float(value)
            except ValueError:
                pass
        raise _fail(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(key, value, tp)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _fail(key, value, tp)
    if origin in (list, tuple):
        item_tp = get_args(tp)[0]
        if from_cli:
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise _fail(key, value, tp, f" ({exc})") from None
            else:
                value = [] if not text else [v.strip() for v in text.split(",")]
        if not isinstance(value, (list, tuple)):
            raise _fail(key, value, tp)
        items = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        val_tp = get_args(tp)[1]
        if from_cli:
            text = value.strip()
            if text.startswith("{"):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise _fail(key, value, tp, f" ({exc})") from None
            else:
                pairs = [p for p in text.split(",") if p.strip()]
                if any("=" not in p for p in pairs):
                    raise _fail(key, value, tp, " (write key=value,key=value)")
                value = {k.strip(): v.strip() for k, v in (p.split("=", 1) for p in pairs)}
        if not isinstance(value, dict):
            raise _fail(key, value, tp)
        return {str(k): coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise _fail(key, value, tp)
        return build_dataclass(tp, value, key)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _fail(key, value, tp)


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's init fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def unknown_key_error(prefix: str, key: str, value: Any, allowed: list[str], owner: str) -> ConfigError:
    nearest = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
    listing = ", ".join(sorted(allowed)) if allowed else "none"
    return ConfigError(f"unknown key '{prefix}{key}' (value {value!r}); {owner} allows: {listing}{hint}")


def build_dataclass(cls: type, values: dict[str, Any], prefix: str, owner: str | None = None) -> Any:
    """Instantiate ``cls`` from ``values``, coercing each field; unknown keys are errors."""
    types_by_field = field_types(cls)
    dotted = f"{prefix}." if prefix else ""
    kwargs = {}
    for key, value in values.items():
        if key not in types_by_field:
            raise unknown_key_error(dotted, key, value, list(types_by_field), owner or f"[{prefix}]")
        kwargs[key] = coerce(value, types_by_field[key], f"{dotted}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{prefix}]: {exc}") from None


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain TOML-able values (Paths become strings, ``None`` is dropped)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if getattr(obj, f.name) is not None
        }
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
