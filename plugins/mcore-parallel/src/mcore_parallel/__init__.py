"""mcore-parallel: replicated, tensor-, context- and pipeline-parallel layouts (``ddp``, ``tp``, ``cp``, ``pp``).

Importing this package imports no torch module (the plugin registry lists it cheaply);
the names below load on first use.
"""

from __future__ import annotations

from typing import Any

from mcore_parallel.__about__ import __version__

_LAZY = {
    "DDPLayout": "mcore_parallel.ddp",
    "TPLayout": "mcore_parallel.tp",
    "CPLayout": "mcore_parallel.cp",
    "PPLayout": "mcore_parallel.pp",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mcore_parallel' has no attribute {name!r}")
