"""Careless and hostile command-line input: each is refused with one line (exit code 2), before any work, and
nothing the command did not write is overwritten.

Found by trying every ``mcore`` surface as a careless user would: a ``tokenizer/`` of the user's in
``train.out_dir`` was overwritten by the run's; ``mcore data train-tokenizer --out`` wrote into any directory
(``/etc``) and replaced a ``tokenizer.json`` there; an output path the system will not create was a traceback;
``--vocab-size 2**31`` aborted the process inside the tokenizer trainer; ``mcore generate --temperature nan``
sampled at temperature 1; an unknown ``train.lr_schedule`` was found only after the data was prepared; a prepared
dataset's ``index.json`` could name shard files anywhere; ``--overwrite`` of a prepared dataset deleted files the
user had added to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_train_loop import make_config, make_corpus, merge

from mcore.cli import main
from mcore.data.cli import main as data_main
from mcore.data.shards import TokenShards
from mcore.data.tokenizer import ByteTokenizer
from mcore.errors import UnknownNameError, UserError
from mcore.train import run
from mcore_testing.hosts import isolated_host

TEXT = "def f(x):\n    return x + 1\n" * 40
FAST = {"train": {"steps": 1}, "checkpoint": {"save_final": True}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture
def host() -> Any:
    return isolated_host("mcore_testing.plugin")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def one_line_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mcore: error: ") and "\n" not in err and "Traceback" not in err
    return err


# -- train.out_dir ----------------------------------------------------------------------------------
def test_a_tokenizer_of_the_users_in_out_dir_is_moved_aside_not_overwritten(
    host: Any, corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "project"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.json").write_text('{"mine": true}')
    run(make_config(host, out, corpus, FAST), host)
    assert "the tokenizer/ there is not data.tokenizer: moved to" in capsys.readouterr().out.splitlines()[0]
    (kept,) = (out / "previous").glob("*/tokenizer/tokenizer.json")
    assert kept.read_text() == '{"mine": true}'
    assert (out / "tokenizer" / "tokenizer.json").read_text() == ByteTokenizer().saved_json()

    run(make_config(host, out, corpus, merge(FAST, {"train": {"steps": 2}})), host)  # its own tokenizer: left alone
    assert "tokenizer/" not in capsys.readouterr().out.splitlines()[0]
    assert len(list((out / "previous").iterdir())) == 1


def test_an_out_dir_that_cannot_be_written_is_refused_before_anything_runs(
    host: Any, corpus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(host, tmp_path / "new" / "run", corpus, FAST)
    monkeypatch.setattr("os.access", lambda path, mode: False)  # as a read-only mount, or a root-owned directory
    with pytest.raises(UserError, match="cannot be written.*no permission or a read-only file system"):
        run(config, host)
    assert not (tmp_path / "new").exists()


def test_an_out_dir_the_system_will_not_create_is_one_line(host: Any, corpus: str) -> None:
    """In ``/proc`` ``mkdir`` fails although the directory looks writable to root (``os.access``): a
    ``FileNotFoundError`` traceback from the run loop before."""
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    out = Path("/proc/mcore-no-such-dir/run")
    with pytest.raises(UserError, match="train.out_dir = .*(cannot write the run there|cannot be written)"):
        run(make_config(host, out, corpus, FAST), host)
    assert not out.exists()


def test_named_train_implementations_are_checked_with_the_config(host: Any, corpus: str, tmp_path: Path) -> None:
    """``mcore config`` refuses them too, and ``mcore train`` before tokenizing any data."""
    with pytest.raises(UnknownNameError, match="unknown lr_schedule 'nope'"):
        make_config(host, tmp_path, corpus, {"train": {"lr_schedule": "nope"}})
    with pytest.raises(UnknownNameError, match="unknown attention 'nope'"):
        make_config(host, tmp_path, corpus, {"train": {"attention": "nope"}})
    assert not tmp_path.joinpath("data").exists()


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"train": {"seed": 2**70}}, r"train.seed = 1180591620717411303424: must be an integer in \[0, 2\*\*63\)"),
        ({"train": {"cpu_threads": 100_000}}, "train.cpu_threads = 100000: must be at most 1024"),
        ({"data": {"workers": 100_000}}, r"data.workers = 100000: must be in \[0, 1024\]"),
    ],
)
def test_typo_sized_numbers_are_refused_with_the_config(
    update: dict[str, Any], message: str, host: Any, corpus: str, tmp_path: Path
) -> None:
    """Were: a torch overflow traceback at the first seed, a segmentation fault, minutes of forking processes."""
    with pytest.raises(UserError, match=message):
        make_config(host, tmp_path, corpus, update)


# -- mcore data --------------------------------------------------------------------------------------
def test_train_tokenizer_never_writes_among_other_files(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "model"
    other.mkdir()
    (other / "tokenizer.json").write_text("theirs")
    (other / "model.safetensors").write_text("weights")
    argv = ["train-tokenizer", "--source", str(source), "--vocab-size", "300", "--out", str(other)]
    err = one_line_error(capsys, data_main([*argv, "--overwrite"]))
    assert "holds files that are not a tokenizer's (model.safetensors)" in err
    assert (other / "tokenizer.json").read_text() == "theirs"

    out = tmp_path / "tok"
    argv[-1] = str(out)
    assert data_main(argv) == 0
    first = (out / "tokenizer.json").read_text()
    assert "pass --overwrite" in one_line_error(capsys, data_main(argv))
    assert data_main([*argv, "--overwrite"]) == 0
    assert (out / "tokenizer.json").read_text() == first
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--vocab-size", str(2**31)], "must exceed 257 (the 256 bytes and <|endoftext|>) and be at most 16777216"),
        (["--out-is-a-file"], "exists and is not a directory"),
        (["--out-under-a-file"], "cannot create the tokenizer there"),
    ],
)
def test_train_tokenizer_refusals_are_one_line(
    extra: list[str], message: str, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tok"
    if extra == ["--out-is-a-file"]:
        out, extra = source, []
    elif extra == ["--out-under-a-file"]:
        out, extra = source / "tok", []
    argv = ["train-tokenizer", "--source", str(source), "--vocab-size", "300", "--out", str(out), *extra]
    assert message in one_line_error(capsys, data_main(argv))


@pytest.mark.parametrize(
    ("flag", "message"),
    [("--shard-tokens", "--shard-tokens 0: must be >= 1"), ("--max-tokens", "--max-tokens 0: must be >= 1")],
)
def test_prepare_refuses_non_positive_sizes(
    flag: str, message: str, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["prepare", "--source", str(source), "--out", str(tmp_path / "out"), "--workers", "0", flag, "0"]
    assert message in one_line_error(capsys, data_main(argv))
    assert not (tmp_path / "out").exists()


def test_files_added_to_a_previous_prepare_are_never_deleted(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--overwrite`` replaced the whole directory, with the notes the user had put beside the shards."""
    out = tmp_path / "prepared"
    argv = ["prepare", "--source", str(source), "--out", str(out), "--workers", "0"]
    assert data_main(argv) == 0
    (out / "notes.txt").write_text("mine")
    assert "did not write (notes.txt)" in one_line_error(capsys, data_main([*argv, "--overwrite"]))
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert data_main([*argv, "--overwrite"]) == 0


