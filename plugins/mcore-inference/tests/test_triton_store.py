"""The compiled one-launch key/value store (``triton_store.py``) on a card: the pages equal the torch path's
``index_copy_`` bit for bit for every case of ``test_triton_store_interpreted.py`` (bf16 included), also when the
store is replayed from a CUDA graph, and a CUDA cache picks it (``kv_store_for``)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from mcore_inference.cache import _store, kv_store_for
from test_triton_store_interpreted import CASES, store_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_store_equals_index_copy_on_the_card(case: tuple) -> None:
    from mcore_inference.triton_store import store_kv_triton

    _, dtype, rows, heads, key_dim, value_dim, views = case
    key_pages, value_pages, slots, key, value = store_case(dtype, rows, heads, key_dim, value_dim, views, 1, "cuda")
    assert not views or not key.is_contiguous()  # strided views reach the kernel
    want_k, want_v = key_pages.clone(), value_pages.clone()
    _store(want_k, slots, key, None)
    _store(want_v, slots, value, None)
    store_kv_triton(key_pages, value_pages, slots, key, value)
    assert torch.equal(key_pages, want_k) and torch.equal(value_pages, want_v)


def test_triton_store_replays_from_a_cuda_graph_and_is_the_cuda_default() -> None:
    from mcore_inference.triton_store import store_kv_triton

    assert kv_store_for(torch.device("cuda")) is store_kv_triton
    assert kv_store_for(torch.device("cpu")) is None
    key_pages, value_pages, slots, key, value = store_case(torch.bfloat16, 9, 2, 32, 32, True, 2, "cuda")
    store_kv_triton(key_pages, value_pages, slots, key, value)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        store_kv_triton(key_pages, value_pages, slots, key, value)
    fresh = store_case(torch.bfloat16, 9, 2, 32, 32, True, 3, "cuda")
    key.copy_(fresh[3]), value.copy_(fresh[4])  # new rows, same buffers: the replay stores them
    want_k, want_v = key_pages.clone(), value_pages.clone()
    _store(want_k, slots, key, None)
    _store(want_v, slots, value, None)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(key_pages, want_k) and torch.equal(value_pages, want_v)
