"""Save and load run checkpoints: atomic, optionally in the background, resharding on load.

A checkpoint is ``<root>/step_00001000/`` holding a DCP checkpoint of every tensor (model,
optimizer and precision-recipe state; DTensors saved sharded), ``rank_XXXXX.json`` per rank
(the JSON skeletons of the optimizer/recipe state and the RNG states), and ``meta.json``
(step, resolved config, tokenizer, model name and parameter shapes) written last. Everything
is written to ``step_XXXXXXXX.tmp`` and renamed when all ranks finished, so a crash or a
full disk mid-save leaves only a ``.tmp`` directory that is never loaded (and is removed on
failure); the previous checkpoint stays untouched. Only the newest ``keep_last`` are kept.

Background saves copy the state first (so training may change the parameters at once) and
write from a thread, using their own process group so their collectives never interleave
with the training step's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from mcore.checkpoint.safe_reader import SafeFileSystemReader
from mcore.checkpoint.state import join_state, split_state, tensor_keys
from mcore.errors import UserError
from mcore.ragged import annotate_for_checkpoint

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointSaveError(UserError):
    """A checkpoint could not be written; the message names the last good one."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (``.tmp`` and meta-less dirs excluded)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _stage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies that later training steps cannot change (plain tensors moved to CPU)."""
    out = {}
    for k, t in tensors.items():
        t = t.detach()
        out[k] = t.clone() if hasattr(t, "device_mesh") else t.to("cpu", copy=True)
    return out


@dataclass
class SaveRequest:
    step: int
    tensors: dict[str, torch.Tensor]
    rank_json: dict[str, Any]
    meta: dict[str, Any]


