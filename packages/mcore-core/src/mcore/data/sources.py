"""Document sources: where raw text comes from, streamed one document at a time.

A source spec is ``"stdlib"`` (the ``.py`` files of the running interpreter's standard
library: real text on every machine, no download), a text file (one document per file),
a ``.jsonl`` file (one document per line, in the ``text`` field), a ``.parquet`` file (one
document per row of the ``text`` column), or a directory of such files (sorted, recursive).
Nothing here holds more than one document (or one Parquet batch) in memory.

Text is UTF-8. Bytes that are not are replaced by U+FFFD and counted per file, and one
``InvalidUtf8Warning`` names the files and counts when the source has been read; with
``invalid_utf8 = "error"`` the first such file is refused, naming the byte offset.

Symbolic links in a source directory that point outside it, or nowhere, are never followed
(files or directories alike): they are skipped, and one ``SourceLinkWarning`` names them. A link
to a file inside it is read; a link to a directory inside it is not walked, since that directory
is read under its own name.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from mcore.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
HELP = "give 'stdlib', a text/.jsonl/.parquet file, a directory of them, or a directory written by `mcore data prepare`"
InvalidUtf8 = Literal["warn", "error"]
_REPLACEMENT = "\ufffd"
_REPLACEMENT_BYTES = _REPLACEMENT.encode()


class InvalidUtf8Warning(UserWarning):
    """Bytes of a source were not UTF-8 and were replaced by U+FFFD before tokenizing."""


class SourceLinkWarning(UserWarning):
    """Symbolic links in a source directory that point outside it were skipped."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(spec: str, *, warn: bool = True) -> list[Path]:
    """The files a source spec names, in a fixed order; a ``UserError`` if there are none.

    In a directory, symbolic links that resolve outside it (or nowhere) are skipped, with one
    ``SourceLinkWarning`` naming them (unless ``warn`` is false); a link to a file inside it is
    read, a link to a directory inside it is not walked (the directory is, under its own name).
    """
    if not spec.strip():
        raise UserError(f"data.source = {spec!r} is empty; {HELP}")
    if spec == "stdlib":
        root = stdlib_root()
        return sorted(
            p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts
        )
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"data.source = {spec!r}: no such file or directory; {HELP}")
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise UserError(
                f"data.source = {spec!r}: unknown file type {path.suffix!r}; allowed: {', '.join(SUFFIXES)}"
            )
        return [path]
    files, skipped = _walk(path)
    if skipped and warn:
        shown = ", ".join(str(p) for p in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.warn(
            f"data.source = {spec!r}: skipped {len(skipped)} symbolic link(s) that point outside it: {shown}{more}; "
            "copy the files in, or point data.source at their directory",
            SourceLinkWarning,
            stacklevel=2,
        )
    if not files:
        raise UserError(f"data.source = {spec!r}: the directory holds no {', '.join(SUFFIXES)} files; {HELP}")
    return files


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """The source files under ``root`` (sorted) and the links skipped because they lead outside it.

    A link to a file inside ``root`` is read; a link to a directory inside it is not walked: that
    directory is walked under its own name (no file read twice through it, no loop).
    """
    top = root.resolve()
    files: list[Path] = []
    skipped: list[Path] = []
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            raise _cannot_read(directory, str(root), exc) from None
        for entry in entries:
            child = Path(entry.path)
            if entry.is_symlink():
                target = child.resolve()
                if not target.exists() or not target.is_relative_to(top):
                    skipped.append(child)
                elif target.is_file() and child.suffix in SUFFIXES:
                    files.append(child)
            elif entry.is_dir():
                pending.append(child)
            elif entry.is_file() and child.suffix in SUFFIXES:
                files.append(child)
    return sorted(files), sorted(skipped)


def fingerprint(spec: str) -> str:
    """A short hash that changes when the source's files change (names, sizes, times)."""
    h = hashlib.sha256(spec.encode())
    if spec == "stdlib":
        h.update(f"{sys.version}|{stdlib_root()}".encode())
    else:
        for f in source_files(spec, warn=False):  # iterating the documents warns
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _decode(raw: bytes, path: Path, offset: int, policy: InvalidUtf8, replaced: dict[Path, int]) -> str:
    """``raw`` (found at byte ``offset`` of ``path``) as text; invalid bytes refused or replaced and counted."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if policy == "error":
            raise UserError(
                f"{path}: invalid UTF-8 at byte {offset + exc.start} (data.invalid_utf8 = 'error'); re-encode the file "
                "as UTF-8, or set data.invalid_utf8 = 'warn' (--invalid-utf8 warn) to replace bad bytes with U+FFFD"
            ) from None
    text = raw.decode("utf-8", errors="replace")
    replaced[path] = replaced.get(path, 0) + text.count(_REPLACEMENT) - raw.count(_REPLACEMENT_BYTES)
    return text


def _cannot_read(path: Path, spec: str, exc: OSError) -> UserError:
    return UserError(f"data.source = {spec!r}: cannot read {str(path)!r}: {exc.strerror}; check its permissions")


def _read_text(path: Path, spec: str, policy: InvalidUtf8, replaced: dict[Path, int]) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _cannot_read(path, spec, exc) from None
    text = _decode(raw, path, 0, policy, replaced)
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text mode reads them


def _jsonl_documents(
    path: Path, spec: str, text_field: str, policy: InvalidUtf8, replaced: dict[Path, int]
) -> Iterator[str]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise _cannot_read(path, spec, exc) from None
    with handle:
        offset = 0
        for lineno, raw in enumerate(handle, 1):
            line = _decode(raw, path, offset, policy, replaced)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be a JSON object"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise UserError(
                    f"{path}:{lineno}: no string field {text_field!r}; set data.text_field to the field holding the text"
                )
            yield record[text_field]


def _parquet_documents(path: Path, spec: str, text_field: str) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Parquet sources need pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:
        raise UserError(f"data.source = {spec!r}: {str(path)!r} is not a readable Parquet file ({exc})") from None
    if text_field not in table.schema_arrow.names:
        raise UserError(
            f"{path}: no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)}); set data.text_field"
        )
    kind = table.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"):
        raise UserError(
            f"{path}: column {text_field!r} holds {kind}, not strings; set data.text_field to the column holding the text"
        )
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value:
                yield value


def iter_documents(spec: str, *, text_field: str = "text", invalid_utf8: InvalidUtf8 = "warn") -> Iterator[str]:
    """Every non-empty document of the source, in a fixed order, streamed.

    Invalid UTF-8 is replaced and summed up in one ``InvalidUtf8Warning`` when the iteration
    ends (or is closed), or refused at its first byte with ``invalid_utf8 = "error"``.
    """
    if invalid_utf8 not in ("warn", "error"):
        raise UserError(f"data.invalid_utf8 = {invalid_utf8!r}: allowed: 'warn', 'error'")
    replaced: dict[Path, int] = {}
    try:
        for path in source_files(spec):
            if path.suffix == ".jsonl":
                docs: Iterator[str] = _jsonl_documents(path, spec, text_field, invalid_utf8, replaced)
            elif path.suffix == ".parquet":
                docs = _parquet_documents(path, spec, text_field)
            else:
                docs = iter([_read_text(path, spec, invalid_utf8, replaced)])
            for doc in docs:
                if doc.strip():
                    yield doc
    finally:
        _warn_replaced(spec, replaced)


def _warn_replaced(spec: str, replaced: dict[Path, int]) -> None:
    counts = {path: n for path, n in replaced.items() if n > 0}
    if not counts:
        return
    shown = ", ".join(f"{path} ({n})" for path, n in list(counts.items())[:5])
    more = f" and {len(counts) - 5} more file(s)" if len(counts) > 5 else ""
    warnings.warn(
        f"data.source = {spec!r}: replaced {sum(counts.values())} invalid UTF-8 sequence(s) with U+FFFD in "
        f"{len(counts)} file(s): {shown}{more}; set data.invalid_utf8 = 'error' (--invalid-utf8 error) to refuse them",
        InvalidUtf8Warning,
        stacklevel=3,
    )
