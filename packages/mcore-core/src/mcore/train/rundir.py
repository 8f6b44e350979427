"""Where a run starts: what ``train.out_dir`` holds decides between resuming, refusing and starting fresh.

A run directory holds one run: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/`` and
``layer_stats.jsonl`` (the data cache and the tokenizer are shared inputs, not run outputs).
``train.resume`` says what a new invocation does with it:

* ``"auto"`` (default): continue from the newest complete checkpoint when it was made by the
  same model config (its ``meta.json`` stores the resolved ``[model]`` section); refuse, naming
  the keys that differ, when it was not. With no checkpoint, start fresh.
* ``"latest"``: the newest complete checkpoint, or a fresh start when there is none.
* ``"none"``: always step 1; refused when the directory already holds a run.
* a checkpoint directory: that checkpoint. Checkpoints of this run newer than it (an abandoned
  continuation) are moved aside, so ``latest`` never picks them again.

An explicit resume that changes model config keys is refused unless
``train.allow_model_change``. ``train.overwrite`` starts at step 1 (or at the named
checkpoint). Nothing is ever deleted: outputs that would mix with the new run are moved to
``out_dir/previous/<time>/``.

``plan_start`` only reads files, so every rank calls it (before the process group exists)
and reaches the same decision; rank 0 then moves files with ``carry_out``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mcore.checkpoint.load import check_stored_schema
from mcore.checkpoint.store import STEP_DIR, checkpoint_containing, latest_checkpoint, list_checkpoints, read_meta
from mcore.config import RunConfig
from mcore.errors import UserError

#: What a run writes into its directory (moved together when the run is set aside).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "layer_stats.jsonl")

#: ``[train]`` keys that say where and how to start, not how to train.
BOOKKEEPING_KEYS = frozenset({"out_dir", "resume", "overwrite", "allow_model_change"})


@dataclass(frozen=True)
class StartPlan:
    """How a run starts; ``message`` is the first line it prints."""

    out_dir: Path
    message: str
    checkpoint: Path | None = None  # load this (where it will be once ``move`` is done); None: step 1
    step: int = 0  # the checkpoint's step
    finished: bool = False  # the checkpoint already reached train.steps: nothing to train
    model_changes: tuple[str, ...] = ()  # resolved [model] keys that differ from the checkpoint's
    settings_changed: bool = False  # [optimizer] or [train] differ from the checkpoint's
    archive: Path | None = None  # out_dir/previous/<time>
    move: tuple[Path, ...] = ()  # moved into ``archive``, keeping their path below out_dir
    copy: tuple[Path, ...] = ()  # copied into ``archive`` (files the resumed run trims)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # the form meta.json stores


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}"))
    return out


def config_changes(
    saved: dict[str, Any], current: dict[str, Any], section: str, ignore: frozenset[str] = frozenset()
) -> list[str]:
    """``["model.num_heads: 4 -> 2", ...]``: the keys of ``section`` whose values differ."""
    old = _flatten(_plain(saved.get(section, {})), section)
    new = _flatten(_plain(current.get(section, {})), section)
    keys = sorted(k for k in set(old) | set(new) if k.split(".")[1] not in ignore)
    return [f"{k}: {_show(old.get(k))} -> {_show(new.get(k))}" for k in keys if old.get(k) != new.get(k)]


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value)


def _summary(changes: list[str], limit: int = 5) -> str:
    more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
    return ", ".join(changes[:limit]) + more


def model_changes(meta: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The resolved ``[model]`` keys (name included) that differ between a checkpoint and this run."""
    if "config" not in meta:  # an old checkpoint: only its model name is known
        name = meta.get("model_name")
        now = current["model"].get("name")
        return [] if name == now else [f"model.name: {_show(name)} -> {_show(now)}"]
    return config_changes(meta["config"], current, "model")


