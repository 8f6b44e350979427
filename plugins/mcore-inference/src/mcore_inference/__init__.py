"""mcore-inference: the inference engine (paged KV cache, continuous batching, prefix caching, sampling).

Importing this package imports no torch module (the plugin registry lists it cheaply);
the names below load on first use.
"""

from __future__ import annotations

from typing import Any

from mcore_inference.__about__ import __version__

_LAZY: dict[str, str] = {
    "LLM": "mcore_inference.llm",
    "CompletionOutput": "mcore_inference.llm",
    "LLMEngine": "mcore_inference.engine",
    "LockstepEngine": "mcore_inference.lockstep",
    "RequestOutput": "mcore_inference.engine",
    "SamplingParams": "mcore_inference.sampling",
    "Sampler": "mcore_inference.sampling",
    "SamplingState": "mcore_inference.sampling",
    "SampleOutput": "mcore_inference.sampling",
    "IncrementalDetokenizer": "mcore_inference.detokenize",
    "PagedEngine": "mcore_inference.generation",
    "PagedKVCache": "mcore_inference.cache",
    "PagedAttention": "mcore_inference.attention",
    "Scheduler": "mcore_inference.scheduler",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mcore_inference' has no attribute {name!r}")
