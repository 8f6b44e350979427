"""The config reference of ``mcore train --help``, generated from the ``Config`` dataclasses.

Every key a run config accepts is a field of a dataclass: the core's sections
(``mcore.config.sections.CORE_SECTIONS``) and the ``Config`` of each chosen implementation
(``[model] name``, ``[optimizer] name``, ``[precision] recipe``, ``[parallel.<layout>]``).
A field's one-line doc is its attribute docstring (the string statement right after it), read
from the class's source with ``ast``; failing that, a ``#:`` comment block above the field or
a comment at the end of its line; failing that, nothing (the class docstring then describes
the section). The help is generated, so it cannot drift from the code.

Importing this module is cheap (no torch): ``config_reference`` loads the implementations it
describes, and only when called.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import shutil
import textwrap
import tokenize
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mcore.plugins import PluginHost

#: How command-line overrides are written (``mcore train``, ``mcore plan``, ``mcore config``).
OVERRIDES_HELP = """\
overrides (after the optional RUN.toml; each sets one key, and wins over the file):
  --section.key=value          e.g. --train.steps=5000  --optimizer.lr=3e-4  --model.preset=tiny
  --parallel.<layout>.key=v    a layout's own table, e.g. --parallel.fsdp.reshard_after_forward=false
  lists                        --parallel.layouts=tp,fsdp  or an array: --parallel.layouts='["tp", "fsdp"]'
  tables                       --parallel.sizes=dp_shard=4,tp=2  or  --parallel.sizes='{"dp_shard": 4}'
  none, booleans               --train.micro_batch_size=none  --log.plot=false  (true/false, yes/no, 1/0)
Each value is read as its key's type; an unknown key or a bad value is an error naming what is
allowed. `mcore config RUN.toml [overrides]` prints the resolved config as TOML."""


@dataclasses.dataclass(frozen=True)
class FieldHelp:
    """One key of a config section: its name, type, default (as written in TOML) and one-line doc."""

    name: str
    type: str
    default: str
    doc: str


# -- reading docs from source ------------------------------------------------------------------
def _plain(text: str) -> str:
    """``text`` on one line, without reStructuredText's double backquotes (a terminal shows them as is)."""
    return " ".join(text.replace("``", "").split())


def _one_line(text: str) -> str:
    """The first paragraph of ``text`` on one line."""
    return _plain(inspect.cleandoc(text).split("\n\n", 1)[0])


def _class_node(source: str) -> ast.ClassDef | None:
    tree = ast.parse(source)
    return next((node for node in tree.body if isinstance(node, ast.ClassDef)), None)


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """Line number -> (comment text, whether the comment is the whole line)."""
    found: dict[int, tuple[str, bool]] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                whole = not tok.line[: tok.start[1]].strip()
                found[tok.start[0]] = (tok.string, whole)
    except (tokenize.TokenError, SyntaxError):
        pass
    return found


