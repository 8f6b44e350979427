"""Load a checkpoint into a (parallelized) model, optimizer and precision recipe.

Nothing is trusted: every file opened must lie inside the checkpoint directory
(``confine.py``), DCP's pickled metadata goes through an allow-list (``safe_reader.py``),
and every file is checked against the checksums of ``manifest.json`` before any tensor is
read, the ranks sharing the hashing (``manifest.verify``). What can go wrong with a
checkpoint (corrupt, truncated or missing files, malformed JSON, another model, another
optimizer) is a one-line ``UserError`` naming the file or the setting, the same on every
rank. DTensors are resharded to the current layout by DCP.

A checkpoint without a manifest is either interrupted (its ``meta.json`` says a manifest was
due: a save or a prune was cut short), which is refused, or from an older mcore (format
``mcore-checkpoint-1``), which loads with a ``LegacyCheckpointWarning`` that its files are
not verified.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from mcore.checkpoint.confine import inside
from mcore.checkpoint.manifest import MANIFEST, read_manifest, verify
from mcore.checkpoint.safe_reader import SafeFileSystemReader
from mcore.checkpoint.state import join_state, split_state, tensor_keys
from mcore.errors import UserError
from mcore.ragged import annotate_for_checkpoint


class LegacyCheckpointWarning(UserWarning):
    """A checkpoint of an older mcore: it has no manifest, so its files are not verified."""


def _cause(exc: BaseException) -> str:
    """The last line of an error (DCP wraps each rank's traceback in its own), with its type."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", text):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_json(path: Path, name: str) -> Any:
    f = inside(path, name)
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RecursionError) as exc:
        raise UserError(f"checkpoint {path}: {name} is corrupt ({_cause(exc)}); use another checkpoint") from None


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of checkpoint ``path``: step, resolved config, tokenizer, model name."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {str(path)!r} does not exist; give a step_XXXXXXXX directory or 'latest'")
    try:
        meta = _read_json(path, "meta.json")
    except FileNotFoundError:
        raise UserError(f"{path} is not a complete checkpoint (no meta.json); use another one or 'latest'") from None
    step = meta.get("step") if isinstance(meta, dict) else None
    config = meta.get("config") if isinstance(meta, dict) else None
    if (
        isinstance(step, bool)
        or not isinstance(step, int)
        or step < 0
        or not isinstance(config, dict)
        or not all(isinstance(section, dict) for key, section in config.items() if key != "schema_version")
    ):
        raise UserError(
            f"checkpoint {path}: meta.json is malformed (expected an object with an int 'step' >= 0 and a 'config' "
            "of tables); use another checkpoint"
        )
    if "tokenizer" in meta:
        stored_tokenizer(path, meta)
    return meta