def settings_changed(meta: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether ``[optimizer]`` or ``[train]`` (beyond where/how to start) differ from the checkpoint's."""
    saved = meta.get("config")
    if saved is None:
        return True
    return bool(
        config_changes(saved, current, "optimizer") or config_changes(saved, current, "train", BOOKKEEPING_KEYS)
    )


def run_outputs(out_dir: Path) -> list[Path]:
    """The outputs of a run present in ``out_dir`` (an empty ``checkpoints/`` does not count)."""
    found = []
    for name in RUN_OUTPUTS:
        path = out_dir / name
        if path.is_dir() and not any(path.iterdir()):
            continue
        if path.exists():
            found.append(path)
    return found


def _step(path: Path, meta: dict[str, Any]) -> int:
    if "step" in meta:
        return int(meta["step"])
    match = STEP_DIR.match(path.name)
    if match is None:
        raise UserError(f"checkpoint {path}: meta.json has no step and the directory is not named step_XXXXXXXX")
    return int(match.group(1))


def archive_dir(out_dir: Path, paths: list[Path] | tuple[Path, ...]) -> Path:
    """``out_dir/previous/<time>``, named after the newest modification among ``paths`` (when the
    previous run last wrote them): every rank reads the same files, so all agree on the name."""
    stamp = max((p.stat().st_mtime for p in paths), default=0.0)
    now = time.strftime("%Y%m%d-%H%M%S", time.localtime(stamp))
    base = out_dir / "previous" / now
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{now}-{n}")
    return candidate


def _names(paths: tuple[Path, ...] | list[Path], out_dir: Path) -> str:
    return ", ".join(str(p.relative_to(out_dir)) for p in paths)


def plan_start(config: RunConfig) -> StartPlan:
    """Decide how the run of ``config`` starts (reads files only); a ``UserError`` when it must not.

    A run that will write is refused at once where it cannot (``out_dir`` under a directory without write
    permission, on a read-only file system). A ``tokenizer/`` in ``out_dir`` that is not the tokenizer this run
    writes there (another run's, or files of the user's) is set aside with the run's outputs, never overwritten.
    """
    plan = _plan(config)
    if plan.finished:
        return plan
    _check_writable(plan.out_dir)
    return _set_aside_other_tokenizer(plan, config)


def _check_writable(out: Path) -> None:
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == out else f" ('{existing}' is the nearest existing directory)"
        raise UserError(
            f"train.out_dir = '{out}' cannot be written{where}: no permission or a read-only file system; "
            "choose a directory you can write"
        )


def _set_aside_other_tokenizer(plan: StartPlan, config: RunConfig) -> StartPlan:
    """``plan``, moving ``out_dir/tokenizer`` aside too when it is not the tokenizer this run saves there."""
    from mcore.data.tokenizer import load_tokenizer

    directory = plan.out_dir / "tokenizer"
    if not directory.exists() and not directory.is_symlink():
        return plan
    try:
        same = (directory / "tokenizer.json").read_text() == load_tokenizer(config.data.tokenizer).saved_json()
    except (OSError, UnicodeDecodeError):
        same = False
    if same and not directory.is_symlink():
        return plan
    archive = plan.archive if plan.move or plan.copy else archive_dir(plan.out_dir, [directory])
    assert archive is not None
    message = f"{plan.message}; the tokenizer/ there is not data.tokenizer: moved to {archive}"
    return replace(plan, message=message, archive=archive, move=(*plan.move, directory))


def _plan(config: RunConfig) -> StartPlan:
    train = config.train
    out = Path(os.path.abspath(train.out_dir))
    if out.exists() and not out.is_dir():
        raise UserError(f"train.out_dir = '{out}' is a file; give a directory (it is created when missing)")
    holder = checkpoint_containing(out)
    if holder is not None:  # pruning that checkpoint would leave this run in a half-deleted directory
        raise UserError(
            f"train.out_dir = '{out}' lies inside checkpoint {holder}; give a directory outside every checkpoint"
        )
    root = out / "checkpoints"
    current = config.to_dict()
    existing = run_outputs(out)
    spec = "none" if train.resume in (None, "", "none") else train.resume
    assert spec is not None

    if spec in ("none", "auto", "latest") and train.overwrite:
        archive = archive_dir(out, existing)
        moved = f" (the previous run's {_names(existing, out)} moved to {archive})" if existing else ""
        return StartPlan(out, f"starting a fresh run in {out}{moved}", archive=archive, move=tuple(existing))
    if spec == "none":
        if existing:
            raise UserError(
                f"train.out_dir '{out}' already holds a run ({_names(existing, out)}) and train.resume = 'none' starts "
                "at step 1: use another --train.out_dir=..., --train.overwrite=true to move that run to "
                f"{out / 'previous'}/, or --train.resume=auto to continue it"
            )
        return StartPlan(out, f"starting a fresh run in {out}")

    move: list[Path] = []
    copy: list[Path] = []
    notes: list[str] = []
    path: Path | None
    if spec in ("auto", "latest"):
        path = latest_checkpoint(root)
        if path is None:
            archive = archive_dir(out, existing)
            moved = f" (no checkpoint to resume; the previous run's {_names(existing, out)} moved to {archive})"
            return StartPlan(
                out,
                f"starting a fresh run in {out}" + (moved if existing else ""),
                archive=archive,
                move=tuple(existing),
            )
    else:
        path = Path(os.path.abspath(spec))
    meta = read_meta(path)
    check_stored_schema(path, meta["config"])
    step = _step(path, meta)
    changes = model_changes(meta, current)
    if changes and not train.allow_model_change:
        if spec == "auto":
            raise UserError(
                f"train.out_dir '{out}' holds a run of another model config ({_summary(changes)}; checkpoint {path}): "
                "use another --train.out_dir=..., --train.overwrite=true to move that run aside and start fresh, or "
                "--train.allow_model_change=true to resume it with this model config"
            )
        raise UserError(
            f"checkpoint {path} was made with another model config ({_summary(changes)}); resuming it with these "
            "changes needs --train.allow_model_change=true (the tensor shapes must still fit), or start fresh in "
            "another --train.out_dir"
        )
    if step >= train.steps:
        ways = "raise --train.steps" + ("" if train.overwrite else " or use --train.overwrite=true")
        return StartPlan(
            out,
            f"nothing to do: {path} finished at step {step} (train.steps = {train.steps}); {ways}",
            checkpoint=path,
            step=step,
            finished=True,
        )
    inside = path.parent.resolve() == root.resolve()
    archive = archive_dir(out, existing)
    if train.overwrite:  # set the whole previous run aside (the checkpoint to resume moves with it)
        move = existing
        notes = [f"the previous run's {_names(existing, out)} moved to {archive}"] if existing else []
        if inside:
            path = archive / "checkpoints" / path.name
    elif inside:
        newer = [c for c in list_checkpoints(root) if c.name > path.name]
        archive = archive_dir(out, newer)
        if newer:  # an abandoned continuation: 'latest' must never pick it again
            move = newer
            copy = [p for p in (out / "metrics.jsonl", out / "layer_stats.jsonl") if p.is_file()]
            notes = [f"the later checkpoints {', '.join(c.name for c in newer)} moved to {archive}"]
    elif existing:
        raise UserError(
            f"train.out_dir '{out}' already holds a run ({_names(existing, out)}); resuming checkpoint {path} "
            "there would mix two runs: use another --train.out_dir=..., or --train.overwrite=true to move that "
            f"run to {out / 'previous'}/ first"
        )
    same = (
        "same model config"
        if not changes
        else f"model config changed: {_summary(changes)}, allowed by train.allow_model_change"
    )
    detail = "; ".join([f"step {step} of {train.steps}", same, *notes])
    return StartPlan(
        out,
        f"resuming from {path} ({detail})",
        checkpoint=path,
        step=step,
        model_changes=tuple(changes),
        settings_changed=settings_changed(meta, current),
        archive=archive,
        move=tuple(move),
        copy=tuple(copy),
    )


def carry_out(plan: StartPlan) -> None:
    """Move (and copy) what ``plan`` sets aside into ``plan.archive``; rank 0 only."""
    if not plan.move and not plan.copy:
        return
    assert plan.archive is not None
    for src in plan.copy:
        dst = plan.archive / src.relative_to(plan.out_dir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    for src in plan.move:
        dst = plan.archive / src.relative_to(plan.out_dir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)  # same file system: a rename, never a copy and delete


def set_aside(out_dir: Path, paths: list[Path], *, move: bool) -> Path:
    """Move ``paths`` (inside ``out_dir``) to a new ``out_dir/previous/<time>/``; only where ``move``
    (rank 0). Returns that directory."""
    archive = archive_dir(out_dir, paths)
    if move:
        carry_out(StartPlan(out_dir, "", archive=archive, move=tuple(paths)))
    return archive
