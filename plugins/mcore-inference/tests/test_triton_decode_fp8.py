"""The Triton paged decode kernel over FP8 (E4M3) pages against the torch FP8 path, in Triton's CPU interpreter.

The kernel loads the pages' bytes, turns them into the query's dtype in registers and folds the per-head scales
into the score scale (keys) and the output (values); the torch path (``paged_decode_torch`` with
``key_scale``/``value_scale``) dequantises the gathered pages first. On the same FP8 pages both compute the same
fp32 numbers up to rounding order, so we check ``||triton - torch|| / ||torch|| < 1e-5`` (and against a float64
run of the torch path) over GQA groups 1/4/8, ragged lengths across block boundaries and split-K slices, tables
padded with -1, a sliding window whose freed blocks are -1 holes, a hole inside a table, per-head scales a
thousand-fold apart, and every finite E4M3 code; also the plain (fp32 pages) path of the kernel, and the FP8
path against it on the same pages dequantised. The cases run in a child process under ``TRITON_INTERPRET=1``
(the variable is read when triton decorates the kernels), so this process never imports triton. Skipped where
triton is not installed (CI installs it); the compiled kernel is checked in ``test_triton_decode.py``
(``gpu``).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from mcore_inference.attention import paged_decode_torch
from mcore_inference.kv_quant import calibrate, dequantize, quantize

from mcore.protocols import PagedKV
from mcore_testing.interpreted import interpreted_lines

#: (name, GQA group, lengths, window, head dim, value dim, a hole at (sequence, block) or None)
CASES: list[tuple[str, int, list[int], int | None, int, int, tuple[int, int] | None]] = [
    ("one-token", 1, [1], None, 16, 16, None),
    ("ragged-gqa4", 4, [16, 17, 15, 33, 1], None, 32, 16, None),
    ("split-k-gqa8", 8, [700, 3, 257], None, 16, 32, None),
    ("window", 4, [5, 90, 300], 37, 32, 32, None),
    ("window-1", 2, [20, 64], 1, 16, 16, None),
    ("hole", 4, [40, 70], None, 16, 16, (1, 2)),
]
BLOCK = 16
KV_HEADS = 2


def fp8_pages(
    lens: list[int], group: int, head_dim: int, value_dim: int, window: int | None, seed: int
) -> tuple[torch.Tensor, PagedKV, torch.Tensor, torch.Tensor]:
    """``(q (S, nh, hd) fp32, paged (E4M3 pages, shuffled blocks of 16), key_scale (nkv,), value_scale (nkv,))``.
    Head ``h``'s keys/values are ``randn * 10**(2h-1)`` (scales far apart), quantised with the cache's
    calibration; tables are padded with -1 to the widest plus one block, and with a window every block wholly
    outside it (as the cache frees them) is -1 and its page filled with NaN bytes (never to be read; block 0,
    which the torch path reads, masked, for every -1 entry, is in no table and stays finite)."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // BLOCK) for n in lens]
    blocks = sum(need) + 3
    magnitude = torch.tensor([10.0 ** (2 * h - 1) for h in range(KV_HEADS)])[:, None]  # (nkv, 1)
    raw_k = torch.randn(blocks * BLOCK, KV_HEADS, head_dim, generator=gen) * magnitude
    raw_v = torch.randn(blocks * BLOCK, KV_HEADS, value_dim, generator=gen) * magnitude
    key_scale, value_scale = torch.empty(KV_HEADS), torch.empty(KV_HEADS)
    calibrate(raw_k[: blocks * BLOCK // 2], key_scale)  # later rows up to 4x larger are kept; beyond clip
    calibrate(raw_v[: blocks * BLOCK // 2], value_scale)
    fp8 = torch.float8_e4m3fn
    keys = quantize(raw_k, key_scale, fp8).view(blocks, BLOCK, KV_HEADS, head_dim)
    values = quantize(raw_v, value_scale, fp8).view(blocks, BLOCK, KV_HEADS, value_dim)
    order = (torch.randperm(blocks - 1, generator=gen) + 1).tolist()  # block 0 stays finite: torch reads it for -1
    table = torch.full((len(lens), max(need) + 1), -1, dtype=torch.int32)
    for i, (n, length) in enumerate(zip(need, lens)):
        for j in range(n):
            block = order.pop()
            if window is not None and (j + 1) * BLOCK - 1 < length - window:  # freed: outside the window
                keys.view(torch.uint8)[block] = 0x7F  # E4M3 NaN
                values.view(torch.uint8)[block] = 0x7F
                continue
            table[i, j] = block
    q = torch.randn(len(lens), KV_HEADS * group, head_dim, generator=gen) / head_dim**0.5
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return q, PagedKV(key_cache=keys, value_cache=values, block_table=table, seq_lens=lens_t), key_scale, value_scale


def every_code_pages() -> tuple[torch.Tensor, PagedKV, torch.Tensor, torch.Tensor]:
    """The 254 finite E4M3 codes (and two zeros) as the values of 16 one-token sequences, 16 codes a token (the
    other head: in reverse order): a one-token sequence's output is its value times the value scale, exactly, so
    every code's decode is checked bit for bit (keys decode through the same conversion)."""
    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F]  # (254,) all but the two NaNs
    codes = torch.cat([codes, torch.zeros(2, dtype=torch.int32)]).to(torch.uint8).view(16, 16)  # (token, channel)
    pages = torch.zeros(16, BLOCK, KV_HEADS, 16, dtype=torch.uint8)  # block t holds token t at offset 0
    pages[:, 0, 0], pages[:, 0, 1] = codes, codes.flip(0, 1)
    pages = pages.view(torch.float8_e4m3fn)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(16, KV_HEADS * 2, 16, generator=gen)
    table = torch.arange(16, dtype=torch.int32)[:, None]  # (S, 1)
    lens = torch.ones(16, dtype=torch.int32)
    paged = PagedKV(key_cache=pages.clone(), value_cache=pages, block_table=table, seq_lens=lens)
    return q, paged, torch.tensor([1.0, 0.5]), torch.tensor([1.0, 3.0])


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _dequantized(paged: PagedKV, key_scale: torch.Tensor, value_scale: torch.Tensor) -> tuple[PagedKV, int]:
    """FP8 ``paged`` dequantised to fp32 pages (the plain path's input) and its value dim."""
    assert paged.value_cache is not None
    plain = PagedKV(
        key_cache=dequantize(paged.key_cache, key_scale, torch.float32),
        value_cache=dequantize(paged.value_cache, value_scale, torch.float32),
        block_table=paged.block_table,
        seq_lens=paged.seq_lens,
    )
    return plain, paged.value_cache.shape[-1]


def interpreted_main() -> None:
    """(Child process, ``TRITON_INTERPRET=1``.) Print one JSON line per case: its name and relative errors."""
    from mcore_inference.triton_decode import paged_decode_triton

    runs: list[tuple[str, tuple[torch.Tensor, PagedKV, torch.Tensor, torch.Tensor], int | None]] = [
        (name, fp8_pages(lens, group, hd, hdv, window, seed), window)
        for seed, (name, group, lens, window, hd, hdv, _) in enumerate(CASES)
    ]
    runs.append(("every-code", every_code_pages(), None))
    holes = {name: hole for name, *_, hole in CASES}
    for name, (q, paged, key_scale, value_scale), window in runs:
        hole = holes.get(name)
        if hole is not None:
            paged.block_table[hole] = -1  # the reference masks a -1 entry's keys; the kernel must too
        hdv = paged.value_cache.shape[-1]  # type: ignore[union-attr]
        scale = 0.7
        got = paged_decode_triton(q, paged, hdv, scale, window, key_scale=key_scale, value_scale=value_scale)
        want = paged_decode_torch(q, paged, hdv, scale, window, key_scale=key_scale, value_scale=value_scale)
        want64 = paged_decode_torch(
            q.double(), paged, hdv, scale, window, key_scale=key_scale.double(), value_scale=value_scale.double()
        )
        record = {
            "name": name,
            "dtype": str(got.dtype),
            "finite": bool(torch.isfinite(got).all()),
            "rel_torch": _rel(got, want),
            "rel_f64": _rel(got, want64),
            "exact": bool(torch.equal(got, want)),
        }
        print(json.dumps(record), flush=True)
    q, paged, key_scale, value_scale = runs[1][1]  # the same pages dequantised to fp32: the plain path
    plain, hdv = _dequantized(paged, key_scale, value_scale)
    got = paged_decode_triton(q, plain, hdv, 0.7, None)
    want = paged_decode_torch(q, plain, hdv, 0.7, None)
    fp8 = paged_decode_triton(q, paged, hdv, 0.7, None, key_scale=key_scale, value_scale=value_scale)
    record = {"name": "plain-fp32", "dtype": str(got.dtype), "finite": bool(torch.isfinite(got).all())}
    record |= {"rel_torch": _rel(got, want), "rel_f64": _rel(fp8, got), "exact": False}  # fp8 vs dequantised
    print(json.dumps(record), flush=True)
    # a static step's table: padded with -1 far past every length, so the splits (from the width) outnumber what
    # the short sequences fill; each sequence's keys are cut over all of them
    q, paged, key_scale, value_scale = runs[2][1]  # split-k-gqa8: 700, 3 and 257 keys, dequantised to fp32
    plain, hdv = _dequantized(paged, key_scale, value_scale)
    wide = torch.full((plain.block_table.shape[0], 256), -1, dtype=plain.block_table.dtype)  # 4096 keys: 16 splits
    wide[:, : plain.block_table.shape[1]] = plain.block_table
    padded = PagedKV(
        key_cache=plain.key_cache, value_cache=plain.value_cache, block_table=wide, seq_lens=plain.seq_lens
    )
    for name, window in (("padded-table", None), ("padded-table-window", 300)):
        got = paged_decode_triton(q, padded, hdv, 0.7, window)
        want = paged_decode_torch(q, plain, hdv, 0.7, window)
        want64 = paged_decode_torch(q.double(), plain, hdv, 0.7, window)
        record = {"name": name, "dtype": str(got.dtype), "finite": bool(torch.isfinite(got).all())}
        record |= {"rel_torch": _rel(got, want), "rel_f64": _rel(got, want64), "exact": False}
        print(json.dumps(record), flush=True)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_decode_reads_fp8_pages_like_the_torch_path() -> None:
    records = interpreted_lines(__file__)
    names = [c[0] for c in CASES] + ["every-code", "plain-fp32", "padded-table", "padded-table-window"]
    assert [r["name"] for r in records] == names, records
    for r in records:
        assert r["dtype"] == "torch.float32" and r["finite"], r
        assert r["rel_torch"] < 1e-5 and r["rel_f64"] < 1e-5, r  # NaN fails both
    every_code = next(r for r in records if r["name"] == "every-code")
    assert every_code["exact"], every_code  # every code decodes to torch's value, bit for bit
