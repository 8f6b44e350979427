"""Read DCP checkpoints without running pickled code.

``torch.distributed.checkpoint`` stores its ``.metadata`` file with ``pickle``. This reader
unpickles it with an allow-list (DCP's metadata dataclasses, ``torch.Size``, dtypes and a
few builtins), so a crafted checkpoint cannot execute code; tensor data is read with
``weights_only`` loads by DCP itself, and mcore never stores pickled objects (non-tensor
state goes to JSON files).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from mcore.errors import UserError

_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {
    ("torch", "Size"),
    ("torch", "device"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("torch.distributed.checkpoint.planner", "MetadataIndex"),
    ("torch.serialization", "_get_layout"),
}


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    """A ``FileSystemReader`` whose metadata is unpickled through an allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        try:
            with self.fs.create_stream(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise UserError(
                f"checkpoint {self.path} has no DCP metadata file; it is incomplete or not a checkpoint"
            ) from None
        try:
            metadata = _AllowListUnpickler(io.BytesIO(data)).load()
        except Exception as exc:
            raise UserError(
                f"checkpoint metadata {path} is corrupt or unsafe ({exc}); use another checkpoint"
            ) from None
        if not isinstance(metadata, Metadata):
            raise UserError(f"checkpoint metadata {path} is not DCP metadata; use another checkpoint")
        storage_meta = metadata.storage_meta or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata
