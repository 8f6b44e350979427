"""Document sources: where raw text comes from, streamed one document at a time.

A source spec is ``"stdlib"`` (the ``.py`` files of the running interpreter's standard
library: real text on every machine, no download), a text file (one document per file),
a ``.jsonl`` file (one document per line, in the ``text`` field), a ``.parquet`` file (one
document per row of the ``text`` column), or a directory of such files (sorted, recursive).
Nothing here holds more than one document (or one Parquet batch) in memory.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from mcore.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
HELP = "give 'stdlib', a text/.jsonl/.parquet file, a directory of them, or a directory written by `mcore data prepare`"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(spec: str) -> list[Path]:
    """The files a source spec names, in a fixed order; a ``UserError`` if there are none."""
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
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise UserError(f"data.source = {spec!r}: the directory holds no {', '.join(SUFFIXES)} files; {HELP}")
    return files


def fingerprint(spec: str) -> str:
    """A short hash that changes when the source's files change (names, sizes, times)."""
    h = hashlib.sha256(spec.encode())
    if spec == "stdlib":
        h.update(f"{sys.version}|{stdlib_root()}".encode())
    else:
        for f in source_files(spec):
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _read_text(path: Path, spec: str) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(
            f"data.source = {spec!r}: cannot read {str(path)!r}: {exc.strerror}; check its permissions"
        ) from None


def _jsonl_documents(path: Path, spec: str, text_field: str) -> Iterator[str]:
    try:
        handle = path.open(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(f"data.source = {spec!r}: cannot read {str(path)!r}: {exc.strerror}") from None
    with handle:
        for lineno, line in enumerate(handle, 1):
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
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value:
                yield str(value)


def iter_documents(spec: str, *, text_field: str = "text") -> Iterator[str]:
    """Every non-empty document of the source, in a fixed order, streamed."""
    for path in source_files(spec):
        if path.suffix == ".jsonl":
            docs: Iterator[str] = _jsonl_documents(path, spec, text_field)
        elif path.suffix == ".parquet":
            docs = _parquet_documents(path, spec, text_field)
        else:
            docs = iter([_read_text(path, spec)])
        for doc in docs:
            if doc.strip():
                yield doc