def test_prepare_into_a_path_the_system_will_not_create_is_one_line(
    source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was a ``FileNotFoundError`` traceback from the temporary directory beside ``--out``."""
    argv = ["prepare", "--source", str(source), "--out", str(source / "sub" / "out"), "--workers", "0"]
    assert "cannot create the prepared dataset there" in one_line_error(capsys, data_main(argv))


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_a_prepared_index_naming_files_outside_its_directory_is_refused(how: str, source: Path, tmp_path: Path) -> None:
    """Its shard names were joined to the directory as given: ``/etc/...``, ``../`` and links out were opened."""
    out = tmp_path / "prepared"
    assert data_main(["prepare", "--source", str(source), "--out", str(out), "--workers", "0"]) == 0
    index = json.loads((out / "index.json").read_text())
    elsewhere = tmp_path / "elsewhere.bin"
    elsewhere.write_bytes((out / "tokens_00000.bin").read_bytes())
    if how == "symlink":
        (out / "tokens_00000.bin").unlink()
        (out / "tokens_00000.bin").symlink_to(elsewhere)
    else:
        index["shards"][0]["tokens"] = str(elsewhere) if how == "absolute" else "../elsewhere.bin"
        (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="(outside its directory|a link leading outside)"):
        TokenShards.open(out)


# -- mcore generate -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "nan"], "--temperature nan: must be a finite number >= 0"),
        (["--temperature", "-1"], "--temperature -1.0: must be a finite number >= 0"),
        (["--temperature", "inf"], "--temperature inf: must be a finite number >= 0"),
        (["--top-k", "-5"], "--top-k -5: must be >= 0"),
    ],
)
def test_generate_sampling_flags_are_checked_first(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before the checkpoint is even looked for (NaN used to sample at temperature 1)."""
    assert message in one_line_error(capsys, main(["generate", str(tmp_path / "absent"), *args]))


# -- mcore plan ---------------------------------------------------------------------------------------
def test_plan_refuses_an_infinite_device_memory(capsys: pytest.CaptureFixture[str]) -> None:
    """Was an ``OverflowError`` traceback."""
    err = one_line_error(capsys, main(["plan", "--device-memory-gb", "inf"]))
    assert "--device-memory-gb inf: must be a finite positive number" in err


# -- a saved tokenizer is read from inside its run or dataset only ---------------------------------------------------
def test_a_saved_tokenizer_is_read_only_from_inside_its_directory(tmp_path: Path) -> None:
    """A checkpoint's ``meta.json`` (or a dataset's index) names the tokenizer it was made with; a loader never opens
    that path (anyone may write the file), nor a ``tokenizer.json`` linked out of the directory."""
    from mcore.data.tokenizer import tokenizer_from_description

    run_dir, outside = tmp_path / "run", tmp_path / "elsewhere"
    ByteTokenizer().save(outside)  # a valid tokenizer.json, outside the run
    info = {"kind": "hf", "path": str(outside / "tokenizer.json")}
    with pytest.raises(UserError, match="no tokenizer/tokenizer.json in it .* does not open from outside"):
        tokenizer_from_description(info, run_dir / "tokenizer", confined_to=run_dir)
    (run_dir / "tokenizer").mkdir(parents=True)
    (run_dir / "tokenizer" / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    with pytest.raises(UserError, match="link leading outside"):
        tokenizer_from_description(info, run_dir / "tokenizer", confined_to=run_dir)
    (run_dir / "tokenizer" / "tokenizer.json").unlink()
    ByteTokenizer().save(run_dir / "tokenizer")  # the run's own copy
    loaded = tokenizer_from_description(info, run_dir / "tokenizer", confined_to=run_dir)
    assert list(loaded.encode("def f(x):")) == list(ByteTokenizer().encode("def f(x):"))
    assert tokenizer_from_description(info, tmp_path / "missing").vocab_size > 0  # unconfined: the named path
