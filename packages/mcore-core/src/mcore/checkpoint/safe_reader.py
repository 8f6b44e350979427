"""Read DCP checkpoints without running pickled code and without leaving their directory.

``torch.distributed.checkpoint`` stores its ``.metadata`` file with ``pickle``. This reader
unpickles it with an allow-list of exact ``(module, qualified name)`` pairs: DCP's metadata
dataclasses, ``torch.Size``, torch dtypes, the layout helper and ``pathlib``'s path classes,
the set found by listing the ``GLOBAL``/``STACK_GLOBAL`` opcodes of real checkpoints (plain
tensors, DTensors, ragged DTensors, optimizer state, bytes and scalars). Whole modules are
never allowed: ``torch.distributed.checkpoint.filesystem`` imports ``os``, and pickle
protocol 4 resolves dotted names, so ``(filesystem, "os.system")`` would otherwise pass. A
dotted name passes only when that exact pair is listed (none is).

The metadata then names a file for every tensor (``_StorageInfo.relative_path``); each must
be a plain name inside the checkpoint directory (``confine.inside``), and, where the
checkpoint has a manifest, one of the files it lists. Tensor data is read by DCP itself with
``weights_only`` loads, and mcore never stores pickled objects (non-tensor state is JSON).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)

from mcore.checkpoint.confine import inside
from mcore.errors import UserError

_DCP = "torch.distributed.checkpoint"

#: Every global a DCP ``.metadata`` file may name. Found with ``pickletools`` on checkpoints
#: saved by torch 2.13 (see tests/test_checkpoint_safety.py), plus DCP's other metadata
#: dataclasses by exact name (other torch versions pickle a few more of them).
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        (f"{_DCP}.metadata", "Metadata"),
        (f"{_DCP}.metadata", "StorageMeta"),
        (f"{_DCP}.metadata", "TensorStorageMetadata"),
        (f"{_DCP}.metadata", "BytesStorageMetadata"),
        (f"{_DCP}.metadata", "TensorProperties"),
        (f"{_DCP}.metadata", "ChunkStorageMetadata"),
        (f"{_DCP}.metadata", "MetadataIndex"),
        (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"),
        (f"{_DCP}.planner", "MetadataIndex"),  # its home in older torch
        (f"{_DCP}.filesystem", "_StorageInfo"),
        (f"{_DCP}.filesystem", "_StoragePrefix"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # torch.layout pickles as _get_layout("torch.strided")
        ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
        ("pathlib", "WindowsPath"),
        ("pathlib._local", "PosixPath"),  # Python >= 3.13
        ("pathlib._local", "WindowsPath"),
    }
    # torch.float32 and the other dtypes pickle by name: ("torch", "float32")
    | {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
)


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:  # exact pairs only: "os.system" via an allowed module fails here
            raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("checkpoint metadata holds a persistent reference, which is not allowed")


def unpickle_metadata(data: bytes) -> Any:
    """Unpickle DCP metadata bytes through the allow-list (raises ``pickle.UnpicklingError``)."""
    return _AllowListUnpickler(io.BytesIO(data)).load()


def _check_structure(metadata: Metadata, where: str) -> None:
    """The shapes DCP's reader relies on, so a crafted file fails here and not deep inside DCP."""
    sdm, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(sdm, dict) or not isinstance(storage, dict):
        raise UserError(
            f"checkpoint metadata {where} is malformed (no tensor or storage table); use another checkpoint"
        )
    for key, entry in sdm.items():
        if not isinstance(key, str) or not isinstance(entry, (TensorStorageMetadata, BytesStorageMetadata)):
            raise UserError(f"checkpoint metadata {where} is malformed (entry {key!r}); use another checkpoint")
    for index, info in storage.items():
        if (
            not isinstance(index, MetadataIndex)
            or not isinstance(info, _StorageInfo)
            or not isinstance(info.offset, int)
            or not isinstance(info.length, int)
            or info.offset < 0
            or info.length < 0
        ):
            raise UserError(
                f"checkpoint metadata {where} is malformed (storage entry {index!r}); use another checkpoint"
            )


class SafeFileSystemReader(FileSystemReader):
    """A ``FileSystemReader`` whose metadata is unpickled through an allow-list and whose files
    are confined to the checkpoint directory (and to ``allowed_files``, when given: the
    manifest's list)."""

    def __init__(self, path: str | Path, *, allowed_files: Collection[str] | None = None) -> None:
        super().__init__(path)
        self.allowed_files = None if allowed_files is None else frozenset(allowed_files)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        root = Path(self.path)
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        path = inside(root, name, what="metadata file")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UserError(
                f"checkpoint {root} has no DCP metadata file; it is incomplete or not a checkpoint"
            ) from None
        except OSError as exc:
            raise UserError(f"checkpoint metadata {path} cannot be read ({exc}); use another checkpoint") from None
        try:
            metadata = unpickle_metadata(data)
        except Exception as exc:
            raise UserError(
                f"checkpoint metadata {path} is corrupt or unsafe ({exc}); use another checkpoint"
            ) from None
        if not isinstance(metadata, Metadata):
            raise UserError(f"checkpoint metadata {path} is not DCP metadata; use another checkpoint")
        _check_structure(metadata, str(path))
        for info in metadata.storage_data.values():
            inside(root, info.relative_path, what="tensor file")
            if self.allowed_files is not None and info.relative_path not in self.allowed_files:
                raise UserError(
                    f"checkpoint {root}: its metadata names {info.relative_path!r}, which its manifest.json does not "
                    "list; use another checkpoint"
                )
        storage_meta = metadata.storage_meta if isinstance(metadata.storage_meta, StorageMeta) else StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata
