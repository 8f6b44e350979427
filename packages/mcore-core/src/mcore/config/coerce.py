"""Turn TOML values and command-line strings into the types a config dataclass declares.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``pathlib.Path``,
``Literal[...]``, ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]`` and nested
keyword-only dataclasses. Every failure is a ``ConfigError`` naming the key, the value and
what is allowed.

Floats are finite: NaN is refused everywhere (a NaN learning rate or clip threshold silently
poisons or disables what it sets), and infinity is refused unless the field opts in with
``field(default=..., metadata={ALLOW_INF: True})``. Ranges are each ``Config``'s own
``__post_init__``; a ``ValueError`` or ``TypeError`` raised there becomes a ``ConfigError``
naming the section and key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from mcore.errors import ConfigError

_NONE_WORDS = {"none", "null", "~"}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}

#: Dataclass field metadata key: ``True`` lets a float field (or the floats inside it) be infinite.
ALLOW_INF = "mcore.allow_inf"


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


class _NotFinite(ConfigError):
    """A float was NaN or infinite (more telling than "expected float" when a union's options all fail)."""


def _finite_float(number: float, value: Any, key: str, allow_inf: bool) -> float:
    if math.isnan(number):
        raise _NotFinite(f"{key} = {value!r}: expected a number, not NaN")
    if math.isinf(number) and not allow_inf:
        raise _NotFinite(f"{key} = {value!r}: expected a finite number")
    return number


def coerce(value: Any, tp: Any, key: str, *, allow_inf: bool = False) -> Any:
    """Convert ``value`` (TOML-typed or a CLI string) to ``tp``; raise ``ConfigError`` if it cannot.

    Floats must not be NaN, nor infinite unless ``allow_inf``.
    """
    origin = get_origin(tp)
    from_cli = isinstance(value, str)

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if type(None) in options and (value is None or (from_cli and value.strip().lower() in _NONE_WORDS)):
            return None
        containers = tuple(o for o in options if get_origin(o) in (list, tuple, dict))
        if from_cli and containers and value.strip()[:1] in ("[", "{"):  # JSON: a list or table, not a str
            options = containers
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key, allow_inf=allow_inf)
            except ConfigError as exc:
                errors.append(exc)
        not_finite = [e for e in errors if isinstance(e, _NotFinite)]
        raise not_finite[0] if not_finite else _fail(key, value, tp)
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
            return _finite_float(float(value), value, key, allow_inf)
        if from_cli:
            try:
                number = float(value)
            except ValueError:
                raise _fail(key, value, tp) from None
            return _finite_float(number, value, key, allow_inf)
        raise _fail(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(key, value, tp)
    if tp is Path:
        if isinstance(value, str) and not value.strip():  # Path("") is the current directory: never meant
            raise _fail(key, value, tp, ", not an empty string (write the directory, e.g. '.' for this one)")
        if isinstance(value, (str, Path)):
            return Path(value).expanduser()  # '~/runs' is the home's, as a shell would have it
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
        items = [coerce(v, item_tp, f"{key}[{i}]", allow_inf=allow_inf) for i, v in enumerate(value)]
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
        return {str(k): coerce(v, val_tp, f"{key}.{k}", allow_inf=allow_inf) for k, v in value.items()}
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


def in_section(message: str, prefix: str, fields: Collection[str]) -> str:
    """A validation message on one line, with the section named.

    ``"lr = -1.0; allowed: ..."`` from a ``Config`` of ``[optimizer]`` becomes
    ``"optimizer.lr = -1.0; allowed: ..."``; a message naming no field of the section gets
    ``"optimizer: "`` in front; one that already starts with ``"optimizer."`` is kept.
    """
    text = " ".join(message.split())
    if not prefix or text.startswith(f"{prefix}."):
        return text
    head = re.match(r"\w+", text)
    if head is not None and head.group() in fields:
        return f"{prefix}.{text}"
    return f"{prefix}: {text}"


def build_dataclass(cls: type, values: dict[str, Any], prefix: str, owner: str | None = None) -> Any:
    """Instantiate ``cls`` from ``values``, coercing each field; unknown keys are errors.

    A float field allows infinity only with ``metadata={ALLOW_INF: True}``. Errors from the
    class's ``__post_init__`` (``ValueError``, ``TypeError``) become a ``ConfigError`` naming
    the section (``prefix``) and, where the message starts with one, the key.
    """
    types_by_field = field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dotted = f"{prefix}." if prefix else ""
    kwargs = {}
    for key, value in values.items():
        if key not in types_by_field:
            raise unknown_key_error(dotted, key, value, list(types_by_field), owner or f"[{prefix}]")
        allow_inf = bool(fields[key].metadata.get(ALLOW_INF, False))
        kwargs[key] = coerce(value, types_by_field[key], f"{dotted}{key}", allow_inf=allow_inf)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{dotted}{missing[0]} is required ({describe_type(types_by_field[missing[0]])})")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # ValueError includes a ConfigError of a nested check
        raise ConfigError(in_section(str(exc), prefix, fields)) from None


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
