"""Memory-mapped token shards: what ``mcore data prepare`` writes and every run reads.

A prepared dataset is a directory::

    index.json            format, tokenizer, the largest token id, and per shard: token and
                          document counts, its largest token id, CRC32s
    tokens_00000.bin      the shard's token ids (uint16 if the vocabulary fits, else uint32):
                          its documents back to back, each followed by the end-of-document id
    docs_00000.bin        int64 offsets (num_docs + 1,) of each document start in the shard

Writing streams documents through tokenizer worker processes (``mcore.data.workers``) into
the current shard file, never holding the corpus in memory. Everything goes to a fresh
temporary sibling of the output, renamed into place only when complete
(``mcore.outputs.publish_dir``), so an interrupted or failed prepare leaves no directory that
looks usable, and an existing directory is replaced only when it is a previous prepared
dataset (its ``index.json``) and ``overwrite`` is given. Opening checks sizes, offsets and
(for small shards) checksums, and names the corrupt file and the fix; ``max_id`` lets a run
refuse data whose ids its model's vocabulary cannot embed before it starts.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Generator, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mcore.checkpoint.confine import inside
from mcore.data.tokenizer import Tokenizer, load_tokenizer, out_of_space, tokenizer_from_description
from mcore.data.workers import ordered_map
from mcore.errors import UserError
from mcore.outputs import check_output_dir, publish_dir

FORMAT = "mcore-tokens"
VERSION = 1
INDEX = "index.json"
DEFAULT_SHARD_TOKENS = 1 << 26
#: Shards up to this size are checksummed when opened (larger ones: sizes and offsets only).
VERIFY_BYTES = 256 << 20
#: A task for a tokenizer worker: this many documents, or fewer holding this many characters.
_CHUNK_DOCS = 64
_CHUNK_CHARS = 1 << 22
#: A tokenizer worker pool that returns nothing for this long is stuck: stop with an error.
WORKER_TIMEOUT_S = 600.0

# -- worker side ----------------------------------------------------------------------------
_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(spec: str) -> None:
    global _WORKER_TOKENIZER  # per worker process, set once when the worker starts
    _WORKER_TOKENIZER = load_tokenizer(spec)


def _encode_chunk(docs: list[str]) -> list[np.ndarray]:
    assert _WORKER_TOKENIZER is not None
    return [_WORKER_TOKENIZER.encode(d) for d in docs]


def _chunks(docs: Iterable[str], size: int, chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    length = 0
    for doc in docs:
        chunk.append(doc)
        length += len(doc)
        if len(chunk) >= size or length >= chars:
            yield chunk
            chunk, length = [], 0
    if chunk:
        yield chunk


def encode_stream(
    docs: Iterable[str],
    tokenizer_spec: str,
    tokenizer: Tokenizer,
    workers: int,
    *,
    source: str = "",
    timeout_s: float = WORKER_TIMEOUT_S,
) -> Generator[np.ndarray, None, None]:
    """Token ids of each document, in order; ``workers`` > 0 tokenizes in worker processes.

    ``docs`` is read in the calling thread. Closing the generator early stops the workers; one
    that dies, or a pool that sends nothing for ``timeout_s`` seconds, is a ``UserError``.
    """
    if workers == 0:
        for doc in docs:
            yield tokenizer.encode(doc)
        return
    stream = ordered_map(
        _encode_chunk,
        _chunks(docs, _CHUNK_DOCS, _CHUNK_CHARS),
        workers=workers,
        initializer=_init_worker,
        initargs=(tokenizer_spec,),
        timeout_s=timeout_s,
        task=f"tokenizing data.source = {source!r}",
        hint="retry with data.workers = 0 (`mcore data prepare --workers 0`) to tokenize in the main process",
    )
    with closing(stream):  # stops the workers as soon as we stop reading (max_tokens), not at garbage collection
        for encoded in stream:
            yield from encoded


# -- writing ------------------------------------------------------------------------------------
class _ShardWriter:
    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._open()

    def _open(self) -> None:
        k = len(self.shards)
        self.name = f"{k:05d}"
        self.tokens = (self.directory / f"tokens_{self.name}.bin").open("wb")
        self.offsets = [0]
        self.count = 0
        self.crc = 0
        self.max_id = 0

    def add(self, ids: np.ndarray) -> None:
        self.max_id = max(self.max_id, int(ids.max()))
        data = ids.astype(self.dtype).tobytes()
        self.tokens.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.count += len(ids)
        self.offsets.append(self.count)
        if self.count >= self.shard_tokens:
            self.close()
            self._open()

    def close(self) -> None:
        self.tokens.close()
        if self.count == 0:
            (self.directory / f"tokens_{self.name}.bin").unlink()
            return
        offsets = np.asarray(self.offsets, dtype=np.int64).tobytes()
        (self.directory / f"docs_{self.name}.bin").write_bytes(offsets)
        self.shards.append(
            {
                "tokens": f"tokens_{self.name}.bin",
                "docs": f"docs_{self.name}.bin",
                "num_tokens": self.count,
                "num_docs": len(self.offsets) - 1,
                "max_id": self.max_id,
                "crc32": self.crc,
                "docs_crc32": zlib.crc32(offsets),
            }
        )


def check_prepare_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse ``out`` unless it is new, empty, or (with ``overwrite``) a prepared dataset: its ``index.json`` says so.

    ``index.json`` is a common name (web sites, other tools), so its content must be ours too.
    """
    index = out / INDEX
    if index.is_file() and not out.is_symlink():
        try:
            ours = json.loads(index.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UserError(
                f"--out {out} holds an index.json that is not a prepared dataset's (no format {FORMAT!r}); "
                "mcore never deletes it: give a new or empty directory"
            )
    check_output_dir(out, manifest=INDEX, what="prepared dataset", overwrite=overwrite)
    if overwrite and index.is_file():
        added = sorted(set(p.name for p in out.iterdir()) - _written_by_prepare(index))
        if added:
            raise UserError(
                f"--out {out} holds files the previous prepare did not write ({', '.join(added[:3])}); mcore never "
                "deletes them: move them out first, or give another --out"
            )


def _written_by_prepare(index: Path) -> set[str]:
    """The names ``prepare`` wrote beside ``index`` (its shards, the tokenizer, the index itself)."""
    names = {INDEX, "tokenizer"}
    try:
        shards = json.loads(index.read_text()).get("shards", [])
        names.update(str(entry[key]) for entry in shards for key in ("tokens", "docs"))
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        pass
    return names


def prepare(
    docs: Iterable[str],
    out: Path,
    *,
    tokenizer_spec: str,
    workers: int = 2,
    max_tokens: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    source: str = "",
    overwrite: bool = False,
    worker_timeout_s: float = WORKER_TIMEOUT_S,
) -> TokenShards:
    """Tokenize ``docs`` into shards at ``out``, atomically.

    ``out`` may be absent or an empty directory; a previous prepared dataset there (its
    ``index.json``) is replaced only with ``overwrite``; anything else is refused before any
    work starts, and never deleted. ``docs`` is closed (if it can be) when this returns, so a
    source stopped early at ``max_tokens`` releases its file and reports replaced bytes now.
    A tokenizer worker that dies, or sends nothing for ``worker_timeout_s``, is a ``UserError``.
    """
    out = Path(out)
    check_prepare_dir(out, overwrite=overwrite)
    tokenizer = load_tokenizer(tokenizer_spec)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
    try:
        with publish_dir(out, manifest=INDEX, what="prepared dataset", overwrite=overwrite) as tmp:
            writer = _ShardWriter(tmp, dtype, shard_tokens)
            total = 0
            stream = encode_stream(docs, tokenizer_spec, tokenizer, workers, source=source, timeout_s=worker_timeout_s)
            with closing(stream):  # stops the workers as soon as we stop reading (max_tokens)
                for ids in stream:
                    if max_tokens is not None and total >= max_tokens:
                        break
                    if len(ids) == 0:
                        continue
                    if int(ids.max()) >= tokenizer.vocab_size:
                        raise UserError(
                            f"tokenizer {tokenizer_spec!r} gave token id {int(ids.max())}, outside its vocabulary of "
                            f"{tokenizer.vocab_size}; use a tokenizer.json whose vocabulary covers its added tokens"
                        )
                    writer.add(np.append(ids, tokenizer.eos_id))
                    total += len(ids) + 1
            writer.close()
            if total == 0:
                raise UserError(f"data.source = {source!r} is empty: it has no text to train on; point it at real text")
            if total < 2:
                raise UserError(
                    f"data.source = {source!r} holds only {total} token(s); it needs at least a row of text"
                )
            index = {
                "format": FORMAT,
                "version": VERSION,
                "dtype": dtype.name,
                "tokenizer": tokenizer.describe(),
                "source": source,
                "num_tokens": total,
                "num_docs": sum(s["num_docs"] for s in writer.shards),
                "max_id": max(s["max_id"] for s in writer.shards),
                "shards": writer.shards,
            }
            tokenizer.save(tmp / "tokenizer")
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
    except OSError as exc:  # the temporary directory is gone (publish_dir): say where the space ran out
        full = out_of_space(exc, out, "prepared dataset")
        if full is None:
            raise
        raise full from None
    finally:
        close = getattr(docs, "close", None)
        if close is not None:
            close()  # a source generator's files, and its summary of replaced bytes, now rather than at exit
    return TokenShards.open(out)


# -- reading ------------------------------------------------------------------------------------
#: The token dtypes ``prepare`` writes, by their ``index.json`` name (native byte order, unsigned).
_DTYPES: dict[str, np.dtype] = {"uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32)}


def _shard_dtype(name: object, path: Path, fix: str) -> np.dtype:
    """The dtype ``index.json`` names, if ``prepare`` could have written it; anything else is a ``UserError``.

    Checked before any shard is viewed as that dtype: ``object`` would read raw bytes as pointers,
    signed or float ids index embeddings out of range."""
    if not isinstance(name, str) or name not in _DTYPES:
        raise UserError(
            f"the index {path / INDEX} is corrupt: dtype {name!r}; allowed: {', '.join(map(repr, _DTYPES))}; {fix}"
        )
    return _DTYPES[name]


@dataclass
class Shard:
    tokens: np.ndarray  # (n,) uint16/uint32 memmap
    doc_starts: np.ndarray  # (D + 1,) int64 memmap
    max_id: int  # the largest token id in ``tokens``


def is_prepared(path: Path) -> bool:
    return (path / INDEX).is_file()


class TokenShards:
    """A prepared dataset opened read-only through memory maps."""

    def __init__(self, path: Path, index: dict[str, Any], shards: list[Shard]) -> None:
        self.path, self.index, self.shards = path, index, shards

    @property
    def num_tokens(self) -> int:
        return int(self.index["num_tokens"])

    @property
    def max_id(self) -> int:
        """The largest token id in any shard (an embedding needs ``vocab_size > max_id``)."""
        return max(s.max_id for s in self.shards)

    @property
    def tokenizer_info(self) -> dict[str, Any]:
        return dict(self.index["tokenizer"])

    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_description(self.tokenizer_info, self.path / "tokenizer", confined_to=self.path)

    @classmethod
    def open(cls, path: Path, *, verify: bool = True) -> TokenShards:
        fix = f"re-create it with `mcore data prepare --out {path} --overwrite ...` (or delete it so the run re-tokenizes)"
        try:
            index = json.loads((path / INDEX).read_text())
        except FileNotFoundError:
            raise UserError(f"{path} is not a prepared dataset: index.json is missing; {fix}") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"the index {path / 'index.json'} is corrupt ({exc}); {fix}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
            raise UserError(f"{path / 'index.json'} is not a version-{VERSION} {FORMAT} index; {fix}")
        try:
            dtype = _shard_dtype(index["dtype"], path, fix)
            shards = []
            for entry in index["shards"]:
                shards.append(cls._open_shard(path, entry, dtype, verify, fix))
        except UserError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"the index {path / INDEX} is corrupt ({type(exc).__name__}: {exc}); {fix}") from None
        if not shards or sum(len(s.tokens) for s in shards) != index["num_tokens"]:
            raise UserError(f"the index {path / INDEX} does not match its shards; {fix}")
        return cls(path, index, shards)

    @staticmethod
    def _open_shard(path: Path, entry: dict[str, Any], dtype: np.dtype, verify: bool, fix: str) -> Shard:
        assert dtype in _DTYPES.values(), dtype  # checked by ``_shard_dtype`` before any file is viewed as it
        # the index names its files: only plain names inside the dataset directory are opened
        tokens_file = inside(path, entry["tokens"], what="shard file", owner="prepared dataset")
        docs_file = inside(path, entry["docs"], what="shard file", owner="prepared dataset")
        n, d = int(entry["num_tokens"]), int(entry["num_docs"])
        for f, expected in ((tokens_file, n * dtype.itemsize), (docs_file, (d + 1) * 8)):
            if not f.is_file():
                raise UserError(f"shard file {f} is missing; {fix}")
            if f.stat().st_size != expected:
                raise UserError(
                    f"shard file {f} is corrupt: {f.stat().st_size} bytes, the index says {expected}; {fix}"
                )
        small = n * dtype.itemsize <= VERIFY_BYTES
        if verify and small and zlib.crc32(tokens_file.read_bytes()) != entry["crc32"]:
            raise UserError(f"shard {tokens_file} is corrupt: checksum mismatch; {fix}")
        if verify and small and zlib.crc32(docs_file.read_bytes()) != entry["docs_crc32"]:
            raise UserError(f"shard index {docs_file} is corrupt: checksum mismatch; {fix}")
        tokens = np.memmap(tokens_file, dtype=dtype, mode="r", shape=(n,))
        docs = np.memmap(docs_file, dtype=np.int64, mode="r", shape=(d + 1,))
        if docs[0] != 0 or docs[-1] != n or (d > 0 and np.any(np.diff(docs) <= 0)):
            raise UserError(f"document offsets {docs_file} are corrupt (not increasing from 0 to {n}); {fix}")
        max_id = entry.get("max_id")  # absent in indexes written before it was recorded: compute it
        if max_id is None or (verify and small):
            actual = int(tokens.max()) if n else 0
            if max_id is not None and int(max_id) != actual:
                raise UserError(
                    f"the index {path / INDEX} is corrupt: it says the largest id in {tokens_file.name} is {max_id}, "
                    f"the file holds {actual}; {fix}"
                )
            max_id = actual
        return Shard(tokens, docs, int(max_id))
