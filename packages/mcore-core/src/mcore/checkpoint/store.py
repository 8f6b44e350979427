"""Save and find run checkpoints: atomic, optionally in the background, checksummed.

A checkpoint is ``<root>/step_00001000/`` holding a DCP checkpoint of every tensor (model,
optimizer and precision-recipe state; DTensors saved sharded), ``rank_XXXXX.json`` per rank
(the JSON skeletons of the optimizer/recipe state and the RNG states), ``meta.json`` (step,
resolved config, tokenizer, model name) and, written last, ``manifest.json``: every file
with its size and checksums (``manifest.py``). The manifest is the completion mark: only a
directory holding one is listed, chosen by ``resume = "latest"`` and pruned. Everything is
written to ``step_XXXXXXXX.tmp`` and renamed when all ranks finished, so a crash or a full
disk mid-save leaves only a ``.tmp`` directory that is never loaded (and is removed on
failure); the previous checkpoint stays untouched. State holding ``inf``/``nan`` is never
saved (``NonFiniteStateError``).

Only the newest ``keep_last`` are kept, besides those in ``CheckpointManager.protect``.
Pruning first renames a checkpoint's manifest aside (so one interrupted mid-prune is no
longer listed as complete, yet still says which files are ours), then deletes only the files
it lists and removes the directory when that leaves it empty: anything else found there (a
user's notes, an export, another run) is left in place with a warning. Checkpoints of older
mcore versions (no manifest) are never listed, so never pruned; they load when named
explicitly (``load.py``).

Background saves copy the state first (so training may change the parameters at once) and
write from a thread, using their own process group so their collectives never interleave
with the training step's.

Loading lives in ``load.py``; its functions are re-exported here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import warnings
from collections.abc import Callable, Generator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem

from mcore.checkpoint.agree import all_min
from mcore.checkpoint.finite import NonFiniteStateError, check_finite
from mcore.checkpoint.load import LegacyCheckpointWarning, load_checkpoint, load_model_weights, read_meta
from mcore.checkpoint.manifest import (
    MANIFEST,
    checksum_files,
    merge_parts,
    read_manifest,
    write_manifest,
    write_part,
)
from mcore.checkpoint.state import split_state
from mcore.errors import UserError
from mcore.outputs import normalize_permissions
from mcore.ragged import annotate_for_checkpoint

__all__ = [
    "MANIFEST",
    "CheckpointManager",
    "CheckpointSaveError",
    "LegacyCheckpointWarning",
    "NonFiniteStateError",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "read_meta",
    "checkpoint_containing",
    "is_checkpoint_dir",
    "remove_checkpoint",
    "step_dir",
]

STEP_DIR = re.compile(r"^step_(\d{8})$")
_RETIRED = ".deleting"  # suffix of a checkpoint directory being removed


class CheckpointSaveError(UserError):
    """A checkpoint could not be written; the message names the last good one."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first: ``step_XXXXXXXX`` directories with a manifest."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if STEP_DIR.match(p.name) and not p.is_symlink() and (p / MANIFEST).is_file()  # a link may lead anywhere
    ]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` is a checkpoint directory of ours (a manifest or, for old ones, ``meta.json``)."""
    return path.is_dir() and not path.is_symlink() and ((path / MANIFEST).is_file() or (path / "meta.json").is_file())


_RETIRED_MANIFEST = ".retired-" + MANIFEST  # the manifest of a checkpoint being removed: what to delete
_LEGACY_FILE = re.compile(r"^(meta\.json|\.metadata|rank_\d{5}\.json|__\d+_\d+\.distcp)$")  # no manifest


def checkpoint_containing(path: Path) -> Path | None:
    """The checkpoint directory ``path`` is, or lies inside (``step_XXXXXXXX`` holding a manifest or ``meta.json``)."""
    for p in (path, *path.parents):
        if STEP_DIR.match(p.name) and is_checkpoint_dir(p):
            return p
    return None


def _retire(path: Path) -> Path:
    """Rename ``path``'s manifest aside (it stops counting as complete), then move ``path`` aside to be removed."""
    if (path / MANIFEST).is_file():
        read_manifest(path)  # a malformed one is a UserError: removing by it could delete what is not ours
        os.replace(path / MANIFEST, path / _RETIRED_MANIFEST)
    trash = path.with_name(path.name + _RETIRED)
    if trash.exists():
        _remove_retired(trash)  # a previous removal of ours that was interrupted
    if trash.exists():
        raise UserError(f"{trash} is in the way (it holds files mcore did not write); move it away")
    os.replace(path, trash)
    return trash


def _ours(trash: Path) -> set[str]:
    """The names in retired checkpoint ``trash`` that mcore wrote: those its retired manifest lists (for a
    checkpoint of an older mcore, without one: the file names a checkpoint is made of)."""
    retired = trash / _RETIRED_MANIFEST
    if retired.is_file():
        try:
            listed = json.loads(retired.read_text()).get("files")
        except (OSError, ValueError, AttributeError):
            listed = None
        if not isinstance(listed, dict):
            return set()  # unreadable: nothing is known to be ours, nothing is deleted
        return {name for name in listed if isinstance(name, str) and "/" not in name and name not in ("", ".", "..")}
    return {p.name for p in trash.iterdir() if _LEGACY_FILE.match(p.name)}


def _remove_retired(trash: Path) -> None:
    """Delete the files of ours in ``trash`` (then its retired manifest) and ``trash`` itself when that empties it;
    anything else stays, moved back under the checkpoint's name when free, with a warning naming it."""
    for name in sorted(_ours(trash)):
        f = trash / name
        if f.is_file() or f.is_symlink():
            f.unlink()  # a link is removed, never what it points to
    (trash / _RETIRED_MANIFEST).unlink(missing_ok=True)
    try:
        trash.rmdir()
        return
    except OSError:
        pass
    left = sorted(p.name for p in trash.iterdir())
    where = trash
    if trash.name.endswith(_RETIRED):  # back under its name, else beside it: never retired (and warned of) again
        name = trash.name[: -len(_RETIRED)]
        for candidate in (trash.with_name(name), trash.with_name(f"{name}.kept")):
            if not candidate.exists() and not candidate.is_symlink():
                os.replace(trash, candidate)
                where = candidate
                break
    more = f" and {len(left) - 3} more" if len(left) > 3 else ""
    warnings.warn(
        f"removed the checkpoint files of {where} but left the directory: it also holds {', '.join(left[:3])}{more}, "
        "which mcore did not write; move them elsewhere",
        stacklevel=3,
    )


def remove_checkpoint(path: Path) -> None:
    """Remove checkpoint ``path`` of ours: its manifest first, then the files it lists, then the directory when that
    leaves it empty (anything else in it stays, with a warning)."""
    if not is_checkpoint_dir(path):
        raise UserError(f"{path} is not an mcore checkpoint (no {MANIFEST} nor meta.json); it was not removed")
    _remove_retired(_retire(path))


def _stage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies that later training steps cannot change (plain tensors moved to CPU)."""
    out = {}
    for k, t in tensors.items():
        t = t.detach()
        out[k] = t.clone() if hasattr(t, "device_mesh") else t.to("cpu", copy=True)
    return out


class _RecordingFileSystem(FileSystem):
    """DCP's file system, noting the name of every file it writes (the files this rank must hash)."""

    def __init__(self) -> None:
        super().__init__()
        self.written: set[str] = set()

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[Any, None, None]:
        if "w" in mode or "a" in mode:
            self.written.add(Path(path).name)
        with super().create_stream(path, mode) as stream:
            yield stream


def _write_json(path: Path, obj: Any, **kwargs: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, **kwargs)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class SaveRequest:
    step: int
    tensors: dict[str, torch.Tensor]
    rank_json: dict[str, Any]
    meta: dict[str, Any]


class _OtherRankFailed(RuntimeError):
    """Another rank failed at a stage of the save that this one got through."""


class CheckpointManager:
    """Writes checkpoints under ``root`` for one rank; ``group`` is a group reserved for saving.

    ``protect`` holds checkpoint directories that pruning never removes (e.g. the one a run
    resumed from); add to it at any time.
    """

    def __init__(
        self,
        root: Path,
        *,
        keep_last: int,
        async_save: bool,
        rank: int,
        world_size: int,
        group: Any = None,
        on_saved: Callable[[int, Path], None] | None = None,
    ) -> None:
        self.root, self.keep_last, self.async_save = root, keep_last, async_save
        self.rank, self.world_size, self.group = rank, world_size, group
        self.on_saved = on_saved
        self.protect: set[Path] = set()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._done: list[tuple[int, Path]] = []
        self.last_good: Path | None = latest_checkpoint(root)

    # -- saving ------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        *,
        model: torch.nn.Module,
        optimizer: Any,
        precision: Any,
        meta: dict[str, Any],
        rank_extra: dict[str, Any],
        blocking: bool = False,
    ) -> None:
        """Checkpoint the state after ``step`` steps (waits for the previous save first).

        Raises ``NonFiniteStateError`` (on every rank, before writing anything) when a floating
        tensor of the model, optimizer or recipe state holds ``inf`` or ``nan``; a collective.
        """
        self.wait()
        opt_skel, opt_tensors = split_state(optimizer.state_dict(), "optimizer")
        prec_skel, prec_tensors = split_state(precision.state_dict(), "precision")
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
        tensors.update(opt_tensors)
        tensors.update(prec_tensors)
        check_finite(tensors, group=self.group, world_size=self.world_size, what=f"the checkpoint of step {step}")
        staged = _stage(tensors)
        annotate_for_checkpoint(staged)  # ragged row splits (collective, so here on the main thread)
        request = SaveRequest(
            step=step,
            tensors=staged,
            rank_json={"optimizer": opt_skel, "precision": prec_skel, **rank_extra},
            meta={**meta, "step": step, "world_size": self.world_size, "manifest": MANIFEST},
        )
        if self.async_save and not blocking:
            self._thread = threading.Thread(target=self._run, args=(request,), name=f"mcore-ckpt-{step}", daemon=True)
            self._thread.start()
        else:
            self._run(request)
            self.wait()

    def _agree(self, error: BaseException | None, stage: str) -> None:
        """Every rank learns whether every rank got through ``stage`` (one all-reduce); raise if not."""
        (ok,) = all_min([0 if error is not None else 1], group=self.group, world_size=self.world_size)
        if error is not None:
            raise error
        if not ok:
            raise _OtherRankFailed(f"another rank failed while {stage}")

    def _check_target(self, final: Path) -> None:
        if (final.exists() or final.is_symlink()) and not is_checkpoint_dir(final):
            raise CheckpointSaveError(
                f"{final} exists and is not an mcore checkpoint (no {MANIFEST} nor meta.json); mcore does not "
                "replace it: move it away or use another train.out_dir"
            )

    def _run(self, request: SaveRequest) -> None:
        final = step_dir(self.root, request.step)
        tmp = final.with_name(final.name + ".tmp")
        try:
            self._check_target(final)  # on every rank (one shared directory), before anything is written
            error: BaseException | None = None
            if self.rank == 0:
                try:
                    shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt of ours at this step
                    tmp.mkdir(parents=True)
                except OSError as exc:
                    error = exc
            self._agree(error, "creating the checkpoint directory")
            try:
                writer = dcp.FileSystemWriter(str(tmp), single_file_per_rank=True, thread_count=1)
                fs = writer.fs = _RecordingFileSystem()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # DCP's note that one process saves alone
                    dcp.save(
                        request.tensors, storage_writer=writer, process_group=self.group, no_dist=self.world_size == 1
                    )
                rank_file = f"rank_{self.rank:05d}.json"
                _write_json(tmp / rank_file, request.rank_json)
                mine = {n for n in fs.written if (tmp / n).is_file()} | {rank_file}
                write_part(tmp, self.rank, checksum_files(tmp, mine))  # hashed while still in the page cache
            except BaseException as exc:
                error = exc
            self._agree(error, "writing its part of the checkpoint")
            if self.rank == 0:
                try:
                    self._publish(request, tmp, final)
                except BaseException as exc:
                    error = exc
            self._agree(error, "publishing the checkpoint")
            self._done.append((request.step, final))
            if self.rank == 0:
                self._prune()  # after the others were released: removing gigabytes takes a while
        except BaseException as exc:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            self._error = exc

    def _publish(self, request: SaveRequest, tmp: Path, final: Path) -> None:
        """Rank 0: ``meta.json``, then the manifest (last), then rename into place."""
        _write_json(tmp / "meta.json", request.meta, indent=2, default=str)
        sums = merge_parts(tmp, self.world_size)
        on_disk = {p.name for p in tmp.iterdir()}
        lost = sorted(set(sums) - on_disk)
        if lost:
            raise RuntimeError(f"files hashed by the ranks vanished from {tmp}: {lost[:3]}")
        sums.update(checksum_files(tmp, on_disk - set(sums)))  # .metadata, meta.json, anything unrecorded
        normalize_permissions(tmp)  # 0o666/0o777 less the umask, like any file the user writes
        write_manifest(tmp, sums)  # last: from here on the checkpoint is complete
        self._check_target(final)
        trash = _retire(final) if final.exists() else None  # the same step saved again: ours (checked)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        if trash is not None:
            try:
                _remove_retired(trash)
            except OSError as exc:
                warnings.warn(f"could not remove the replaced checkpoint {trash}: {exc}", stacklevel=2)

    def _prune(self) -> None:
        """Remove all but the newest ``keep_last`` complete checkpoints (and never those in ``protect``)."""
        protected = {p.resolve() for p in self.protect}
        try:
            for old in list_checkpoints(self.root)[: -self.keep_last]:
                if old.resolve() not in protected:
                    remove_checkpoint(old)
            for leftover in self.root.glob(f"step_*{_RETIRED}"):  # removals of ours that were interrupted
                if STEP_DIR.match(leftover.name[: -len(_RETIRED)]) and not leftover.is_symlink():
                    _remove_retired(leftover)
        except (OSError, UserError) as exc:
            warnings.warn(f"could not remove an old checkpoint under {self.root}: {exc}", stacklevel=2)

    def wait(self) -> Path | None:
        """Wait for a background save; report it (``on_saved``) or raise why it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        done, self._done = self._done, []
        for step, path in done:
            self.last_good = path
            if self.on_saved is not None:
                self.on_saved(step, path)
        if self._error is not None:
            exc, self._error = self._error, None
            interrupt = _interrupt(exc)
            if interrupt is not None:  # Ctrl-C or SystemExit: not a failed save (and no disk to free)
                raise interrupt
            last = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was completed"
            if isinstance(exc, UserError):
                raise CheckpointSaveError(f"{str(exc).rstrip('.;')}; {last}") from exc
            lines = str(exc).strip().splitlines()  # DCP wraps each rank's traceback: keep the cause
            cause = lines[-1] if lines else type(exc).__name__
            raise CheckpointSaveError(
                f"saving a checkpoint under {self.root} failed ({cause}); {last}; "
                "free disk space or fix the path and resume with --train.resume=latest"
            ) from exc
        return self.last_good


def _interrupt(exc: BaseException) -> BaseException | None:
    """The ``KeyboardInterrupt``/``SystemExit`` behind a failed save, also when DCP wrapped it in a
    ``CheckpointException`` (which holds each rank's exception in ``failures``); else ``None``."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return exc
    for failure in (getattr(exc, "failures", None) or {}).values():
        inner = failure[0] if isinstance(failure, tuple) and failure else failure
        if isinstance(inner, (KeyboardInterrupt, SystemExit)):
            return inner
    return None


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (where the platform allows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
