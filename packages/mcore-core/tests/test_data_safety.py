"""Data preparation keeps user files, refuses data a model cannot embed, reports bad bytes, and never hangs.

The hang tests run ``prepare`` in a child process bounded by a timeout (the old
``multiprocessing.Pool`` code hung there for good, with its workers left behind), so a
regression fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

from mcore.config.sections import DataConfig, TrainConfig
from mcore.data.cli import main as data_main
from mcore.data.pipeline import build_train_data
from mcore.data.shards import TokenShards, prepare
from mcore.data.sources import InvalidUtf8Warning, iter_documents
from mcore.data.tokenizer import ByteTokenizer
from mcore.data.workers import ordered_map
from mcore.errors import UserError

TEXT = "def f(x):\n    return x + 1\n" * 20


def make_source(root: Path) -> Path:
    src = root / "docs"
    src.mkdir()
    (src / "a.txt").write_text(TEXT)
    (src / "b.md").write_text("# notes\n" + TEXT)
    return src


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``mcore data ARGV``; it must fail with exit code 2 and a one-line message."""
    assert data_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mcore: error: ") and "\n" not in err and "Traceback" not in err
    return err


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# -- prepare --out never deletes what it did not write ---------------------------------------
def test_prepare_into_its_own_source_is_refused_and_the_source_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_source(tmp_path)
    before = snapshot(src)
    for extra in ([], ["--overwrite"]):
        err = cli_error(capsys, ["prepare", "--source", str(src), "--out", str(src), "--workers", "0", *extra])
        assert str(src) in err and "never deletes" in err
    assert snapshot(src) == before and leftovers(src) == []


def test_prepare_into_a_directory_of_other_files_is_refused(tmp_path: Path) -> None:
    src = make_source(tmp_path)
    out = tmp_path / "site"
    out.mkdir()
    (out / "page.html").write_text("<p>mine</p>")
    (out / "index.json").write_text('{"pages": ["page.html"]}')  # a common name: not ours unless it says so
    before = snapshot(out)
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not a prepared dataset's") as exc:
            prepare(iter_documents(str(src)), out, tokenizer_spec="byte", workers=0, overwrite=overwrite)
        assert "\n" not in str(exc.value)
    (out / "index.json").unlink()
    with pytest.raises(UserError, match="never deletes"):
        prepare(iter_documents(str(src)), out, tokenizer_spec="byte", workers=0, overwrite=True)
    assert snapshot(out) == {"page.html": before["page.html"]} and leftovers(out) == []


def test_a_previous_prepare_is_replaced_only_with_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_source(tmp_path)
    out = tmp_path / "prepared"
    out.mkdir()  # an empty directory is fine
    first = prepare(iter(["first version"]), out, tokenizer_spec="byte", workers=0)
    assert first.num_tokens == len("first version") + 1
    with pytest.raises(UserError, match="--overwrite"):
        prepare(iter_documents(str(src)), out, tokenizer_spec="byte", workers=0)
    err = cli_error(capsys, ["prepare", "--source", str(src), "--out", str(out), "--workers", "0"])
    assert "--overwrite" in err
    assert TokenShards.open(out).num_tokens == first.num_tokens  # untouched
    assert data_main(["prepare", "--source", str(src), "--out", str(out), "--workers", "0", "--overwrite"]) == 0
    again = TokenShards.open(out)
    assert again.index["source"] == str(src) and again.index["num_docs"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["docs_00000.bin", "index.json", "tokenizer", "tokens_00000.bin"]
    assert leftovers(out) == []


def test_prepare_into_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_source(tmp_path)
    target = src / "a.txt"
    err = cli_error(capsys, ["prepare", "--source", str(src), "--out", str(target), "--workers", "0"])
    assert "not a directory" in err
    assert target.read_text() == TEXT


def test_the_train_time_cache_is_reused_and_stays_in_its_place(tmp_path: Path) -> None:
    src = make_source(tmp_path)
    before = snapshot(src)
    data = DataConfig(source=str(src), workers=0, cache_dir=tmp_path / "cache")
    train = TrainConfig(seq_len=16, global_batch_size=2, micro_batch_size=2, out_dir=tmp_path / "run")
    build_train_data(data, train, ByteTokenizer(), dp_rank=0, dp_size=1, vocab_size=257)
    (cache,) = (tmp_path / "cache").iterdir()
    stamp = (cache / "index.json").stat().st_mtime_ns
    build_train_data(data, train, ByteTokenizer(), dp_rank=0, dp_size=1, vocab_size=257)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.name]
    assert (cache / "index.json").stat().st_mtime_ns == stamp  # reused, not tokenized again
    assert snapshot(src) == before


