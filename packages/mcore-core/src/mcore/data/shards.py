"""Memory-mapped token shards: what ``mcore data prepare`` writes and every run reads.

A prepared dataset is a directory::

    index.json            format, tokenizer, and per shard: token/document counts, CRC32s
    tokens_00000.bin      the shard's token ids (uint16 if the vocabulary fits, else uint32):
                          its documents back to back, each followed by the end-of-document id
    docs_00000.bin        int64 offsets (num_docs + 1,) of each document start in the shard

Writing streams documents through a pool of tokenizer worker processes into the current
shard file, never holding the corpus in memory; everything goes to ``<dir>.tmp`` and is
renamed to ``<dir>`` only when complete, so an interrupted or failed prepare leaves no
directory that looks usable. Opening checks sizes, offsets and (for small shards)
checksums, and names the corrupt file and the fix.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import zlib
from collections.abc import Generator, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from mcore.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_description
from mcore.errors import UserError

FORMAT = "mcore-tokens"
VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 26
#: Shards up to this size are checksummed when opened (larger ones: sizes and offsets only).
VERIFY_BYTES = 256 << 20
_CHUNK_DOCS = 64

# -- worker side ----------------------------------------------------------------------------
_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(spec: str) -> None:
    global _WORKER_TOKENIZER  # per worker process, set once by the pool initializer
    _WORKER_TOKENIZER = load_tokenizer(spec)


def _encode_chunk(docs: list[str]) -> list[np.ndarray]:
    assert _WORKER_TOKENIZER is not None
    return [_WORKER_TOKENIZER.encode(d) for d in docs]


def _chunks(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(docs)
    while chunk := list(islice(it, size)):
        yield chunk


def encode_stream(
    docs: Iterable[str], tokenizer_spec: str, tokenizer: Tokenizer, workers: int
) -> Generator[np.ndarray, None, None]:
    """Token ids of each document, in order; ``workers`` > 0 tokenizes in worker processes."""
    if workers == 0:
        for doc in docs:
            yield tokenizer.encode(doc)
        return
    ctx = mp.get_context("spawn")  # the parent may hold threads (torch); never fork it
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_spec,)) as pool:
        for encoded in pool.imap(_encode_chunk, _chunks(docs, _CHUNK_DOCS), chunksize=1):
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

    def add(self, ids: np.ndarray) -> None:
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
                "crc32": self.crc,
                "docs_crc32": zlib.crc32(offsets),
            }
        )


def prepare(
    docs: Iterable[str],
    out: Path,
    *,
    tokenizer_spec: str,
    workers: int = 2,
    max_tokens: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    source: str = "",
) -> TokenShards:
    """Tokenize ``docs`` into shards at ``out`` (atomically: ``out.tmp`` renamed when complete)."""
    tokenizer = load_tokenizer(tokenizer_spec)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer = _ShardWriter(tmp, dtype, shard_tokens)
        total = 0
        # closing() shuts the worker pool down as soon as we stop reading (max_tokens), not at exit
        with closing(encode_stream(docs, tokenizer_spec, tokenizer, workers)) as stream:
            for ids in stream:
                if max_tokens is not None and total >= max_tokens:
                    break
                if len(ids) == 0:
                    continue
                writer.add(np.append(ids, tokenizer.eos_id))
                total += len(ids) + 1
        writer.close()
        if total == 0:
            raise UserError(f"data.source = {source!r} is empty: it has no text to train on; point it at real text")
        if total < 2:
            raise UserError(f"data.source = {source!r} holds only {total} token(s); it needs at least a row of text")
        index = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dtype.name,
            "tokenizer": tokenizer.describe(),
            "source": source,
            "num_tokens": total,
            "num_docs": sum(s["num_docs"] for s in writer.shards),
            "shards": writer.shards,
        }
        tokenizer.save(tmp / "tokenizer")
        (tmp / "index.json").write_text(json.dumps(index, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenShards.open(out)


# -- reading ------------------------------------------------------------------------------------
@dataclass
class Shard:
    tokens: np.ndarray  # (n,) uint16/uint32 memmap
    doc_starts: np.ndarray  # (D + 1,) int64 memmap


def is_prepared(path: Path) -> bool:
    return (path / "index.json").is_file()


class TokenShards:
    """A prepared dataset opened read-only through memory maps."""

    def __init__(self, path: Path, index: dict[str, Any], shards: list[Shard]) -> None:
        self.path, self.index, self.shards = path, index, shards

    @property
    def num_tokens(self) -> int:
        return int(self.index["num_tokens"])

    @property
    def tokenizer_info(self) -> dict[str, Any]:
        return dict(self.index["tokenizer"])

    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_description(self.tokenizer_info, self.path / "tokenizer")

    @classmethod
    def open(cls, path: Path, *, verify: bool = True) -> TokenShards:
        fix = f"re-create it with `mcore data prepare --out {path} ...` (or delete it so the run re-tokenizes)"
        try:
            index = json.loads((path / "index.json").read_text())
        except FileNotFoundError:
            raise UserError(f"{path} is not a prepared dataset: index.json is missing; {fix}") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"the index {path / 'index.json'} is corrupt ({exc}); {fix}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
            raise UserError(f"{path / 'index.json'} is not a version-{VERSION} {FORMAT} index; {fix}")
        try:
            dtype = np.dtype(index["dtype"])
            shards = []
            for entry in index["shards"]:
                shards.append(cls._open_shard(path, entry, dtype, verify, fix))
        except (KeyError, TypeError) as exc:
            raise UserError(f"the index {path / 'index.json'} is corrupt (missing {exc}); {fix}") from None
        if not shards or sum(len(s.tokens) for s in shards) != index["num_tokens"]:
            raise UserError(f"the index {path / 'index.json'} does not match its shards; {fix}")
        return cls(path, index, shards)

    @staticmethod
    def _open_shard(path: Path, entry: dict[str, Any], dtype: np.dtype, verify: bool, fix: str) -> Shard:
        tokens_file, docs_file = path / entry["tokens"], path / entry["docs"]
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
        return Shard(tokens, docs)