def stored_tokenizer(path: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The tokenizer description of ``meta.json`` (``generate``/``export`` rebuild it), checked: an object
    whose ``vocab_size`` and ``eos_id``, where given, are ints with ``0 <= eos_id < vocab_size``."""
    info = meta.get("tokenizer")
    vocab: Any = info.get("vocab_size", 1) if isinstance(info, dict) else None
    eos: Any = info.get("eos_id", 0) if isinstance(info, dict) else None
    if (
        not isinstance(info, dict)
        or not isinstance(info.get("kind", ""), str)
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in (vocab, eos))
        or not 0 <= eos < vocab
    ):
        got = "missing" if info is None else f"{json.dumps(info, default=str)[:80]}"
        raise UserError(
            f"checkpoint {path}: meta.json 'tokenizer' is malformed ({got}; expected an object with a str 'kind', "
            "an int 'vocab_size' and an int 'eos_id' below it); use another checkpoint"
        )
    return info


def check_stored_schema(path: Path, config: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose stored run config has another layout than this mcore reads.

    Called where a stored run config is interpreted (resume, generate, export); the run loop
    stores ``RunConfig.to_dict()``, which always carries ``schema_version``."""
    from mcore.config.model import CONFIG_SCHEMA_VERSION

    version = config.get("schema_version")
    if version == CONFIG_SCHEMA_VERSION:
        return
    if version is None:
        raise UserError(
            f"checkpoint {path} was written before run config schema {CONFIG_SCHEMA_VERSION} (flat [model] keys, "
            "fused qkv and gate/up weights) and this mcore cannot read it; export it to Hugging Face with the mcore "
            "version that wrote it (mcore export), or start a fresh run (another train.out_dir)"
        )
    if isinstance(version, int) and not isinstance(version, bool) and version > CONFIG_SCHEMA_VERSION:
        raise UserError(
            f"checkpoint {path} has run config schema_version = {version}, newer than this mcore reads "
            f"({CONFIG_SCHEMA_VERSION}); upgrade mcore-core and the plugins"
        )
    raise UserError(
        f"checkpoint {path}: meta.json has schema_version = {version!r}; this mcore reads {CONFIG_SCHEMA_VERSION}"
    )


def _read_rank_json(path: Path, rank: int, meta: Mapping[str, Any]) -> dict[str, Any]:
    saved_world = meta.get("world_size")
    name = f"rank_{rank:05d}.json"
    if isinstance(saved_world, int) and rank >= saved_world:
        name = "rank_00000.json"  # loaded under more ranks than saved: take rank 0's skeletons
    try:
        data = _read_json(path, name)
    except FileNotFoundError:
        raise UserError(
            f"checkpoint {path}: {name} is missing; the checkpoint is incomplete, use another one"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"checkpoint {path}: {name} is malformed (not a JSON object); use another checkpoint")
    return data


def _union(a: Any, b: Any) -> Any:
    """``a`` with the keys of ``b`` it lacks, recursively (dicts only; anything else: ``a``'s)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {**b, **{k: _union(v, b[k]) if k in b else v for k, v in a.items()}}
    return a


def _prune(node: Any, drop: frozenset[str]) -> Any:
    """``node`` without dict entries keyed by a name in ``drop``, recursively."""
    if isinstance(node, dict):
        return {k: _prune(v, drop) for k, v in node.items() if k not in drop}
    return node


def _same_layout(meta: Mapping[str, Any], config: Mapping[str, Any] | None) -> bool:
    """Whether the checkpoint was saved with this run's layouts and sizes (unknown: assumed so)."""
    saved = (meta.get("config") or {}).get("parallel")
    now = (config or {}).get("parallel")
    if not isinstance(saved, Mapping) or not isinstance(now, Mapping):
        return True
    return all(saved.get(key) == now.get(key) for key in ("layouts", "sizes"))


def _skeletons(
    path: Path,
    rank_json: dict[str, Any],
    meta: Mapping[str, Any],
    world_size: int,
    others: frozenset[str],
    same_layout: bool = True,
) -> dict[str, Any]:
    """The state skeletons this rank loads: its own when the world size and layouts are the ones saved;
    else the union of every saved rank's (each pipeline stage kept its own parameters' state, keyed by
    name: ``pp2 x fsdp2`` resumed as ``fsdp4`` on the same 4 ranks needs the other stage's) without the
    entries of parameters this rank does not hold (``others``)."""
    saved_world = meta.get("world_size")
    if not isinstance(saved_world, int) or (saved_world == world_size and same_layout):
        return rank_json
    merged: dict[str, Any] = dict(rank_json)
    for other in range(saved_world if saved_world > 1 else 0):
        data = _read_json(path, f"rank_{other:05d}.json")
        if isinstance(data, dict):
            merged = _union(merged, data)
    return {k: _prune(v, others) if k in _SELECTOR else v for k, v in merged.items()}


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


_SELECTOR = {"optimizer": "name", "precision": "recipe"}


def _state_error(
    path: Path, part: str, obj: Any, exc: BaseException, meta: Mapping[str, Any], config: Mapping[str, Any] | None
) -> UserError:
    """A one-line error for optimizer/recipe state that does not load, naming saved vs loading."""
    key = _SELECTOR[part]
    saved_section = meta["config"].get(part)
    saved = saved_section.get(key) if isinstance(saved_section, dict) else None
    section = config.get(part) if config is not None else None
    loading = section.get(key) if isinstance(section, dict) else None
    if saved is not None and loading is not None and saved != loading:
        return UserError(
            f"checkpoint {path} holds the state of {part} {saved!r}, this run's {part} is {loading!r}, and it does "
            f"not load ({_cause(exc)}); resume with --{part}.{key}={saved}, or start a fresh run (another "
            "train.out_dir)"
        )
    recipe = _recipe_change(meta, config)
    if recipe is not None:  # e.g. bf16's master weights in the optimizer state that fp32 never saved
        return UserError(
            f"checkpoint {path} does not load into this run, which changes precision.recipe: {recipe[0]} -> "
            f"{recipe[1]} (its {part} state fails: {_cause(exc)}); resume with --precision.recipe={recipe[0]}, or "
            "start a fresh run (another train.out_dir)"
        )
    this = repr(loading) if loading is not None else f"({type(obj).__name__})"
    return UserError(
        f"checkpoint {path}: its {part} state ({part} {saved!r}) does not load into this run's {part} {this} "
        f"({_cause(exc)}); resume with the {part} and precision.recipe settings it was saved with (another "
        "precision.recipe is a likely cause), or start a fresh run (another train.out_dir)"
    )


def _recipe_change(meta: Mapping[str, Any], config: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """``(saved, loading)`` precision recipes when the checkpoint's meta records one and this run's differs."""
    saved_section = meta["config"].get("precision")
    section = config.get("precision") if config is not None else None
    saved = saved_section.get("recipe") if isinstance(saved_section, dict) else None
    loading = section.get("recipe") if isinstance(section, dict) else None
    if saved is None or loading is None or saved == loading:
        return None
    return str(saved), str(loading)


def _check_files(
    path: Path, *, rank: int, world_size: int, group: Any, verify_checksums: bool
) -> tuple[dict[str, Any], frozenset[str] | None]:
    """``(meta, files)`` after checking the checkpoint's files against its manifest (``files``:
    the names it lists; ``None`` for a legacy checkpoint)."""
    if not path.is_dir():
        raise UserError(f"checkpoint {str(path)!r} does not exist; give a step_XXXXXXXX directory or 'latest'")
    manifest = read_manifest(path)
    if manifest is None:
        meta = read_meta(path)
        if meta.get("manifest"):
            raise UserError(
                f"checkpoint {path} is incomplete: its {MANIFEST} is missing (a save or a removal was interrupted); "
                "use another checkpoint or 'latest'"
            )
        warnings.warn(
            f"checkpoint {path} has no {MANIFEST} (saved by an older mcore): its files have no checksums and are "
            "not verified",
            LegacyCheckpointWarning,
            stacklevel=3,
        )
        return meta, None
    unlisted = sorted({"meta.json", ".metadata"} - set(manifest.files))
    if unlisted:
        raise UserError(f"checkpoint {path}: its {MANIFEST} does not list {unlisted[0]}; use another checkpoint")
    if verify_checksums:
        verify(path, manifest, rank=rank, world_size=world_size, group=group)
    return read_meta(path), frozenset(manifest.files)


def _check_fits(
    path: Path, meta: Mapping[str, Any], model_sd: Mapping[str, torch.Tensor], stored: Mapping[str, Any]
) -> dict[str, Any]:
    """The checkpoint's model entries (``model/`` stripped), after checking that each of ``model_sd``'s tensors is
    there with its shape: a one-line ``UserError`` naming the first that is not."""
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
    return saved_model


def check_model_fits(path: Path, model: torch.nn.Module) -> None:
    """``load_checkpoint``'s name and shape check alone, for ``model`` on the meta device: a checkpoint whose
    ``meta.json`` claims sizes its tensors do not have (an edited file) is refused before the model is allocated.
    Checksums are left to the load that follows."""
    path = Path(path)
    meta, files = _check_files(path, rank=0, world_size=1, group=None, verify_checksums=False)
    stored = SafeFileSystemReader(str(path), allowed_files=files).read_metadata().state_dict_metadata
    _check_fits(path, meta, model.state_dict(), stored)


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: Any | None,
    precision: Any | None,
    rank: int = 0,
    group: Any = None,
    world_size: int = 1,
    verify_checksums: bool = True,
    config: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``path`` into the (already parallelized) model, optimizer and recipe; reshards DTensors.

    Returns ``(meta, rank_json)``. With ``world_size > 1`` every rank of ``group`` calls it
    (the checksum verification is split over them). ``config`` is this run's resolved config
    as a dict (``RunConfig.to_dict()``); it only serves to name the optimizer or recipe that
    differs when their state does not load. Every failure is a one-line ``UserError``: a
    checkpoint of another model (names or shapes differ) names the first mismatch.
    """
    path = Path(path)
    meta, files = _check_files(path, rank=rank, world_size=world_size, group=group, verify_checksums=verify_checksums)
    rank_json = _read_rank_json(path, rank, meta)
    reader = SafeFileSystemReader(str(path), allowed_files=files)
    stored = reader.read_metadata().state_dict_metadata
    if any(isinstance(m, BytesStorageMetadata) for m in stored.values()):
        raise UserError(f"checkpoint {path} holds pickled objects, which mcore never loads; use an mcore checkpoint")
    model_sd = model.state_dict()
    saved_model = _check_fits(path, meta, model_sd, stored)
    where = f"checkpoint {path} (model {meta.get('model_name', '?')!r}) does not fit this model"
    held = set(model_sd)
    if world_size > 1 and group is not None:  # pipeline stages hold different parameters: the union is the model
        every: list[Any] = [None] * world_size
        dist.all_gather_object(every, sorted(model_sd), group=group)
        held = held.union(*every)
    extra = sorted(set(saved_model) - held)
    if extra:
        raise UserError(f"{where}: it has parameters the model lacks ({', '.join(extra[:3])}); check model.* settings")

    templates: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in model_sd.items()}
    params = dict(model.named_parameters())
    skeletons = _skeletons(
        path, rank_json, meta, world_size, frozenset(saved_model) - frozenset(model_sd), _same_layout(meta, config)
    )
    device = next(iter(model_sd.values())).device if model_sd else torch.device("cpu")
    parts: dict[str, tuple[Any, dict[str, torch.Tensor]]] = {}
    for part, obj in (("optimizer", optimizer), ("precision", precision)):
        if obj is None:
            continue
        try:
            skeleton = skeletons[part]
            _, current = split_state(obj.state_dict(), part)
            keys = tensor_keys(skeleton)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _state_error(path, part, obj, exc, meta, config) from None
        wanted: dict[str, torch.Tensor] = {}
        for key in keys:
            entry = stored.get(key)
            if not isinstance(entry, TensorStorageMetadata):
                raise UserError(f"checkpoint {path} lacks {part} tensor {key!r}; it is incomplete")
            cur = current.get(key)
            if cur is not None and tuple(cur.shape) == tuple(entry.size) and cur.dtype == entry.properties.dtype:
                wanted[key] = cur
            else:
                wanted[key] = _template(key, entry, params, device)
        templates.update(wanted)
        parts[part] = (skeleton, wanted)
    annotate_for_checkpoint(templates)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(templates, storage_reader=reader, process_group=group, no_dist=world_size == 1)
    except UserError:
        raise
    except (Exception, CheckpointException) as exc:  # DCP's (a BaseException) and whatever torch.load raised
        raise UserError(
            f"checkpoint {path} could not be read ({_cause(exc)}); it is corrupt or incomplete, use another checkpoint"
        ) from None
    model.load_state_dict(model_sd)
    for part, obj in (("optimizer", optimizer), ("precision", precision)):
        if obj is None:
            continue
        try:
            obj.load_state_dict(join_state(*parts[part]))
        except Exception as exc:  # the object's own checks: missing keys, shapes, types
            raise _state_error(path, part, obj, exc, meta, config) from None
    return meta, rank_json


def load_model_weights(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Only the model's tensors (for generate/export), in one process."""
    meta, _ = load_checkpoint(path, model=model, optimizer=None, precision=None)
    return meta
