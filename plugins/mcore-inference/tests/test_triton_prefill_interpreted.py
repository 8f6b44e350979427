"""The Triton paged prefill kernel against the torch reference (``paged_attention_torch``) in Triton's CPU interpreter.

Each case packs the new tokens of several sequences (ragged counts, one of them a single token) whose prefixes are
already cached (none, part of a block, several blocks) in shuffled blocks of 8; tables carry ``-1`` after the used
blocks and, with a sliding window, ``-1`` for the blocks no new query can see (as the cache frees them; their pages
hold NaN). Both paths compute the same fp32 numbers up to rounding order: ``||triton - torch|| / ||torch|| < 1e-5``,
and the same against a float64 run of the torch path. Cases: GQA groups 1, 2, 4 and 8 (several query tiles per
sequence), head dims that are not powers of two (and wide ones: fewer keys an iteration), windows of 1, 9 and 11,
and FP8 (E4M3) pages with per-head scales a thousand-fold apart. Each case also runs with fp16 queries and pages
(FP8 pages stay), within 1e-2 of the float64 run (the interpreter's bf16 ``tl.dot`` is wrong: bf16 is left to the
GPU tests). Then the engine, its prefill steps through the kernel, must give the reference's greedy tokens.

The cases run in a child process under ``TRITON_INTERPRET=1`` (read when triton decorates the kernels), so this
process never imports triton; skipped where triton is not installed (CI installs it: the noxfile's shared layer). The compiled kernel
is checked in ``test_triton_prefill.py`` (``gpu``).
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest
import torch
from mcore_inference.attention import paged_attention_torch
from mcore_inference.kv_quant import calibrate, quantize

from mcore.protocols import PagedKV
from mcore_testing.interpreted import interpreted_lines

#: (name, GQA group, cached prefixes, new-token counts, window, head dim, value dim, FP8 pages)
CASES: list[tuple[str, int, list[int], list[int], int | None, int, int, bool]] = [
    ("mha", 1, [0, 5, 40, 17], [7, 1, 20, 70], None, 16, 16, False),
    ("gqa4", 4, [0, 5, 40, 16], [33, 1, 20, 9], None, 32, 16, False),
    ("odd-dims", 4, [3, 0], [30, 2], None, 24, 20, False),
    ("gqa8", 8, [3, 16, 0], [5, 12, 1], None, 16, 16, False),
    ("wide-heads", 2, [0, 37], [40, 3], 9, 200, 136, False),  # 32 keys an iteration (fp32), 8 warps
    ("window", 4, [0, 5, 40, 60], [25, 1, 20, 9], 11, 16, 16, False),
    ("window-1", 1, [9, 30], [3, 18], 1, 16, 16, False),
    ("fp8-mha", 1, [0, 5, 40], [70, 1, 20], None, 16, 16, True),
    ("fp8-gqa4-window", 4, [0, 5, 40], [12, 1, 20], 11, 32, 32, True),
]
BLOCK = 8
KV_HEADS = 2


class Case:
    """One step's inputs: packed queries, the pages and tables, and FP8 scales (``None`` for fp32 pages)."""

    def __init__(
        self, group: int, prefixes: list[int], counts: list[int], window: int | None, hd: int, hdv: int, fp8: bool
    ) -> None:
        gen = torch.Generator().manual_seed(len(prefixes) * 100 + group * 10 + hd)
        lens = [p + c for p, c in zip(prefixes, counts)]
        need = [-(-n // BLOCK) for n in lens]
        blocks = sum(need) + 3
        magnitude = torch.tensor([10.0 ** (2 * h - 1) if fp8 else 1.0 for h in range(KV_HEADS)])[:, None]
        keys = torch.randn(blocks * BLOCK, KV_HEADS, hd, generator=gen) * magnitude  # (P * bs, nkv, hd)
        values = torch.randn(blocks * BLOCK, KV_HEADS, hdv, generator=gen) * magnitude
        self.key_scale = self.value_scale = None
        if fp8:
            self.key_scale, self.value_scale = torch.empty(KV_HEADS), torch.empty(KV_HEADS)
            calibrate(keys, self.key_scale)
            calibrate(values, self.value_scale)
            keys = quantize(keys, self.key_scale, torch.float8_e4m3fn)
            values = quantize(values, self.value_scale, torch.float8_e4m3fn)
        keys, values = keys.view(blocks, BLOCK, KV_HEADS, hd), values.view(blocks, BLOCK, KV_HEADS, hdv)
        order = (torch.randperm(blocks - 1, generator=gen) + 1).tolist()  # block 0: read (masked) for -1 by torch
        table = torch.full((len(lens), max(need) + 2), -1, dtype=torch.int32)  # -1 after the used blocks
        for i, (n, length, c) in enumerate(zip(need, lens, counts)):
            for j in range(n):
                block = order.pop()
                if window is not None and (j + 1) * BLOCK - 1 < length - c - window + 1:  # no new query sees it
                    keys.view(torch.uint8)[block] = 0x7F if fp8 else 0xFF  # NaN bytes: never to be read
                    values.view(torch.uint8)[block] = 0x7F if fp8 else 0xFF
                    continue
                table[i, j] = block
        self.paged = PagedKV(
            key_cache=keys, value_cache=values, block_table=table, seq_lens=torch.tensor(lens, dtype=torch.int32)
        )
        self.cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)  # (S+1,)
        self.max_seqlen = max(counts)
        self.q = torch.randn(int(self.cu[-1]), KV_HEADS * group, hd, generator=gen) / hd**0.5  # (N, nh, hd)
        self.window, self.hdv, self.scale = window, hdv, 0.7

    def run(self, kernel: object, q: torch.Tensor, paged: PagedKV, double_scales: bool = False) -> torch.Tensor:
        ks, vs = self.key_scale, self.value_scale
        if double_scales and ks is not None and vs is not None:
            ks, vs = ks.double(), vs.double()
        return kernel(  # type: ignore[operator]
            q, paged, self.cu, self.max_seqlen, self.hdv, self.scale, self.window, key_scale=ks, value_scale=vs
        )

    def as_double(self) -> PagedKV:
        """The pages in float64 (FP8 pages stay: the torch path dequantises them in the query's dtype)."""
        return self.as_dtype(torch.float64)

    def as_dtype(self, dtype: torch.dtype) -> PagedKV:
        """The pages in ``dtype`` (FP8 pages stay)."""
        if self.key_scale is not None:
            return self.paged
        assert self.paged.value_cache is not None
        return PagedKV(
            key_cache=self.paged.key_cache.to(dtype),
            value_cache=self.paged.value_cache.to(dtype),
            block_table=self.paged.block_table,
            seq_lens=self.paged.seq_lens,
        )


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def interpreted_main() -> None:
    """(Child process, ``TRITON_INTERPRET=1``.) Print one JSON line per case: its name and relative errors."""
    from mcore_inference.triton_prefill import paged_prefill_triton

    for name, group, prefixes, counts, window, hd, hdv, fp8 in CASES:
        case = Case(group, prefixes, counts, window, hd, hdv, fp8)
        got = case.run(paged_prefill_triton, case.q, case.paged)
        want = case.run(paged_attention_torch, case.q, case.paged)
        want64 = case.run(paged_attention_torch, case.q.double(), case.as_double(), double_scales=True)
        half = case.run(paged_prefill_triton, case.q.half(), case.as_dtype(torch.float16))  # (FP8 pages stay)
        record = {
            "name": name,
            "dtype": str(got.dtype),
            "shape": list(got.shape),
            "want_shape": list(want.shape),
            "finite": bool(torch.isfinite(got).all()),
            "rel_torch": _rel(got, want),
            "rel_f64": _rel(got, want64),
            "half_dtype": str(half.dtype),
            "rel_half_f64": _rel(half, want64),
        }
        print(json.dumps(record), flush=True)


def engine_main() -> None:
    """(Child process, ``TRITON_INTERPRET=1``.) The engine on the toy model with ``PagedAttention`` serving every
    prefill step through the kernel (as ``MCORE_INFERENCE_PREFILL=triton`` does on CUDA): ragged prompts arriving
    at different steps, chunked (so later chunks attend over a cached prefix), a window on every other layer, and a
    repeated prompt (a prefix-cache hit). Prints one JSON line: the kernel's calls and whether every greedy output
    equals the token-by-token reference."""
    import mcore_inference.attention as attention
    from mcore_inference.engine import LLMEngine
    from mcore_inference.sampling import SamplingParams
    from mcore_inference.triton_prefill import paged_prefill_triton
    from toy_model import ToyLM, greedy_reference

    calls: list[int] = []

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(int(args[3]))  # type: ignore[call-overload]  # max_seqlen
        return paged_prefill_triton(*args, **kwargs)  # type: ignore[arg-type]

    attention.prefill_kernel_for = lambda device: counted  # type: ignore[assignment,return-value]
    torch.manual_seed(0)
    model = ToyLM(window=6)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 50, (n,), generator=gen).tolist() for n in (5, 17, 2, 23)]
    prompts.append(prompts[1] + [7, 8, 9])  # shares the second prompt's full blocks
    arrive = [0, 0, 1, 2, 9]
    engine = LLMEngine(model, block_size=4, num_blocks=64, max_num_batched_tokens=10)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    ids: dict[int, int] = {}
    done: dict[int, list[int]] = {}
    step = 0
    while len(done) < len(prompts) and step < 200:
        for i, when in enumerate(arrive):
            if when == step:
                ids[engine.add_request(prompts[i], params)] = i
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = list(out.token_ids)
        step += 1
    same = [done.get(i) == greedy_reference(model, p, 4) for i, p in enumerate(prompts)]
    print(json.dumps({"calls": len(calls), "longest": max(calls, default=0), "same": same}), flush=True)