class CheckpointManager:
    """Writes checkpoints under ``root`` for one rank; ``group`` is a group reserved for saving."""

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
        """Checkpoint the state after ``step`` steps (waits for the previous save first)."""
        self.wait()
        opt_skel, opt_tensors = split_state(optimizer.state_dict(), "optimizer")
        prec_skel, prec_tensors = split_state(precision.state_dict(), "precision")
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
        tensors.update(opt_tensors)
        tensors.update(prec_tensors)
        staged = _stage(tensors)
        annotate_for_checkpoint(staged)  # ragged row splits (collective, so here on the main thread)
        request = SaveRequest(
            step=step,
            tensors=staged,
            rank_json={"optimizer": opt_skel, "precision": prec_skel, **rank_extra},
            meta={**meta, "step": step, "world_size": self.world_size},
        )
        if self.async_save and not blocking:
            self._thread = threading.Thread(target=self._run, args=(request,), name=f"mcore-ckpt-{step}", daemon=True)
            self._thread.start()
        else:
            self._run(request)
            self.wait()

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def _run(self, request: SaveRequest) -> None:
        final = step_dir(self.root, request.step)
        tmp = final.with_name(final.name + ".tmp")
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self._barrier()
            writer = dcp.FileSystemWriter(str(tmp), single_file_per_rank=True, thread_count=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # DCP's note that one process saves alone
                dcp.save(request.tensors, storage_writer=writer, process_group=self.group, no_dist=self.world_size == 1)
            (tmp / f"rank_{self.rank:05d}.json").write_text(json.dumps(request.rank_json))
            self._barrier()
            if self.rank == 0:
                meta_tmp = tmp / "meta.json.partial"
                meta_tmp.write_text(json.dumps(request.meta, indent=2, default=str))
                meta_tmp.rename(tmp / "meta.json")
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                self._prune()
            self._done.append((request.step, final))
        except BaseException as exc:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            self._error = exc

    def _prune(self) -> None:
        for old in list_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

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
            last = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was completed"
            lines = str(exc).strip().splitlines()  # DCP wraps each rank's traceback: keep the cause
            cause = lines[-1] if lines else type(exc).__name__
            raise CheckpointSaveError(
                f"saving a checkpoint under {self.root} failed ({cause}); {last}; "
                "free disk space or fix the path and resume with --train.resume=latest"
            ) from exc
        return self.last_good


# -- loading ------------------------------------------------------------------------------------
def read_meta(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {str(path)!r} does not exist; give a step_XXXXXXXX directory or 'latest'")
    try:
        return dict(json.loads((path / "meta.json").read_text()))
    except FileNotFoundError:
        raise UserError(f"{path} is not a complete checkpoint (no meta.json); use another one or 'latest'") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint {path}: meta.json is corrupt ({exc}); use another checkpoint") from None


def _read_rank_json(path: Path, rank: int) -> dict[str, Any]:
    f = path / f"rank_{rank:05d}.json"
    if not f.is_file():
        f = path / "rank_00000.json"  # loaded under more ranks than saved: take rank 0's skeletons
    try:
        return dict(json.loads(f.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint {path}: {f.name} is missing or corrupt ({exc}); use another checkpoint") from None


def _template(
    key: str, meta: TensorStorageMetadata, params: Mapping[str, torch.Tensor], device: torch.device
) -> torch.Tensor:
    """An empty tensor to load ``key`` into; laid out like a DTensor parameter if it mirrors one
    (the same local rows on this rank, so a ragged split is mirrored too)."""
    parts = key.split("/")
    for part in parts:
        p: Any = params.get(part)
        if p is not None and hasattr(p, "device_mesh") and tuple(p.shape) == tuple(meta.size):
            from torch.distributed.tensor import DTensor

            local = torch.empty(p.to_local().shape, dtype=meta.properties.dtype, device=p.to_local().device)
            return DTensor.from_local(
                local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
    return torch.empty(tuple(meta.size), dtype=meta.properties.dtype, device=device)


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: Any | None,
    precision: Any | None,
    rank: int = 0,
    group: Any = None,
    world_size: int = 1,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``path`` into the (already parallelized) model, optimizer and recipe; reshards DTensors.

    Returns ``(meta, rank_json)``. A checkpoint of another model (names or shapes differ) is a
    ``UserError`` naming the first mismatch.
    """
    path = Path(path)
    meta = read_meta(path)
    rank_json = _read_rank_json(path, rank)
    reader = SafeFileSystemReader(str(path))
    stored = reader.read_metadata().state_dict_metadata
    if any(isinstance(m, BytesStorageMetadata) for m in stored.values()):
        raise UserError(f"checkpoint {path} holds pickled objects, which mcore never loads; use an mcore checkpoint")
    model_sd = model.state_dict()
    saved_model = {k[len("model/") :]: m for k, m in stored.items() if k.startswith("model/")}
    where = f"checkpoint {path} (model {meta.get('model_name', '?')!r}) does not fit this model"
    for name, tensor in model_sd.items():
        if name not in saved_model:
            raise UserError(f"{where}: it has no parameter {name!r}; load a checkpoint of the same model config")
        m = saved_model[name]
        if isinstance(m, TensorStorageMetadata) and tuple(m.size) != tuple(tensor.shape):
            raise UserError(
                f"{where}: {name!r} has shape {tuple(m.size)} in the checkpoint but {tuple(tensor.shape)} in the model; "
                "use the model config the checkpoint was saved with"
            )
    extra = sorted(set(saved_model) - set(model_sd))
    if extra:
        raise UserError(f"{where}: it has parameters the model lacks ({', '.join(extra[:3])}); check model.* settings")

    templates: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in model_sd.items()}
    params = dict(model.named_parameters())
    device = next(iter(model_sd.values())).device if model_sd else torch.device("cpu")
    parts: dict[str, tuple[Any, dict[str, torch.Tensor]]] = {}
    for name, obj in (("optimizer", optimizer), ("precision", precision)):
        if obj is None:
            continue
        skeleton = rank_json[name]
        _, current = split_state(obj.state_dict(), name)
        wanted: dict[str, torch.Tensor] = {}
        for key in tensor_keys(skeleton):
            entry = stored.get(key)
            if not isinstance(entry, TensorStorageMetadata):
                raise UserError(f"checkpoint {path} lacks {name} tensor {key!r}; it is incomplete")
            cur = current.get(key)
            if cur is not None and tuple(cur.shape) == tuple(entry.size) and cur.dtype == entry.properties.dtype:
                wanted[key] = cur
            else:
                wanted[key] = _template(key, entry, params, device)
        templates.update(wanted)
        parts[name] = (skeleton, wanted)
    annotate_for_checkpoint(templates)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(templates, storage_reader=reader, process_group=group, no_dist=world_size == 1)
    model.load_state_dict(model_sd)
    if optimizer is not None:
        optimizer.load_state_dict(join_state(*parts["optimizer"]))
    if precision is not None:
        precision.load_state_dict(join_state(*parts["precision"]))
    return meta, rank_json


def load_model_weights(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Only the model's tensors (for generate/export), in one process."""
    meta, _ = load_checkpoint(path, model=model, optimizer=None, precision=None)
    return meta
