"""Static protocol conformance of mcore-inference's cache, attention backend and engine (mypy in ``nox -s lint``)."""

from mcore_inference.attention import PagedAttention
from mcore_inference.cache import PagedKVCache
from mcore_inference.generation import PagedEngine

from mcore.protocols import AttentionBackend, GenerationEngine, KVCacheHandle


def cache(c: PagedKVCache) -> KVCacheHandle:
    return c


def backend(b: PagedAttention) -> AttentionBackend:
    return b


def engine(e: PagedEngine) -> GenerationEngine:
    return e
