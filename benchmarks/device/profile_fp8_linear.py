"""Where the FP8 linear's fwd+bwd goes (bench_fp8's shapes): host time against device time, each kernel's time,
the host's hottest Python functions, and the per-tensor cast with and without its transposed copy.

    python3 benchmarks/device/profile_fp8_linear.py [N K F ...]      (GPU; default 8192 2048 2048)
"""

import cProfile
import pstats
import sys
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from mcore_precision import kernels
from mcore_precision.formats import E4M3, E5M2
from mcore_precision.fp8 import CurrentScaler
from mcore_precision.fp8_linear import FP8Linear

dims = [int(a) for a in sys.argv[1:]] or [8192, 2048, 2048]
dev = torch.device("cuda")


def step_of(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def run() -> None:
        module.weight.grad = None
        xi = x.detach().requires_grad_()
        module(xi).backward(grad)

    return run


def timed(fn, iters: int = 50) -> tuple[float, float]:
    """(host ms per call while issuing, wall ms per call to the last kernel's end)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3 / iters, (t2 - t0) * 1e3 / iters


for i in range(0, len(dims), 3):
    n, k, f = dims[i : i + 3]
    print(f"==== N {n} K {k} F {f}")
    lin = nn.Linear(k, f, bias=False, device=dev, dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(
        lin, input=CurrentScaler(E4M3, 0), weight=CurrentScaler(E4M3, 0), grad=CurrentScaler(E5M2, 0)
    )
    x = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    g = torch.randn(n, f, device=dev, dtype=torch.bfloat16) * 0.01
    steps = {"bf16": step_of(lin, x, g), "fp8": step_of(fp8, x, g)}
    for name, fn in steps.items():
        for _ in range(5):
            fn()
        host, wall = timed(fn)
        print(f"{name}: host {host:.3f} ms/call, wall {wall:.3f} ms/call")
    graph = torch.cuda.CUDAGraph()  # the device time alone: the fp8 step replayed from a graph
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        steps["fp8"]()
    torch.cuda.current_stream().wait_stream(s)
    try:
        with torch.cuda.graph(graph):
            steps["fp8"]()
        host, wall = timed(graph.replay)
        print(f"fp8 as one CUDA graph: wall {wall:.3f} ms/call")
    except Exception as exc:  # a probe: say why and go on
        print("fp8 graph capture failed:", repr(exc)[:300])
    for transpose in (False, True):
        for t, fmt in ((x, E4M3), (g, E5M2)):
            fn = lambda t=t, fmt=fmt, tr=transpose: kernels.quantize_tensorwise(t, fmt, 0, None, tr)  # noqa: E731
            for _ in range(3):
                fn()
            _, wall = timed(fn, 100)
            gbytes = t.numel() * (t.element_size() * 2 + 1 + (1 if transpose else 0)) / 1e9
            print(
                f"quantize_tensorwise {tuple(t.shape)} {fmt.name} transpose={transpose}: {wall:.4f} ms "
                f"({gbytes / wall * 1e3:.0f} GB/s over 2 reads + writes)"
            )
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            steps["fp8"]()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(50):
        steps["fp8"]()
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(30)
