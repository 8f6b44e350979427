"""The Triton absorbed MLA decode kernel against the torch decode path over latent pages, in Triton's CPU interpreter.

A latent (MLA) cache holds keys of ``hd = c + dr`` channels and no value pages (values: the keys' first ``c``
channels); the kernel splits the scores into the latent and rotary parts and reuses the latent tile as the values.
Cases: one key head (MLA) and two, groups of 4 / 16 / 20 query heads (one, and several 16-head tiles, a partial
one), rotary widths 0 / 8 / 16, lengths from 1 to past several split-K slices (256 keys each), tables padded with
-1, a sliding window whose freed blocks are -1 (their pages NaN), a -1 hole inside a table, FP8 (E4M3) latent pages
with per-head key scales a thousand-fold apart. ``||triton - torch|| / ||torch|| < 1e-5`` at fp32 and against a
float64 run of the torch path; fp16 queries and pages within 1e-2 of it. Then ``PagedAttention`` over a real latent
``PagedKVCache`` decodes through the kernel (as ``MCORE_INFERENCE_MLA_DECODE=triton`` makes it on CUDA) to the torch
path's output. In a child process under ``TRITON_INTERPRET=1``; skipped where triton is not installed.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest
import torch
from mcore_inference.attention import paged_decode_torch
from mcore_inference.kv_quant import calibrate, quantize

from mcore.protocols import PagedKV
from mcore_testing.interpreted import interpreted_lines

#: (name, key heads, group, lengths, window, key dim, value dim, FP8, a -1 hole at (sequence, block) or None)
CASES: list[tuple[str, int, int, list[int], int | None, int, int, bool, tuple[int, int] | None]] = [
    ("mla-one-token", 1, 16, [1], None, 40, 32, False, None),
    ("mla-ragged", 1, 20, [16, 17, 1, 33, 70], None, 40, 32, False, None),
    ("split-k", 1, 4, [700, 3, 257], None, 80, 64, False, None),
    ("two-heads-no-rope", 2, 4, [9, 40], None, 32, 32, False, None),
    ("window", 1, 16, [5, 90, 300], 37, 40, 32, False, None),
    ("hole", 1, 4, [40, 70], None, 40, 32, False, (1, 2)),
    ("fp8", 2, 16, [1, 50, 300], None, 40, 32, True, None),
    ("fp8-window", 1, 20, [20, 64], 11, 80, 64, True, None),
]
BLOCK = 16


class Case:
    """Queries ``(S, nkv * G, hd)`` and latent pages of sequences of ``lens`` tokens in shuffled blocks of 16."""

    def __init__(
        self,
        kv_heads: int,
        group: int,
        lens: list[int],
        window: int | None,
        hd: int,
        hdv: int,
        fp8: bool,
        hole: tuple[int, int] | None,
        seed: int,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        need = [-(-n // BLOCK) for n in lens]
        blocks = sum(need) + 3
        magnitude = torch.tensor([10.0 ** (2 * h - 1) if fp8 else 1.0 for h in range(kv_heads)])[:, None]
        keys = torch.randn(blocks * BLOCK, kv_heads, hd, generator=gen) * magnitude  # (P * bs, nkv, hd)
        self.key_scale: torch.Tensor | None = None
        if fp8:
            self.key_scale = torch.empty(kv_heads)
            calibrate(keys, self.key_scale)
            keys = quantize(keys, self.key_scale, torch.float8_e4m3fn)
        keys = keys.view(blocks, BLOCK, kv_heads, hd)
        order = (torch.randperm(blocks - 1, generator=gen) + 1).tolist()  # block 0: read (masked) for -1 by torch
        table = torch.full((len(lens), max(need) + 1), -1, dtype=torch.int32)
        for i, (n, length) in enumerate(zip(need, lens)):
            for j in range(n):
                block = order.pop()
                if window is not None and (j + 1) * BLOCK - 1 < length - window:  # freed: outside the window
                    keys.view(torch.uint8)[block] = 0x7F if fp8 else 0xFF  # NaN bytes: never to be read
                    continue
                table[i, j] = block
        if hole is not None:
            table[hole] = -1  # the reference masks a -1 entry's keys; the kernel must too
        self.paged = PagedKV(
            key_cache=keys, value_cache=None, block_table=table, seq_lens=torch.tensor(lens, dtype=torch.int32)
        )
        self.q = torch.randn(len(lens), kv_heads * group, hd, generator=gen) / hd**0.5
        self.window, self.hdv, self.scale = window, hdv, 0.7

    def run(self, kernel: Any, q: torch.Tensor, paged: PagedKV, scale_dtype: torch.dtype = torch.float32) -> Any:
        ks = None if self.key_scale is None else self.key_scale.to(scale_dtype)
        return kernel(q, paged, self.hdv, self.scale, self.window, key_scale=ks, value_scale=None)

    def pages_as(self, dtype: torch.dtype) -> PagedKV:
        """The pages in ``dtype`` (FP8 pages stay)."""
        if self.key_scale is not None:
            return self.paged
        p = self.paged
        return PagedKV(
            key_cache=p.key_cache.to(dtype), value_cache=None, block_table=p.block_table, seq_lens=p.seq_lens
        )


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def interpreted_main() -> None:
    """(Child process, ``TRITON_INTERPRET=1``.) One JSON line per case, then one for the backend check."""
    from mcore_inference.triton_mla_decode import paged_mla_decode_triton

    for seed, (name, kv_heads, group, lens, window, hd, hdv, fp8, hole) in enumerate(CASES):
        case = Case(kv_heads, group, lens, window, hd, hdv, fp8, hole, seed=seed)
        got = case.run(paged_mla_decode_triton, case.q, case.paged)
        want = case.run(paged_decode_torch, case.q, case.paged)
        want64 = case.run(paged_decode_torch, case.q.double(), case.pages_as(torch.float64), torch.float64)
        half = case.run(paged_mla_decode_triton, case.q.half(), case.pages_as(torch.float16))
        record = {
            "name": name,
            "dtype": str(got.dtype),
            "half_dtype": str(half.dtype),
            "shape_ok": got.shape == want.shape,
            "finite": bool(torch.isfinite(got).all()),
            "rel_torch": _rel(got, want),
            "rel_f64": _rel(got, want64),
            "rel_half_f64": _rel(half, want64),
        }
        print(json.dumps(record), flush=True)
    print(json.dumps(backend_check()), flush=True)


def backend_check() -> dict[str, Any]:
    """``PagedAttention()`` over a latent ``PagedKVCache`` (one key head of 40 = 32 + 8 channels, 16 query heads):
    prefill chunks, then two decode steps through the kernel (``latent_decode_kernel_for`` made to return it, as
    the opt-in does on CUDA), against ``PagedAttention(decode_kernel=paged_decode_torch)`` on the same cache."""
    import mcore_inference.attention as attention
    from mcore_inference.cache import PagedKVCache
    from mcore_inference.triton_mla_decode import paged_mla_decode_triton

    from mcore.protocols import AttentionCacheSpec, BlockContext

    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(args[0].shape[0])
        return paged_mla_decode_triton(*args, **kwargs)

    attention.latent_decode_kernel_for = lambda device: counted  # type: ignore[assignment,return-value]
    gen = torch.Generator().manual_seed(5)
    nh, hd, hdv = 16, 40, 32
    spec = AttentionCacheSpec(kv_heads=1, head_dim=hd, value_dim=None, dtype=torch.float32, window=None)
    cache = PagedKVCache({0: spec}, block_size=4, num_blocks=64)
    kernel_backend, torch_backend = (
        attention.PagedAttention(),
        attention.PagedAttention(decode_kernel=paged_decode_torch),
    )
    rels: list[float] = []
    for chunks in ({0: 6, 1: 1, 2: 9}, {0: 1, 1: 1, 2: 1}, {0: 1, 1: 1, 2: 1}):  # a prefill step, two decodes
        ids, counts = list(chunks), list(chunks.values())
        cache.schedule(ids, counts)
        k = torch.randn(sum(counts), 1, hd, generator=gen)
        cache.append(0, k, None)
        q = torch.randn(1, sum(counts), nh, hd, generator=gen)
        cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
        ctx = BlockContext(cu_seqlens=cu, kv_cache=cache, layer_index=0)
        v = k[None, :, :, :hdv]
        got = kernel_backend(q, k[None], v, ctx=ctx, scale=0.3, window=None)
        want = torch_backend(q, k[None], v, ctx=ctx, scale=0.3, window=None)
        rels.append(_rel(got, want))
    return {"name": "backend", "calls": calls, "rels": rels}


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@needs_triton
def test_triton_mla_decode_matches_the_torch_path_in_the_interpreter() -> None:
    records = interpreted_lines(__file__)
    assert [r["name"] for r in records] == [c[0] for c in CASES] + ["backend"], records
    for r in records[:-1]:
        assert r["dtype"] == "torch.float32" and r["half_dtype"] == "torch.float16", r
        assert r["shape_ok"] and r["finite"], r
        assert r["rel_torch"] < 1e-5 and r["rel_f64"] < 1e-5 and r["rel_half_f64"] < 1e-2, r  # NaN fails
    backend = records[-1]
    assert backend["calls"] == [3, 3], backend  # the two decode steps; the prefill step stays on torch
    assert len(backend["rels"]) == 3 and all(rel < 1e-5 for rel in backend["rels"]), backend
