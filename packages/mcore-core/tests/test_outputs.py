"""``mcore.outputs``: an output directory replaces only a previous output of ours, and only atomically."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import mcore.outputs
from mcore.errors import UserError
from mcore.outputs import check_output_dir, publish_dir

MANIFEST = "made_by_us.json"


def write_output(directory: Path, text: str) -> None:
    (directory / "data.bin").write_text(text)
    (directory / "sub").mkdir()
    (directory / "sub" / "more.bin").write_text(text)
    (directory / MANIFEST).write_text("{}")


def siblings(out: Path) -> list[str]:
    """Everything beside ``out`` except ``out``: temporary directories must not be left there."""
    return sorted(p.name for p in out.parent.iterdir() if p != out)


def one_line(exc: pytest.ExceptionInfo[UserError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_publish_into_a_new_directory_with_normal_modes(tmp_path: Path) -> None:
    out = tmp_path / "parent" / "out"
    with publish_dir(out, manifest=MANIFEST, what="thing", overwrite=False) as tmp:
        assert tmp.parent == out.parent and tmp != out and not out.exists()
        write_output(tmp, "new")
    assert (out / "sub" / "more.bin").read_text() == "new"
    assert siblings(out) == []
    mask = mcore.outputs.current_umask()
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0o700
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "data.bin").stat().st_mode) == 0o666 & ~mask


def test_an_empty_directory_is_taken(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with publish_dir(out, manifest=MANIFEST, what="thing", overwrite=False) as tmp:
        write_output(tmp, "new")
    assert (out / "data.bin").read_text() == "new" and siblings(out) == []


def test_a_directory_of_other_files_is_refused_and_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with (
            pytest.raises(UserError) as exc,
            publish_dir(out, manifest=MANIFEST, what="thing", overwrite=overwrite),
        ):
            raise AssertionError("no work may start")
        assert "never deletes" in one_line(exc) and str(out) in str(exc.value)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and siblings(out) == []


def test_a_previous_output_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    write_output(out, "old")
    with pytest.raises(UserError) as exc:
        check_output_dir(out, manifest=MANIFEST, what="thing", overwrite=False)
    assert "--overwrite" in one_line(exc)
    with publish_dir(out, manifest=MANIFEST, what="thing", overwrite=True) as tmp:
        (tmp / MANIFEST).write_text("{}")
        (tmp / "fresh.bin").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST, "fresh.bin"]
    )  # nothing of the old one is mixed in
    assert siblings(out) == []


def test_files_and_links_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    write_output(target, "old")
    afile = tmp_path / "afile"
    afile.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    for out in (afile, link):
        with pytest.raises(UserError) as exc:
            check_output_dir(out, manifest=MANIFEST, what="thing", overwrite=True)
        assert "not a directory" in one_line(exc)
    assert afile.read_text() == "keep" and (target / "data.bin").read_text() == "old" and link.is_symlink()


def test_a_failure_leaves_the_previous_output_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    write_output(out, "old")
    with (
        pytest.raises(KeyboardInterrupt),
        publish_dir(out, manifest=MANIFEST, what="thing", overwrite=True) as tmp,
    ):
        write_output(tmp, "half")
        raise KeyboardInterrupt
    with (
        pytest.raises(RuntimeError, match="without its"),
        publish_dir(out, manifest=MANIFEST, what="thing", overwrite=True) as tmp,
    ):
        (tmp / "data.bin").write_text("no manifest")
    assert (out / "data.bin").read_text() == "old" and siblings(out) == []


def test_a_directory_that_changed_meanwhile_is_refused_at_the_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with (
        pytest.raises(UserError, match="never deletes"),
        publish_dir(out, manifest=MANIFEST, what="thing", overwrite=True) as tmp,
    ):
        write_output(tmp, "new")
        out.mkdir()
        (out / "theirs.txt").write_text("arrived while we worked")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and siblings(out) == []


def test_the_previous_output_comes_back_if_the_final_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    write_output(out, "old")
    real_replace = os.replace

    def replace(src: Path, dst: Path) -> None:
        if Path(dst) == out and ".tmp-" in Path(src).name:  # the new output into place: a full disk, a quota
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(mcore.outputs.os, "replace", replace)
    with (
        pytest.raises(UserError, match="writing the thing failed: No space"),
        publish_dir(out, manifest=MANIFEST, what="thing", overwrite=True) as tmp,
    ):
        write_output(tmp, "new")
    assert (out / "data.bin").read_text() == "old" and siblings(out) == []
