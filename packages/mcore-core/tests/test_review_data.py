"""Hostile data inputs from the 2026-12-07 review: each is a one-line error or a warning, never a traceback.

Shard indexes naming a dtype ``prepare`` never writes, a full disk while preparing data,
training a tokenizer or writing metrics, broken ``metrics.jsonl`` lines, a tokenizer that
panics, an empty ``--source``, a Parquet text column that is not text, symbolic links out of
a source directory, and SIGTERM while preparing.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import warnings
from pathlib import Path

import pytest

from mcore.data import shards as shards_module
from mcore.data import tokenizer as tokenizer_module
from mcore.data.cli import main as data_main
from mcore.data.shards import TokenShards, prepare
from mcore.data.sources import SourceLinkWarning, iter_documents, source_files
from mcore.data.tokenizer import HFTokenizer, train_bpe
from mcore.errors import UserError
from mcore.observe.metrics import MetricsWriter, read_metrics

TEXT = "def f(x):\n    return x + 1\n" * 20


def make_source(root: Path) -> Path:
    src = root / "docs"
    src.mkdir()
    (src / "a.txt").write_text(TEXT)
    (src / "b.md").write_text("# notes\n" + TEXT)
    return src


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``mcore data ARGV``; it must fail with exit code 2 and a one-line message."""
    assert data_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mcore: error: ") and "\n" not in err and "Traceback" not in err
    return err


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


# -- #1: index.json dtype ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["object", "int16", "float32", "float16", "bool", ">u2", "uint64", 5, None])
def test_an_index_dtype_prepare_never_writes_is_refused(tmp_path: Path, dtype: object) -> None:
    out = tmp_path / "prep"
    prepare(iter([TEXT]), out, tokenizer_spec="byte", workers=0, source="corpus")
    index = json.loads((out / "index.json").read_text())
    assert index["dtype"] == "uint16"
    index["dtype"] = dtype
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"dtype .*allowed: 'uint16', 'uint32'") as info:
        TokenShards.open(out)
    assert "\n" not in str(info.value)


def test_an_index_dtype_uint16_still_opens(tmp_path: Path) -> None:
    out = tmp_path / "prep"
    prepare(iter([TEXT]), out, tokenizer_spec="byte", workers=0, source="corpus")
    opened = TokenShards.open(out)
    assert opened.shards[0].tokens.dtype.name == "uint16" and opened.num_tokens == len(TEXT) + 1


# -- #5: a full disk -----------------------------------------------------------------------------
def test_prepare_on_a_full_disk_is_one_line_naming_the_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_source(tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(shards_module._ShardWriter, "add", no_space)
    err = cli_error(capsys, ["prepare", "--source", str(src), "--out", str(out), "--workers", "0"])
    assert str(out) in err and "No space left on device" in err and "free disk space" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_train_tokenizer_on_a_full_disk_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_source(tmp_path)
    out = tmp_path / "tok"
    monkeypatch.setattr(tokenizer_module, "_write_hf_files", no_space)
    err = cli_error(capsys, ["train-tokenizer", "--source", str(src), "--out", str(out), "--vocab-size", "300"])
    assert str(out) in err and "No space left on device" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_train_bpe_disk_quota_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def quota(*args: object) -> None:
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "x"))

    monkeypatch.setattr(tokenizer_module, "_write_hf_files", quota)
    with pytest.raises(UserError, match="Disk quota exceeded"):
        train_bpe(iter([TEXT]), vocab_size=300, out=tmp_path / "tok")


def test_metrics_on_a_full_disk_warn_once_and_stop(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write({"step": 1, "loss": 2.0})
    writer._file.close()  # type: ignore[union-attr]
    writer._file = open("/dev/full", "w")  # noqa: SIM115 - every flush fails with ENOSPC, as on a full disk
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        writer.write({"step": 2, "loss": 1.5})
        writer.write({"step": 3, "loss": 1.0})  # no second warning, no error: metrics are off
        writer.close()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "metrics" in messages[0] and "No space left on device" in messages[0]
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]


