"""Tokenizers: Hugging Face ``tokenizers`` files, and a byte-level fallback needing no file.

Every tokenizer has an end-of-document id (``eos_id``) that separates packed documents, and
can ``save`` itself as a ``tokenizer.json`` that Hugging Face loads, so checkpoints and
exports carry the exact tokenizer a run used.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mcore.errors import UserError

#: Special tokens tried, in order, as the end-of-document token of a Hugging Face tokenizer.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
BYTE_EOS = "<|endoftext|>"
#: The files a saved tokenizer is: a directory holding only these is a previous ``train_bpe`` output.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
#: Largest vocabulary ``train_bpe`` trains (published models use 32k-256k; the trainer allocates per entry).
MAX_VOCAB = 1 << 24
#: ``OSError`` numbers that mean the output's file system has no room left (disk, quota, file size limit).
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def out_of_space(exc: OSError, out: Path, what: str) -> UserError | None:
    """The one-line error for ``exc`` if it says ``out``'s file system is full, else ``None`` (re-raise it)."""
    if exc.errno not in NO_SPACE:
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    return UserError(
        f"{out}: writing the {what} failed: {exc.strerror or exc}{where}; nothing was published there, free disk "
        "space (or raise the quota) and run again, or write it elsewhere"
    )


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: Path) -> None: ...

    def saved_json(self) -> str: ...

    def describe(self) -> dict[str, Any]: ...


@cache
def byte_to_unicode() -> dict[int, str]:
    """A printable character for each byte, so byte strings survive a text-based vocabulary.

    Bytes that are visible Latin-1 characters map to themselves; the rest are shifted into
    the range starting at U+0100, in byte order.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping: dict[int, str] = {}
    shift = 0
    for b in range(256):
        if b in visible:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, and ``<|endoftext|>`` as id 256 (vocabulary of 257)."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)  # (n,)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def hf_json(self) -> str:
        """The same tokenizer as a Hugging Face ``tokenizer.json`` (byte-level BPE, no merges)."""
        from tokenizers import Tokenizer as HF
        from tokenizers import decoders, models, pre_tokenizers

        vocab = {ch: b for b, ch in byte_to_unicode().items()}
        tok = HF(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([BYTE_EOS])
        return tok.to_str()

    def save(self, directory: Path) -> None:
        _write_hf_files(directory, self.saved_json(), BYTE_EOS)

    def saved_json(self) -> str:
        """The ``tokenizer.json`` text ``save`` writes."""
        return self.hf_json()

    def describe(self) -> dict[str, Any]:
        return {"kind": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` loaded from a ``tokenizer.json``."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HF

        try:
            self.inner = HF.from_file(str(path))
        except Exception as exc:
            raise UserError(
                f"data.tokenizer = {str(path)!r} is not a valid tokenizer.json ({exc}); give a file written by "
                "Hugging Face tokenizers, a directory holding one, or 'byte'"
            ) from None
        self.path = path
        self.name = str(path)
        self.vocab_size = self.inner.get_vocab_size(with_added_tokens=True)
        eos = next((t for t in EOS_CANDIDATES if self.inner.token_to_id(t) is not None), None)
        if eos is None:
            raise UserError(
                f"tokenizer {str(path)!r} has none of the end-of-document tokens {', '.join(EOS_CANDIDATES)}; "
                "add one as a special token (mcore data train-tokenizer does)"
            )
        eos_id = self.inner.token_to_id(eos)
        assert eos_id is not None
        self.eos_token, self.eos_id = eos, int(eos_id)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``; a failure inside the tokenizer (its regex, its model) is a ``UserError``.

        The ``tokenizers`` library reports some failures as a Rust panic, ``pyo3_runtime.PanicException``,
        which derives from ``BaseException``: caught here too, all but ``KeyboardInterrupt``/``SystemExit``."""
        try:
            ids = self.inner.encode(text, add_special_tokens=False).ids
        except (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError):
            raise
        except BaseException as exc:
            detail = (str(exc).strip().splitlines() or [""])[0][:200]
            raise UserError(
                f"tokenizer {self.name!r} failed on a text of {len(text)} characters ({type(exc).__name__}: {detail}); "
                "its tokenizer.json (pre-tokenizer pattern, model) is unusable: use another tokenizer or 'byte'"
            ) from None
        return np.asarray(ids, dtype=np.int32)  # (n,)

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.inner.decode([int(i) for i in ids], skip_special_tokens=False))

    def save(self, directory: Path) -> None:
        _write_hf_files(directory, self.saved_json(), self.eos_token)

    def saved_json(self) -> str:
        """The ``tokenizer.json`` text ``save`` writes."""
        return str(self.inner.to_str())

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf", "path": str(self.path), "vocab_size": self.vocab_size, "eos_id": self.eos_id}