# -- token ids the model cannot embed ----------------------------------------------------------
def write_shards(directory: Path, ids: list[int], *, record_max: bool) -> None:
    """A prepared dataset written by hand (``record_max=False``: as indexes were before ``max_id``)."""
    directory.mkdir()
    tokens = np.asarray(ids, dtype=np.uint16).tobytes()
    offsets = np.asarray([0, len(ids)], dtype=np.int64).tobytes()
    (directory / "tokens_00000.bin").write_bytes(tokens)
    (directory / "docs_00000.bin").write_bytes(offsets)
    shard = {
        "tokens": "tokens_00000.bin",
        "docs": "docs_00000.bin",
        "num_tokens": len(ids),
        "num_docs": 1,
        "crc32": zlib.crc32(tokens),
        "docs_crc32": zlib.crc32(offsets),
    }
    index = {
        "format": "mcore-tokens",
        "version": 1,
        "dtype": "uint16",
        "tokenizer": ByteTokenizer().describe(),
        "source": "hand-written",
        "num_tokens": len(ids),
        "num_docs": 1,
        "shards": [shard],
    }
    if record_max:
        shard["max_id"] = index["max_id"] = max(ids)
    (directory / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("record_max", [True, False], ids=["index-with-max_id", "index-before-max_id"])
def test_token_ids_beyond_the_model_vocabulary_are_refused_when_opened(tmp_path: Path, record_max: bool) -> None:
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 256, size=400)]
    ids[123] = 300  # the id an embedding of 257 rows cannot look up (IndexError mid-run, before)
    ids[-1] = 256
    shards = tmp_path / "shards"
    write_shards(shards, ids, record_max=record_max)
    data = DataConfig(source=str(shards), workers=0)
    train = TrainConfig(seq_len=16, global_batch_size=2, micro_batch_size=2, out_dir=tmp_path / "run")
    with pytest.raises(UserError) as exc:
        build_train_data(data, train, ByteTokenizer(), dp_rank=0, dp_size=1, vocab_size=257)
    message = str(exc.value)
    assert "\n" not in message
    assert str(shards) in message and "token id 300" in message and "257" in message
    assert "--model.vocab_size=301" in message
    ok = build_train_data(data, train, ByteTokenizer(), dp_rank=0, dp_size=1, vocab_size=301)
    assert ok.datasets[0].shards.max_id == 300


def test_the_index_records_each_shards_largest_id(tmp_path: Path) -> None:
    docs = ["abc", "xyz" * 300, "~"]
    shards = prepare(iter(docs), tmp_path / "ds", tokenizer_spec="byte", workers=0, shard_tokens=500)
    assert len(shards.shards) == 2
    index = json.loads((tmp_path / "ds" / "index.json").read_text())
    for entry, shard in zip(index["shards"], shards.shards, strict=True):
        assert entry["max_id"] == shard.max_id == int(np.max(shard.tokens)) == 256  # each ends with <|endoftext|>
    assert index["max_id"] == shards.max_id == 256
    index["shards"][0]["max_id"] = 200  # an index that lies is corrupt
    (tmp_path / "ds" / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="largest id in tokens_00000.bin is 200, the file holds 256"):
        TokenShards.open(tmp_path / "ds")


