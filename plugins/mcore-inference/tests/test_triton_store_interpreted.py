"""The one-launch Triton store of keys and values (``triton_store.py``) against the torch path's two ``index_copy_``
in Triton's CPU interpreter, and the engine storing through it.

Each case stores ``N`` rows at shuffled flat slots (a scratch slot written twice, as a static step's padding rows
do) into pages already holding other values; the pages after the Triton store must equal the torch path's bit for
bit (a copy, no arithmetic): fp32, fp16 and bf16; head counts and dims that are not powers of two; keys and values
as strided views of one projection (as a fused QKV split hands them); no rows at all. Then an engine whose cache
stores through the kernel (eager steps and static steps) must give the full-sequence reference's greedy tokens.

The cases run in a child process under ``TRITON_INTERPRET=1`` (read when triton decorates the kernels); skipped
where triton is not installed (CI installs it). The compiled kernel is checked in ``test_triton_store.py``
(``gpu``).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from mcore_testing.interpreted import interpreted_records

#: (name, dtype, rows, kv heads, key dim, value dim, strided views)
CASES: list[tuple[str, torch.dtype, int, int, int, int, bool]] = [
    ("fp32", torch.float32, 7, 2, 16, 16, False),
    ("fp16-odd", torch.float16, 5, 3, 24, 20, False),
    ("bf16-views", torch.bfloat16, 9, 2, 32, 32, True),
    ("fp32-views-odd", torch.float32, 4, 1, 40, 8, True),
    ("no-rows", torch.float32, 0, 2, 16, 16, False),
]
BLOCK, PAGES = 4, 6


def store_case(
    dtype: torch.dtype,
    rows: int,
    heads: int,
    key_dim: int,
    value_dim: int,
    views: bool,
    seed: int,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pages ``(P, bs, nkv, d)`` of random values, ``rows`` new keys and values and their slots on ``device``:
    distinct slots but the last two rows share one (the scratch slot of padding rows: the same bytes twice)."""
    gen = torch.Generator().manual_seed(seed)
    key_pages = torch.randn(PAGES, BLOCK, heads, key_dim, generator=gen).to(device, dtype)
    value_pages = torch.randn(PAGES, BLOCK, heads, value_dim, generator=gen).to(device, dtype)
    if views:  # one projection (N, nkv * (hd + hdv + 5)): key and value strided views of its row
        width = heads * (key_dim + value_dim + 5)
        joint = torch.randn(rows, width, generator=gen).to(device, dtype)
        key = joint[:, : heads * key_dim].view(rows, heads, key_dim)
        value = joint[:, heads * key_dim : heads * (key_dim + value_dim)].view(rows, heads, value_dim)
    else:
        key = torch.randn(rows, heads, key_dim, generator=gen).to(device, dtype)
        value = torch.randn(rows, heads, value_dim, generator=gen).to(device, dtype)
    slots = torch.randperm(PAGES * BLOCK, generator=gen)[:rows].to(device)
    if rows >= 2:
        slots[-1] = slots[-2]
        value[-1], key[-1] = value[-2], key[-2]  # padding rows: the same row into the scratch slot
    return key_pages, value_pages, slots, key, value


def interpreted_main() -> None:
    """(Child process, ``TRITON_INTERPRET=1``.) One JSON line per case, then the engine's line."""
    from mcore_inference.cache import _store
    from mcore_inference.triton_store import store_kv_triton

    for seed, (name, dtype, rows, heads, key_dim, value_dim, views) in enumerate(CASES):
        key_pages, value_pages, slots, key, value = store_case(dtype, rows, heads, key_dim, value_dim, views, seed)
        before, want_k, want_v = key_pages.clone(), key_pages.clone(), value_pages.clone()
        _store(want_k, slots, key, None)
        _store(want_v, slots, value, None)
        store_kv_triton(key_pages, value_pages, slots, key, value)
        record = {"name": name, "keys": torch.equal(key_pages, want_k), "values": torch.equal(value_pages, want_v)}
        record["changed"] = rows == 0 or not torch.equal(key_pages, before)  # the rows landed somewhere
        print(json.dumps(record), flush=True)
    engine_main()


def engine_main() -> None:
    """The engine with every cache's keys and values stored by the kernel: greedy tokens of ragged prompts
    arriving at different steps, eager and static decode, against the full-sequence reference."""
    from mcore_inference import cache as cache_module
    from mcore_inference.engine import LLMEngine
    from mcore_inference.sampling import SamplingParams
    from mcore_inference.triton_store import store_kv_triton
    from toy_model import ToyLM, greedy_reference

    calls: list[int] = []

    def counted(*args: torch.Tensor) -> None:
        calls.append(int(args[2].numel()))
        store_kv_triton(*args)

    cache_module.kv_store_for = lambda device: counted  # type: ignore[assignment,return-value]
    torch.manual_seed(0)
    model = ToyLM()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 50, (n,), generator=gen).tolist() for n in (5, 17, 2, 9)]
    same: dict[str, list[bool]] = {}
    for static in (False, True):
        engine = LLMEngine(
            model, block_size=4, num_blocks=64, max_num_batched_tokens=12, static_decode=static, max_num_seqs=4
        )
        params = SamplingParams(max_tokens=5, temperature=0.0)
        ids: dict[int, int] = {}
        done: dict[int, list[int]] = {}
        for step in range(200):
            if step < len(prompts):
                ids[engine.add_request(prompts[step], params)] = step
            for out in engine.step():
                if out.finished:
                    done[ids[out.request_id]] = list(out.token_ids)
            if len(done) == len(prompts):
                break
        same["static" if static else "eager"] = [
            done.get(i) == greedy_reference(model, p, 5) for i, p in enumerate(prompts)
        ]
    print(json.dumps({"name": "engine", "calls": len(calls), "same": same}), flush=True)


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@needs_triton
def test_triton_store_matches_index_copy_and_serves_the_engine_in_the_interpreter() -> None:
    records = interpreted_records(__file__)
    assert list(records) == [c[0] for c in CASES] + ["engine"], records
    for name, *_ in CASES:
        r = records[name]
        assert r["keys"] and r["values"] and r["changed"], r
    engine = records["engine"]
    assert engine["calls"] > 0, engine  # the cache stored through the kernel
    assert engine["same"] == {"eager": [True] * 4, "static": [True] * 4}, engine