def _write_hf_files(directory: Path, tokenizer_json: str, eos: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tokenizer_json)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos, "unk_token": None}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos, "bos_token": eos}, indent=2))


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """``"byte"``, a ``tokenizer.json`` path, or a directory holding ``tokenizer.json``."""
    text = str(spec)
    if text == "byte":
        return ByteTokenizer()
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(
                f"data.tokenizer = {text!r}: the directory has no tokenizer.json; give a directory holding "
                "tokenizer.json, the file itself, or 'byte'"
            )
    elif not path.exists():
        raise UserError(
            f"data.tokenizer = {text!r}: no such file or directory; give 'byte', a tokenizer.json file, or a local "
            "directory holding one (train one with `mcore data train-tokenizer`)"
        )
    return HFTokenizer(path)


def tokenizer_from_description(
    info: dict[str, Any], directory: Path | None = None, *, confined_to: Path | None = None
) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint or shard index describes (files from ``directory``).

    With ``confined_to`` (a loader reading files anyone may have written: a checkpoint's run directory, a
    prepared dataset), ``directory/tokenizer.json`` is read only if it resolves inside ``confined_to`` (no link
    out of it), and the path the description names is never opened when that file is missing: a ``UserError``
    says how to bring the tokenizer back. Without it, the described path is the fallback."""
    if info.get("kind") == "byte":
        return ByteTokenizer()
    if confined_to is not None:
        from mcore.checkpoint.confine import inside

        if directory is None or not (directory / "tokenizer.json").is_file():
            raise UserError(
                f"{confined_to}: no tokenizer/tokenizer.json in it (it names the tokenizer {str(info.get('path'))!r}, "
                "which mcore does not open from outside the directory); put the tokenizer/ directory that was saved "
                "with it back"
            )
        relative = (directory / "tokenizer.json").relative_to(confined_to)
        return HFTokenizer(inside(confined_to, relative.as_posix(), what="tokenizer file", owner="directory"))
    if directory is not None and (directory / "tokenizer.json").is_file():
        return HFTokenizer(directory / "tokenizer.json")
    return load_tokenizer(info["path"])


def check_tokenizer_out(out: Path, *, overwrite: bool) -> None:
    """Refuse ``out`` unless it is new, empty, or (with ``overwrite``) holds only a saved tokenizer's files."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} exists and is not a directory; give a new directory for the tokenizer")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    other = [name for name in names if name not in TOKENIZER_FILES]
    if other:
        raise UserError(
            f"--out {out} holds files that are not a tokenizer's ({', '.join(other[:3])}); mcore never replaces them: "
            "give a new or empty directory"
        )
    if names and not overwrite:
        raise UserError(f"--out {out} holds a tokenizer; pass --overwrite to replace it, or give another --out")


def train_bpe(texts: Iterator[str], *, vocab_size: int, out: Path, overwrite: bool = False) -> HFTokenizer:
    """Train a byte-level BPE tokenizer with ``<|endoftext|>`` on ``texts``; write ``out/tokenizer.json``.

    ``out`` must be new, empty, or (with ``overwrite``) a previous tokenizer: checked before training, and the files
    appear together when complete (``mcore.outputs.publish_dir``)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from mcore.outputs import publish_dir

    if not 257 < vocab_size <= MAX_VOCAB:
        raise UserError(
            f"--vocab-size {vocab_size}: must exceed 257 (the 256 bytes and <|endoftext|>) and be at most {MAX_VOCAB}"
        )
    check_tokenizer_out(out, overwrite=overwrite)
    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BYTE_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() <= 257:
        raise UserError("the corpus is empty: no text to train a tokenizer on")
    try:
        with publish_dir(out, manifest=TOKENIZER_FILES[0], what="tokenizer", overwrite=overwrite) as tmp:
            _write_hf_files(tmp, tok.to_str(), BYTE_EOS)
    except OSError as exc:
        full = out_of_space(exc, out, "tokenizer")
        if full is None:
            raise
        raise full from None
    return HFTokenizer(out / "tokenizer.json")
