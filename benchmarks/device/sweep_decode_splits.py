"""The paged decode kernel's split and tile choices at decode shapes: how many keys a split covers at least
(``_MIN_SPLIT``), keys per inner step (``_BLOCK_N``) and warps, for short and long contexts (issue 20).

Why it exists: in bench-0.9b's captured decode step (batch 1, 384-key table, 8 KV heads) the attention kernel took
8.4 us a layer for 16 programs of 192 keys each: latency-bound, not bandwidth-bound. More, shorter splits put more
SMs on the keys but add the merge launch; this sweep measures which wins where, so the defaults come from numbers.
Each candidate runs as a CUDA graph of ``CALLS`` calls (launch cost excluded, as in the engine's captured step), in
rotated rounds; correctness: every candidate against the torch path in fp32 (rel err < 1e-2 in bf16).

    python benchmarks/device/sweep_decode_splits.py            (on the GPU machine; ``run.sh splits``)
    python benchmarks/device/sweep_decode_splits.py --baseline old_triton_decode.py   (an earlier kernel file too)
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
from mcore_inference import triton_decode
from mcore_inference.attention import paged_decode_torch

from mcore.protocols import PagedKV

SHAPES = [  # (name, batch, context (keys each), table width in keys, heads, kv heads)
    ("0.9b b1 ctx200 table384", 1, 200, 384, 16, 8),
    ("0.9b b1 ctx2000 table2048", 1, 2000, 2048, 16, 8),
    ("0.9b b32 ctx200 table384", 32, 200, 384, 16, 8),
    ("8b b1 ctx200 table384", 1, 200, 384, 32, 8),
    ("8b b1 ctx8000 table8192", 1, 8000, 8192, 32, 8),
    ("8b b32 ctx2000 table2048", 32, 2000, 2048, 32, 8),
]
CANDIDATES = [  # (min_split keys, block_n, num_warps)
    (64, 64, 4),  # the default (chosen by this sweep, H100, 2026-12-07)
    (256, 64, 4),
    (128, 64, 4),
    (64, 32, 4),
    (32, 32, 2),
    (128, 32, 4),
    (256, 128, 8),
]
CALLS = 20
ROUNDS = 7


def pages(batch: int, context: int, width: int, heads: int, kv_heads: int) -> tuple[torch.Tensor, PagedKV]:
    """bf16 queries ``(B, nh, 128)`` and pages of ``batch`` sequences of ``context`` keys in shuffled blocks of 16,
    each table ``width`` keys wide (a static step's padded table)."""
    gen = torch.Generator().manual_seed(0)
    block, dim = 16, 128
    per_seq = width // block
    blocks = batch * per_seq + 1
    keys = torch.randn(blocks, block, kv_heads, dim, generator=gen).to("cuda", torch.bfloat16)
    values = torch.randn(blocks, block, kv_heads, dim, generator=gen).to("cuda", torch.bfloat16)
    table = torch.randperm(blocks, generator=gen)[: batch * per_seq].view(batch, per_seq).to(torch.int32)
    q = torch.randn(batch, heads, dim, generator=gen).to("cuda", torch.bfloat16)
    lens = torch.full((batch,), context, dtype=torch.int32)
    return q, PagedKV(key_cache=keys, value_cache=values, block_table=table.cuda(), seq_lens=lens.cuda())


def configure(min_split: int, block_n: int, warps: int) -> None:
    triton_decode._MIN_SPLIT, triton_decode._BLOCK_N, triton_decode._NUM_WARPS = min_split, block_n, warps


def timed_graph(fn: object) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()  # type: ignore[operator]
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()  # type: ignore[operator]
    return graph


def baseline_kernel(path: str) -> Callable[..., Any]:
    """``paged_decode_triton`` of an earlier version of ``triton_decode.py`` at ``path`` (its defaults)."""
    spec = importlib.util.spec_from_file_location("baseline_triton_decode", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module.paged_decode_triton  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=None, help="an earlier triton_decode.py, timed as the first row")
    args = parser.parse_args()
    baseline = baseline_kernel(args.baseline) if args.baseline else None
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__}")
    print("| shape | min_split | block_n | warps | splits | us/call median | min | max | vs first row | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, batch, context, width, heads, kv_heads in SHAPES:
        q, paged = pages(batch, context, width, heads, kv_heads)
        scale = 128**-0.5
        assert paged.value_cache is not None
        as_float = PagedKV(
            key_cache=paged.key_cache.float(),
            value_cache=paged.value_cache.float(),
            block_table=paged.block_table,
            seq_lens=paged.seq_lens,
        )
        want = paged_decode_torch(q.float(), as_float, 128, scale, None)
        graphs: dict[Any, torch.cuda.CUDAGraph] = {}
        errors: dict[Any, float] = {}
        splits: dict[Any, int | str] = {}
        if baseline is not None:
            got = baseline(q, paged, 128, scale, None)
            errors["baseline"] = float((got.float() - want).norm() / want.norm())
            graphs["baseline"] = timed_graph(functools.partial(baseline, q, paged, 128, scale, None))
            splits["baseline"] = "-"
        for cand in CANDIDATES:
            configure(*cand)
            got = triton_decode.paged_decode_triton(q, paged, 128, scale, None)
            errors[cand] = float((got.float() - want).norm() / want.norm())
            graphs[cand] = timed_graph(functools.partial(triton_decode.paged_decode_triton, q, paged, 128, scale, None))
            splits[cand] = triton_decode.num_splits(batch * kv_heads, width, triton_decode._num_sms(q.device))
        order = list(graphs)
        times: dict[Any, list[float]] = {c: [] for c in order}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for r in range(ROUNDS):
            for cand in order[r % len(order) :] + order[: r % len(order)]:
                start.record()
                graphs[cand].replay()
                end.record()
                end.synchronize()
                times[cand].append(start.elapsed_time(end) * 1e3 / CALLS)
        base = statistics.median(times[order[0]])
        for cand in order:
            t = times[cand]
            med = statistics.median(t)
            knobs = "baseline | - | -" if cand == "baseline" else f"{cand[0]} | {cand[1]} | {cand[2]}"
            print(
                f"| {name} | {knobs} | {splits[cand]} | {med:.2f} | {min(t):.2f} | "
                f"{max(t):.2f} | {base / med:.2f}x | {errors[cand]:.1e} |"
            )
        configure(*CANDIDATES[0])


if __name__ == "__main__":
    main()
