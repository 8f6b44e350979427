"""How close the decode step's GEMMs come to the weight-read roofline: cuBLAS (``F.linear``) against a Triton
skinny GEMM over a few tile shapes, at the linear shapes of bench-0.9b and llama3-8b, M = 1 and 32 rows (issue 20).

Why it exists: bench-0.9b's captured decode step took 1.35 ms at batch 1 on an H100 against a 0.54 ms weight-read
roofline; whether the gap is the GEMMs' bandwidth or the small kernels between them decides the next kernel work.
Each candidate runs as a CUDA graph of ``CALLS`` back-to-back calls over distinct weight copies (more bytes than
the L2 holds, as in a decode step where every weight is read once), so the time is the kernels' own, not their
launches'. GB/s = weight bytes / time, against a device copy's bandwidth measured in the same run. Correctness:
every Triton config against ``F.linear`` in fp32 accumulation (rel err < 1e-2 in bf16).

    python benchmarks/device/sweep_skinny_gemm.py            (on the GPU machine; ``run.sh skinny``)
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SHAPES = {  # (N, K) of each linear: out features, in features
    "0.9b qkv": (4096, 2048),
    "0.9b o": (2048, 2048),
    "0.9b gate_up": (11264, 2048),
    "0.9b down": (2048, 5632),
    "0.9b head": (32768, 2048),
    "8b qkv": (6144, 4096),
    "8b o": (4096, 4096),
    "8b gate_up": (28672, 4096),
    "8b down": (4096, 14336),
}
CONFIGS = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages)
    (16, 256, 4, 4),
    (16, 512, 4, 3),
    (32, 256, 4, 4),
    (32, 128, 4, 5),
    (64, 128, 4, 4),
    (64, 256, 8, 3),
    (128, 64, 4, 4),
]
L2_BYTES = 60 << 20  # more than an H100's or H200's L2 (50 MiB)
ROUNDS = 7


@triton.jit
def _skinny_kernel(X, W, Y, M, N, K, stride_xm, stride_wn, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):  # fmt: skip
    """``Y[m, n] = sum_k X[m, k] W[n, k]`` for all ``M <= BLOCK_M`` rows; program ``p`` takes ``BLOCK_N`` columns."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)  # fmt: skip
        w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)  # fmt: skip
        acc += tl.dot(x, tl.trans(w))  # (BLOCK_M, BLOCK_N)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))  # fmt: skip


def skinny(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, config: tuple[int, int, int, int]) -> torch.Tensor:
    """``x (M, K) @ w (N, K).T`` into ``out (M, N)``, M <= 32."""
    block_n, block_k, warps, stages = config
    m, k = x.shape
    n = w.shape[0]
    block_m = max(16, triton.next_power_of_2(m))
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def graph_ms(calls: list, device: torch.device) -> float:
    """Median ms of one call in a CUDA graph replaying every call of ``calls`` in turn (``ROUNDS`` replays)."""
    for fn in calls[:2]:
        fn()  # compile outside the capture
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    times = []
    for _ in range(ROUNDS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / len(calls))
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (graph_ms([lambda: dst.copy_(src)] * 4, device) * 1e6)


def main() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {triton.__version__}; "
          f"copy {copy_gbs:.0f} GB/s")  # fmt: skip
    for m in (1, 32):
        for name, (n, k) in SHAPES.items():
            nbytes = n * k * 2
            copies = max(2, -(-L2_BYTES // nbytes) + 1)
            weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            out = torch.empty(m, n, device=device, dtype=torch.bfloat16)
            ref = F.linear(x.float(), weights[0].float())
            ring = weights * -(-32 // copies)  # at least 32 calls a replay, each weight copy in turn
            rows = {"cublas": graph_ms([lambda w=w, x=x: F.linear(x, w) for w in ring], device)}
            for config in CONFIGS:
                got = skinny(x, weights[0], out, config).float()
                err = float((got - ref).norm() / ref.norm())
                if not err < 1e-2:  # NaN fails too
                    print(f"  {name} M={m} config {config}: rel err {err:.2e}: wrong, not timed")
                    continue
                rows[f"triton{config}"] = graph_ms(
                    [lambda w=w, c=config, x=x, out=out: skinny(x, w, out, c) for w in ring], device
                )
            best = min((v, key) for key, v in rows.items() if key != "cublas")
            cub = rows["cublas"]
            print(f"M={m:2d} {name:13s} {nbytes / 2**20:7.1f} MiB  cublas {cub * 1e3:7.1f} us "
                  f"{nbytes / (cub * 1e6):5.0f} GB/s ({100 * nbytes / (cub * 1e6) / copy_gbs:3.0f}%)  best triton "
                  f"{best[0] * 1e3:7.1f} us ({100 * nbytes / (best[0] * 1e6) / copy_gbs:3.0f}%) {best[1]}")  # fmt: skip
            del weights, ring
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
