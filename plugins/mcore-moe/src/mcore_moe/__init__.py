"""mcore-moe: mixture-of-experts routers, token dispatchers and the ``moe`` block.

Importing this package imports no torch module (the plugin registry lists it cheaply);
the names below load on first use.
"""

from __future__ import annotations

from typing import Any

from mcore_moe.__about__ import __version__

_LAZY = {
    "TopKRouter": "mcore_moe.router",
    "HashRouter": "mcore_moe.hash_router",
    "AllGatherDispatcher": "mcore_moe.dispatcher",
    "AllToAllDispatcher": "mcore_moe.dispatcher",
    "MoE": "mcore_moe.block",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mcore_moe' has no attribute {name!r}")
