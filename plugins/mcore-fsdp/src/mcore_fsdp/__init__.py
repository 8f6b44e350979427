"""mcore-fsdp: an FSDP2-compatible ``fully_shard`` and the ``fsdp``/``hsdp`` layouts.

Importing this package imports no torch module (the plugin registry lists it cheaply);
the names below load on first use.
"""

from __future__ import annotations

from typing import Any

from mcore_fsdp.__about__ import __version__

_LAZY = {
    "fully_shard": "mcore_fsdp.api",
    "FSDPModule": "mcore_fsdp.api",
    "UnshardHandle": "mcore_fsdp.api",
    "MixedPrecisionPolicy": "mcore_fsdp.policy",
    "OffloadPolicy": "mcore_fsdp.policy",
    "CPUOffloadPolicy": "mcore_fsdp.policy",
    "FSDPLayout": "mcore_fsdp.layout",
    "HSDPLayout": "mcore_fsdp.layout",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mcore_fsdp' has no attribute {name!r}")