# -- bytes that are not UTF-8 --------------------------------------------------------------------
def bad_utf8_source(root: Path) -> Path:
    src = root / "mixed"
    src.mkdir()
    # 3 bad sequences (\xe9 cut short by a space, \xff, \xfe) and one real U+FFFD, which is valid UTF-8
    (src / "a.txt").write_bytes(b"caf\xe9 ok \xff\xfe end " + "\ufffd".encode())
    (src / "b.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "bad \x80 byte"}\n')
    (src / "c.txt").write_text("all good\r\nsecond line\n")
    return src


def test_invalid_utf8_is_counted_and_warned_once(tmp_path: Path) -> None:
    src = bad_utf8_source(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = list(iter_documents(str(src)))
    assert docs == ["caf\ufffd ok \ufffd\ufffd end \ufffd", "fine", "bad \ufffd byte", "all good\nsecond line\n"]
    utf8 = [w for w in caught if issubclass(w.category, InvalidUtf8Warning)]
    assert len(utf8) == 1 and issubclass(InvalidUtf8Warning, UserWarning)
    message = str(utf8[0].message)
    assert "replaced 4 invalid UTF-8" in message and "2 file(s)" in message
    assert f"{src / 'a.txt'} (3)" in message and f"{src / 'b.jsonl'} (1)" in message
    assert "c.txt" not in message and "invalid_utf8 = 'error'" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean source warns nothing
        assert list(iter_documents(str(src / "c.txt"))) == ["all good\nsecond line\n"]


def test_invalid_utf8_can_be_refused_naming_file_and_offset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = bad_utf8_source(tmp_path)
    with pytest.raises(UserError, match=r"a\.txt: invalid UTF-8 at byte 3 "):
        list(iter_documents(str(src), invalid_utf8="error"))
    first_line = len(b'{"text": "fine"}\n')
    with pytest.raises(UserError, match=rf"b\.jsonl: invalid UTF-8 at byte {first_line + 14} "):
        list(iter_documents(str(src / "b.jsonl"), invalid_utf8="error"))
    err = cli_error(capsys, ["prepare", "--source", str(src), "--out", str(tmp_path / "o"), "--invalid-utf8", "error"])
    assert "a.txt: invalid UTF-8 at byte 3" in err and not (tmp_path / "o").exists()
    with pytest.warns(InvalidUtf8Warning, match="replaced 4"):
        assert data_main(["prepare", "--source", str(src), "--out", str(tmp_path / "o"), "--workers", "0"]) == 0
    data = DataConfig(source=str(src), workers=0, invalid_utf8="error", cache_dir=tmp_path / "cache")
    train = TrainConfig(seq_len=8, global_batch_size=1, out_dir=tmp_path / "run")
    with pytest.raises(UserError, match="invalid UTF-8 at byte 3"):
        build_train_data(data, train, ByteTokenizer(), dp_rank=0, dp_size=1)


# -- tokenizer workers: no hang, an error instead -------------------------------------------------
def run_python(script: str, *args: str, timeout: float) -> str:
    """Run ``script`` in a fresh interpreter; fail (and kill it and its workers) if it outlives ``timeout``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the child hung for {timeout} s: {out[-2000:]}")
    assert proc.returncode == 0, out
    return out


EARLY_STOP = """
    import sys
    from pathlib import Path
    from mcore.data.shards import prepare

    root, rounds = Path(sys.argv[1]), int(sys.argv[2])
    for i in range(rounds):
        # results far larger than a pipe's buffer, still flowing when max_tokens stops the reading
        docs = (f"{j} " + "x" * 50_000 for j in range(1000))
        shards = prepare(docs, root / f"out{i}", tokenizer_spec="byte", workers=4, max_tokens=10)
        assert shards.num_tokens == len("0 ") + 50_000 + 1
    print("finished", rounds)
"""


def test_stopping_early_at_max_tokens_finishes(tmp_path: Path) -> None:
    assert "finished 4" in run_python(EARLY_STOP, str(tmp_path), "4", timeout=120)


@pytest.mark.slow
def test_stopping_early_at_max_tokens_finishes_many_times(tmp_path: Path) -> None:
    # the old Pool.terminate deadlock struck about one round in ten here
    assert "finished 40" in run_python(EARLY_STOP, str(tmp_path), "40", timeout=600)


def test_a_killed_worker_is_an_error_not_a_hang(tmp_path: Path) -> None:
    script = """
        import multiprocessing, os, signal, sys, time
        from pathlib import Path
        from mcore.data.shards import prepare
        from mcore.errors import UserError

        def docs():
            for i in range(400):
                yield f"document {i} " + "y" * 200
                if i == 100:  # the workers have started and taken tasks: kill them (as the OOM killer would)
                    time.sleep(1.0)
                    for child in multiprocessing.active_children():
                        os.kill(child.pid, signal.SIGKILL)

        try:
            prepare(docs(), Path(sys.argv[1]) / "out", tokenizer_spec="byte", workers=2, source="corpus")
        except UserError as exc:
            print("ERROR", exc)
        print("children left:", len(multiprocessing.active_children()))
    """
    out = run_python(script, str(tmp_path), timeout=90)
    assert "was killed by SIGKILL" in out and "tokenizing data.source = 'corpus'" in out
    assert "of 2" in out and "data.workers = 0" in out
    assert "children left: 0" in out and not (tmp_path / "out").exists()


def test_a_stuck_worker_times_out_with_an_error(tmp_path: Path) -> None:
    def docs():
        for i in range(300):
            yield f"document {i}"
            if i == 100:
                for child in multiprocessing.active_children():
                    os.kill(child.pid, signal.SIGSTOP)  # alive, but never answers

    with pytest.raises(UserError) as exc:
        prepare(docs(), tmp_path / "out", tokenizer_spec="byte", workers=2, source="corpus", worker_timeout_s=1.0)
    message = str(exc.value)
    assert "no result from 2 worker process(es) in 1 s while tokenizing data.source = 'corpus'" in message
    assert "data.workers = 0" in message and "\n" not in message
    assert not multiprocessing.active_children()  # the stopped workers were killed


def test_ordered_map_keeps_order_and_raises_what_a_worker_raised() -> None:
    items = [str(i) for i in range(500)]
    assert list(ordered_map(int, items, workers=3, task="parsing", hint="h", timeout_s=60)) == list(range(500))
    with pytest.raises(ValueError, match="invalid literal"):
        list(ordered_map(int, ["1", "2", "x", "4"], workers=2, task="parsing", hint="h", timeout_s=60))
    with pytest.raises(UserError, match=r"worker process \d of 2 \(pid \d+\) exited with code 3 while parsing; h"):
        list(ordered_map(os._exit, [3, 3, 3], workers=2, task="parsing", hint="h", timeout_s=60))


def test_workers_zero_and_a_pool_give_the_same_shards(tmp_path: Path) -> None:
    docs = [f"document {i}" for i in range(200)]
    a = prepare(iter(docs), tmp_path / "a", tokenizer_spec="byte", workers=0, max_tokens=100)
    b = prepare(iter(docs), tmp_path / "b", tokenizer_spec="byte", workers=2, max_tokens=100)
    assert np.array_equal(np.asarray(a.shards[0].tokens), np.asarray(b.shards[0].tokens))
    assert a.num_tokens == b.num_tokens >= 100
