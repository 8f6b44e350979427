"""mcore-precision: low-precision recipes (``fp16``, ``fp8-current``, ``fp8-delayed``, ``fp8-rowwise``,
``fp8-blockwise``, ``mxfp8``, ``nvfp4``) and the torch reference of their formats.

Importing this package imports no torch module (the plugin registry lists it cheaply);
the names below load on first use.
"""

from __future__ import annotations

from typing import Any

from mcore_precision.__about__ import __version__

_LAZY = {
    "FP16": "mcore_precision.fp16",
    "FP8Current": "mcore_precision.fp8",
    "FP8Delayed": "mcore_precision.fp8",
    "FP8Rowwise": "mcore_precision.fp8",
    "FP8Blockwise": "mcore_precision.fp8",
    "MXFP8": "mcore_precision.microscaling",
    "NVFP4": "mcore_precision.microscaling",
    "FP8Linear": "mcore_precision.fp8_linear",
    "E4M3": "mcore_precision.formats",
    "E5M2": "mcore_precision.formats",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mcore_precision' has no attribute {name!r}")