def test_metrics_close_failing_warns_instead_of_raising(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer._file.close()  # type: ignore[union-attr]

    class FullOnClose:
        def write(self, text: str) -> int:
            return len(text)

        def flush(self) -> None:
            pass

        def close(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    writer._file = FullOnClose()  # type: ignore[assignment]
    writer.write({"step": 1})
    with pytest.warns(UserWarning, match="No space left on device"):
        writer.close()
    writer.close()  # idempotent


# -- #4: read_metrics ----------------------------------------------------------------------------
def test_read_metrics_skips_bad_lines_and_warns_once(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(
        b'{"step": 1, "loss": 2.0}\n'
        b"[1, 2]\n"
        b"\x00\x00\x00\x00\n"
        b'"text"\n'
        b'{"step": 2, "loss": 1.5}\n'
        b"\xff\xfe{bad\n"
        b'{"step": 3, "lo'
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = read_metrics(path)
    assert records == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert len(caught) == 1 and str(path) in str(caught[0].message) and "skipped 5 line(s)" in str(caught[0].message)


def test_read_metrics_of_a_clean_file_does_not_warn(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_metrics(path) == [{"step": 1}, {"step": 2}]


# -- #18: a tokenizer that panics ----------------------------------------------------------------
def panicking_tokenizer(tmp_path: Path) -> Path:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(a|a)+$"), "isolated")  # catastrophic backtracking
    tok.add_special_tokens(["<|endoftext|>"])
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    return path


def test_a_tokenizer_panic_is_a_user_error(tmp_path: Path) -> None:
    tok = HFTokenizer(panicking_tokenizer(tmp_path))
    assert list(tok.encode("ab")) == [0, 1]
    with pytest.raises(UserError, match="PanicException") as info:
        tok.encode("a" * 40 + "b")
    assert "\n" not in str(info.value) and "tokenizer.json" in str(info.value)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_a_tokenizer_lets_interrupts_through(tmp_path: Path, stop: type[BaseException]) -> None:
    tok = HFTokenizer(panicking_tokenizer(tmp_path))

    class Interrupted:
        def encode(self, *args: object, **kwargs: object) -> None:
            raise stop()

    tok.inner = Interrupted()
    with pytest.raises(stop):
        tok.encode("ab")


# -- #12: an empty --source ----------------------------------------------------------------------
def test_an_empty_source_is_refused_not_the_cwd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_source(tmp_path)
    monkeypatch.chdir(tmp_path / "docs")
    out = tmp_path / "out"
    err = cli_error(capsys, ["prepare", "--source", "", "--out", str(out), "--workers", "0"])
    assert "data.source = '' is empty" in err and "give 'stdlib'" in err
    assert not out.exists()
    with pytest.raises(UserError, match="is empty"):
        source_files("  ")


# -- #13: a Parquet text column that is not text -------------------------------------------------
@pytest.mark.parametrize("values", [[1, 2, 3], [1.5, 2.5], [True, False], [[1], [2]]])
def test_a_parquet_text_column_that_is_not_strings_is_refused(tmp_path: Path, values: list[object]) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": values}), path)
    with pytest.raises(UserError, match=r"column 'text' holds .*, not strings; set data.text_field"):
        list(iter_documents(str(path)))


def test_a_parquet_string_column_is_read(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    for name, kind in (("s.parquet", pa.string()), ("l.parquet", pa.large_string())):
        pq.write_table(pa.table({"text": pa.array(["one", None, "", "two"], type=kind)}), tmp_path / name)
        assert list(iter_documents(str(tmp_path / name))) == ["one", "two"]


# -- #14: symbolic links in a source directory ---------------------------------------------------
def test_links_out_of_a_source_directory_are_skipped_with_a_warning(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret.txt").write_text("outside file")
    (outside / "sub" / "deep.txt").write_text("outside dir")
    src = make_source(tmp_path)
    (src / "inner").mkdir()
    (src / "inner" / "c.txt").write_text("inside")
    (src / "file_out.txt").symlink_to(outside / "secret.txt")
    (src / "dir_out").symlink_to(outside / "sub")
    (src / "broken.txt").symlink_to(tmp_path / "nowhere.txt")
    (src / "file_in.txt").symlink_to(src / "a.txt")
    (src / "dir_in").symlink_to(src / "inner")
    (src / "inner" / "loop").symlink_to(src)
    with pytest.warns(SourceLinkWarning) as caught:
        files = source_files(str(src))
    names = sorted(str(f.relative_to(src)) for f in files)
    assert names == ["a.txt", "b.md", "file_in.txt", "inner/c.txt"]  # dir_in is inner, read under its own name
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "skipped 3 symbolic link(s)" in message
    for skipped in ("file_out.txt", "dir_out", "broken.txt"):
        assert str(src / skipped) in message
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        docs = list(iter_documents(str(src)))
    assert "outside file" not in docs and "outside dir" not in docs and "inside" in docs
    assert sum(isinstance(w.message, SourceLinkWarning) for w in seen) == 1


def test_a_source_directory_without_links_does_not_warn(tmp_path: Path) -> None:
    src = make_source(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [f.name for f in source_files(str(src))] == ["a.txt", "b.md"]


# -- #19: SIGTERM while preparing ----------------------------------------------------------------
def test_sigterm_during_prepare_removes_the_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_source(tmp_path)
    out = tmp_path / "out"
    seen: list[list[str]] = []
    # without mcore's own handling this one runs: it records the signal and lets prepare finish
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    add = shards_module._ShardWriter.add

    def add_then_sigterm(self: object, ids: object) -> None:
        add(self, ids)  # type: ignore[arg-type]
        seen.append(leftovers(tmp_path))
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler stopping the job mid-write

    monkeypatch.setattr(shards_module._ShardWriter, "add", add_then_sigterm)
    try:
        with pytest.raises(SystemExit) as info:
            data_main(["prepare", "--source", str(src), "--out", str(out), "--workers", "0"])
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the previous handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert info.value.code == 128 + signal.SIGTERM
    assert seen and seen[0] != []  # the temporary directory existed while writing
    assert leftovers(tmp_path) == [] and not out.exists()
