"""``mcore data prepare`` and ``mcore data train-tokenizer``.

``prepare --source SRC --out DIR [--tokenizer byte|PATH] [--workers N] [--overwrite]
[--invalid-utf8 warn|error]`` streams the source through tokenizer workers into
memory-mapped shards (see ``mcore.data.shards``); ``DIR`` must be new, empty, or (with
``--overwrite``) a previous prepared dataset: nothing else is ever deleted.
``train-tokenizer --source SRC --out DIR --vocab-size N [--overwrite]`` trains a byte-level BPE into ``DIR``:
new, empty, or (with ``--overwrite``) holding only a previous tokenizer's files.

SIGTERM (a scheduler stopping the job) ends either command like Ctrl-C does: the temporary
directory it was writing is removed on the way out, and it exits with 128 + 15.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from mcore.cli import run_with_user_errors
from mcore.config.sections import MAX_PROCESSES
from mcore.errors import UserError


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit(143)`` while writing, so ``finally`` blocks remove what we created."""

    def stop(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (an embedding caller): keep its handling
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _data(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mcore data", description="data preparation")
    sub = parser.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="tokenize a source into memory-mapped shards")
    prep.add_argument("--source", required=True, help="'stdlib', a text/.jsonl/.parquet file or a directory")
    prep.add_argument(
        "--out", required=True, type=Path, help="a new or empty directory, or a previous output (with --overwrite)"
    )
    prep.add_argument(
        "--overwrite", action="store_true", help="replace --out if it holds a previous prepared dataset (index.json)"
    )
    prep.add_argument("--tokenizer", default="byte")
    prep.add_argument("--workers", type=int, default=2, help="tokenizer processes (0: tokenize in this process)")
    prep.add_argument(
        "--invalid-utf8",
        choices=["warn", "error"],
        default="warn",
        help="bytes that are not UTF-8: replace them and warn (default), or refuse the file",
    )
    prep.add_argument("--text-field", default="text")
    prep.add_argument("--max-tokens", type=int, default=None)
    prep.add_argument("--shard-tokens", type=int, default=1 << 26)
    tok = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on a source")
    tok.add_argument("--source", required=True)
    tok.add_argument(
        "--out", required=True, type=Path, help="a new or empty directory, or a previous tokenizer (with --overwrite)"
    )
    tok.add_argument(
        "--overwrite", action="store_true", help="replace --out if it holds only a previous tokenizer's files"
    )
    tok.add_argument("--vocab-size", type=int, default=8192)
    tok.add_argument("--text-field", default="text")
    args = parser.parse_args(argv)
    with _sigterm_exits():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from mcore.data.sources import iter_documents

    if args.action == "prepare":
        from mcore.data.shards import prepare

        if not 0 <= args.workers <= MAX_PROCESSES:
            raise UserError(f"--workers {args.workers}: must be in [0, {MAX_PROCESSES}] (0 tokenizes in this process)")
        if args.shard_tokens < 1:
            raise UserError(f"--shard-tokens {args.shard_tokens}: must be >= 1 (tokens per shard file)")
        if args.max_tokens is not None and args.max_tokens < 1:
            raise UserError(f"--max-tokens {args.max_tokens}: must be >= 1 (leave it out for the whole source)")
        docs = iter_documents(args.source, text_field=args.text_field, invalid_utf8=args.invalid_utf8)
        shards = prepare(
            docs,
            args.out,
            tokenizer_spec=args.tokenizer,
            workers=args.workers,
            max_tokens=args.max_tokens,
            shard_tokens=args.shard_tokens,
            source=args.source,
            overwrite=args.overwrite,
        )
        print(f"wrote {shards.num_tokens:,} tokens in {len(shards.shards)} shard(s) to {args.out}")
    else:
        from mcore.data.tokenizer import train_bpe

        docs = iter_documents(args.source, text_field=args.text_field)
        t = train_bpe(docs, vocab_size=args.vocab_size, out=args.out, overwrite=args.overwrite)
        print(f"wrote a {t.vocab_size}-token BPE tokenizer to {args.out / 'tokenizer.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_with_user_errors(_data, list(sys.argv[1:] if argv is None else argv))
