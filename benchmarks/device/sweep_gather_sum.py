"""Sweep of gather-sum kernel shapes (MoE combine): which tiling reaches the copy bandwidth."""

import statistics

import torch
import triton
import triton.language as tl

from mcore_moe.permute_triton import gather_sum as current
from mcore_testing.bench import interleaved, rel_error


@triton.jit
def _gs_tile(ROWS, POS, W, OUT, H, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, K_PAD)
    pos = tl.load(POS + t * K + ks, mask=ks < K, other=-1)
    valid = pos >= 0
    w = tl.load(W + t * K + ks, mask=valid, other=0.0).to(tl.float32)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        cm = cols < H
        tile = tl.load(ROWS + pos[:, None] * H + cols[None, :], mask=valid[:, None] & cm[None, :], other=0.0).to(
            tl.float32
        )
        tl.store(OUT + t * H + cols, tl.sum(tile * w[:, None], axis=0).to(OUT.dtype.element_ty), mask=cm)


@triton.jit
def _gs_loopk(ROWS, POS, W, OUT, H, K: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    cm = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(K):
        p = tl.load(POS + t * K + k)
        wk = tl.load(W + t * K + k).to(tl.float32)
        row = tl.load(ROWS + p * H + cols, mask=cm & ((cols * 0 + p) >= 0), other=0.0).to(tl.float32)
        acc += wk * row
    tl.store(OUT + t * H + cols, acc.to(OUT.dtype.element_ty), mask=cm)


def tile(rows, pos, w, bh, warps):
    n, k = pos.shape
    h = rows.shape[1]
    out = rows.new_empty((n, h))
    _gs_tile[(n,)](rows, pos, w, out, h, K=k, K_PAD=max(2, triton.next_power_of_2(k)), BLOCK_H=bh, num_warps=warps)
    return out


def loopk(rows, pos, w, bh, warps):
    n, k = pos.shape
    h = rows.shape[1]
    out = rows.new_empty((n, h))
    _gs_loopk[(n, triton.cdiv(h, bh))](rows, pos, w, out, h, K=k, BLOCK_H=bh, num_warps=warps)
    return out


def sweep(n: int, k: int, h: int, dev: torch.device) -> None:
    """Every candidate on ``N x K`` slots of ``H`` columns, interleaved, against a copy's bandwidth."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    m = n * k
    rows = torch.randn(m, h, device=dev, dtype=torch.bfloat16)  # (M, H)
    pos = torch.randperm(m, device=dev).view(n, k)  # (N, K) a random permutation, as the dispatcher's
    w = torch.rand(n, k, device=dev)  # (N, K) fp32
    ref = (rows[pos].float() * w[..., None]).sum(1)  # (N, H)
    flat = pos.reshape(-1)
    steps = {
        "current": lambda: current(rows, pos, w),
        "copy": lambda: dst.copy_(src),
        "index_select": lambda: rows.index_select(0, flat),
        "torch_ref": lambda: (rows[pos].float() * w[..., None]).sum(1).to(rows.dtype),
        # a gather then a batched (1, K) x (K, H) product: 3 passes over the rows' bytes, but at copy speed?
        "gather_bmm": lambda: torch.bmm(w.to(rows.dtype)[:, None, :], rows.index_select(0, flat).view(n, k, h))[:, 0],
    }
    for bh, warps in [(256, 4), (512, 4), (1024, 4), (1024, 8), (2048, 8)]:
        steps[f"tile{bh}w{warps}"] = lambda bh=bh, warps=warps: tile(rows, pos, w, bh, warps)
    for bh, warps in [(256, 2), (512, 4), (1024, 4), (2048, 8)]:
        steps[f"loopk{bh}w{warps}"] = lambda bh=bh, warps=warps: loopk(rows, pos, w, bh, warps)
    res = interleaved(steps, repeats=10, iters=20, warmup=3, device=dev)
    nbytes = (m * h + n * h) * 2
    copy_gbs = 2 * src.numel() / (statistics.median(res["copy"]["times"]) * 1e6)
    print(f"N={n} K={k} H={h} (copy {copy_gbs:.0f} GB/s)")
    for name, r in res.items():
        if name == "copy":
            continue
        t = r["times"]
        med = statistics.median(t)
        moved = 2 * m * h * 2 if name == "index_select" else nbytes
        gbs = moved / (med * 1e6)
        err = "" if name == "index_select" else f"err {rel_error(r['output'].float(), ref):.1e}"
        spread = f"({min(t) * 1e3:.1f}-{max(t) * 1e3:.1f})"
        print(f"  {name:14s} {med * 1e3:8.1f} us {spread} {gbs:6.0f} GB/s {100 * gbs / copy_gbs:3.0f}% {err}")


if __name__ == "__main__":
    for shape in [(8192, 8, 2048), (4096, 8, 7168)]:
        sweep(*shape, torch.device("cuda"))