def _own_field_docs(cls: type) -> dict[str, str]:
    """Docs of the fields written in ``cls``'s own body (not inherited ones)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    try:
        node = _class_node(source)
    except SyntaxError:
        return {}
    if node is None:
        return {}
    comments = _comments(source)
    docs: dict[str, str] = {}
    body = node.body
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        name = stmt.target.id
        after = body[i + 1] if i + 1 < len(body) else None
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[name] = _one_line(after.value.value)
            continue
        above: list[str] = []
        line = stmt.lineno - 1
        while line in comments and comments[line][1] and comments[line][0].startswith("#:"):
            above.insert(0, comments[line][0][2:].strip())
            line -= 1
        if above:
            docs[name] = _plain(" ".join(above))
            continue
        end = stmt.end_lineno or stmt.lineno
        if end in comments and not comments[end][1]:
            docs[name] = _plain(comments[end][0].lstrip("#"))
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> one-line doc, for every field of the dataclass ``cls`` (inherited fields too)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is not object:
            docs.update(_own_field_docs(klass))
    return docs


# -- formatting values ------------------------------------------------------------------------
def toml_value(value: Any) -> str:
    """``value`` as it is written in a run config (``none`` for ``None``, as overrides spell it)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}" if value else "{}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return toml_value({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    return json.dumps(str(value))


def _default(field: dataclasses.Field[Any]) -> str:
    if field.default is not dataclasses.MISSING:
        return toml_value(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return toml_value(field.default_factory())
    return "(required)"


def describe_fields(cls: type) -> list[FieldHelp]:
    """The keys of the config dataclass ``cls``, in declaration order."""
    from mcore.config.coerce import describe_type

    docs = field_docs(cls)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: show it as written
        hints = {}
    out = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        tp = hints.get(field.name)
        type_text = describe_type(tp) if tp is not None else str(field.type)
        out.append(FieldHelp(field.name, type_text, _default(field), docs.get(field.name, "")))
    out.sort(key=lambda f: f.name != "preset")  # the key that sets the others comes first
    return out


def _width() -> int:
    return max(60, min(120, shutil.get_terminal_size((100, 24)).columns))


def _wrap(text: str, indent: int, width: int) -> list[str]:
    return textwrap.wrap(text, width=max(30, width - indent)) or [""]


def format_section(
    title: str, cls: type | None, *, intro: str = "", extra: Iterable[FieldHelp] = (), width: int | None = None
) -> list[str]:
    """``[title]`` followed by one line per key: ``key = default  doc (type)``."""
    width = width or _width()
    lines = textwrap.wrap(f"[{title}]" + (f"  {intro}" if intro else ""), width, subsequent_indent="    ")
    fields = [*extra, *(describe_fields(cls) if cls is not None else [])]
    if cls is not None and any(not f.doc for f in fields):
        body = inspect.cleandoc(cls.__doc__ or "").split("\n\n", 1)
        if len(body) > 1:  # keys without docs: the class docstring describes them
            lines += ["  " + line for line in textwrap.wrap(_plain(body[1]), width - 2)]
    if not fields:
        lines.append("  (no settings)")
        return lines
    column = min(36, max(len(f"{f.name} = {f.default}") for f in fields) + 2)
    for f in fields:
        head = f"  {f.name} = {f.default}"
        # the type only where the default does not show it
        doc = f"{f.doc} ({f.type})".strip() if f.type and (not f.doc or f.default == "none") else f.doc
        wrapped = _wrap(doc, column + 2, width)
        if len(head) + 2 <= column + 2:
            lines.append(head.ljust(column + 2) + wrapped[0])
            rest = wrapped[1:]
        else:
            lines.append(head)
            rest = wrapped
        lines += [" " * (column + 2) + w for w in rest]
    return lines


# -- the whole reference ------------------------------------------------------------------------
def _summary(cls: type, section: str) -> str:
    """The first paragraph of a section's class docstring, without a leading ``[section]:``."""
    doc = _one_line(cls.__doc__ or "")
    prefix = f"[{section}]:"
    return doc[len(prefix) :].strip() if doc.startswith(prefix) else doc


def _implementation_section(
    host: PluginHost, section: str, kind: str, name: str, width: int, *, selector: str | None
) -> list[str]:
    """The keys of the implementation ``name`` of ``kind`` under ``[section]`` (``selector``: the key naming it)."""
    from mcore.errors import UserError

    head = f"[{section}]  {selector} = {json.dumps(name)}" if selector else f"[{section}]"
    try:
        impl = host.get(kind, name)
        factory = impl.load()
    except UserError as exc:
        return [f"{head}: not available", *("  " + line for line in str(exc).splitlines())]
    except Exception as exc:  # a plugin that fails to import: say so, describe the rest
        return [f"{head}: cannot load {impl.ref_text}: {type(exc).__name__}: {exc}"]
    config_cls = getattr(factory, "Config", None)
    if selector is None and config_cls is None:
        return []  # a layout without settings has no table
    installed = ", ".join(host.registry.names(kind))
    extra = [FieldHelp(selector, "str", json.dumps(name), f"which {kind}: {installed}")] if selector else []
    intro = f"{kind} {name!r} from {impl.source}" + (f": {impl.summary}" if impl.summary else "")
    lines = format_section(section, config_cls, intro=intro, extra=extra, width=width)
    if kind == "model":
        from mcore.config.model import presets_of

        names = presets_of(host, factory, name)
        if names:
            lines.append(
                f"  presets of {name!r}: {', '.join(names)} (a preset sets many keys at once; keys you give win)"
            )
    return lines


def _block_sections(raw: Mapping[str, Any], host: PluginHost, width: int) -> list[list[str]]:
    """``[model.<block>]`` help for each block the model config in ``raw`` uses (none if it does not resolve)."""
    from mcore.config import resolve_model
    from mcore.errors import UserError

    try:
        model = resolve_model(dict(raw.get("model", {})), host)
    except (UserError, ValueError, TypeError):
        return []
    used = getattr(model.config, "block_names", None)
    if not callable(used):
        return []
    out = []
    for block in used():
        lines = _implementation_section(host, f"model.{block}", "block", block, width, selector=None)
        if lines:
            out.append(lines)
    return out


def config_reference(raw: Mapping[str, Any], host: PluginHost, *, width: int | None = None) -> str:
    """Every section and key of a run config whose implementations are chosen by ``raw``.

    ``raw`` is a config as ``load_raw`` returns it (file + overrides); only its implementation
    names are read (``model.name``, ``optimizer.name``, ``precision.recipe``,
    ``parallel.layouts``), so ``--model.name=NAME`` shows that model's keys.
    """
    from mcore.config import coerce
    from mcore.config.sections import CORE_SECTIONS, SELECTED_SECTIONS, ParallelConfig

    width = width or _width()
    blocks: list[list[str]] = []
    others: list[tuple[str, str]] = []
    for section, (selector, kind, default) in SELECTED_SECTIONS.items():
        values = dict(raw.get(section, {}))
        if section == "model" and selector not in values:
            from mcore.config.model import preset_model

            default = preset_model(host, values) or default  # a registered preset names its model
        name = str(values.get(selector, default))
        blocks.append(_implementation_section(host, section, kind, name, width, selector=selector))
        if section == "model":
            blocks.extend(_block_sections(raw, host, width))
        rest = [n for n in host.registry.names(kind) if n != name]
        if rest:
            others.append((f"{kind}s: {', '.join(rest)}", f"--{section}.{selector}=NAME"))
    for section, cls in CORE_SECTIONS.items():
        blocks.append(format_section(section, cls, intro=_summary(cls, section), width=width))
        if cls is ParallelConfig:
            layouts_raw = dict(raw.get("parallel", {})).get("layouts", ["single"])
            layouts = coerce(layouts_raw, list[str], "parallel.layouts")
            for layout in layouts:
                lines = _implementation_section(host, f"parallel.{layout}", "layout", layout, width, selector=None)
                if lines:
                    blocks.append(lines)
            rest = [n for n in host.registry.names("layout") if n not in layouts]
            if rest:
                others.append((f"layouts: {', '.join(rest)}", "--parallel.layouts=NAME[,NAME]"))
    text = "\n\n".join("\n".join(block) for block in blocks)
    if others:
        column = max(len(names) for names, _ in others) + 2
        text += "\n\nother installed implementations (add the flag to --help to see their keys):\n"
        text += "\n".join(f"  {names:<{column}}{flag}" for names, flag in others)
    return text