def _interpret(entry: str) -> list[dict[str, Any]]:
    """Run ``entry`` of this module in a child process under ``TRITON_INTERPRET=1``; its JSON lines."""
    return interpreted_lines(__file__, entry)


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@needs_triton
def test_triton_prefill_matches_the_torch_path_in_the_interpreter() -> None:
    records = _interpret("interpreted_main")
    assert [r["name"] for r in records] == [c[0] for c in CASES], records
    for r in records:
        assert r["dtype"] == "torch.float32" and r["finite"] and r["shape"] == r["want_shape"], r
        assert r["rel_torch"] < 1e-5 and r["rel_f64"] < 1e-5, r  # NaN fails both
        assert r["half_dtype"] == "torch.float16" and r["rel_half_f64"] < 1e-2, r  # fp16 queries (and pages)


@needs_triton
def test_the_engine_prefilling_through_the_kernel_gives_the_reference_tokens() -> None:
    (record,) = _interpret("engine_main")
    assert record["calls"] and record["longest"] > 1, record  # prefill steps took the kernel, chunks of several
    assert record["same"] == [True] * 5, record


def test_cases_cover_what_the_kernel_must_handle() -> None:
    """The case list keeps its coverage: prefixes 0 / partial / several blocks, one-token sequences, GQA 1 and 4,
    windows, FP8, and a table entry -1 that precedes used blocks (a freed block under a window)."""
    assert {1, 4} <= {g for _, g, *_ in CASES}
    prefixes = [p for c in CASES for p in c[2]]
    assert 0 in prefixes and any(0 < p < BLOCK for p in prefixes) and any(p >= 3 * BLOCK for p in prefixes)
    assert any(1 in c[3] for c in CASES) and any(c[4] is not None for c in CASES) and any(c[7] for c in CASES)
    case = Case(*next(c for c in CASES if c[0] == "window")[1:])
    table = case.paged.block_table
    assert bool((table[:, 0] == -1).any()) and bool((table[:, -1] == -1).all())  # freed head, -1 tail
