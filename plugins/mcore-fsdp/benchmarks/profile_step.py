"""Where a training step's time goes, per implementation: GPU busy time, idle gaps, top kernels.

A diagnosis tool beside ``bench_fsdp.py`` (same models and wrapping), for finding the cost of
``fully_shard`` over the bare model on one GPU:

    torchrun --nproc-per-node 1 profile_step.py --model bench-0.9b --impls none,mcore --steps 3

For each implementation it prints the step's wall time, the GPU's busy time (union of kernel
intervals), and the kernels with the largest total time per step, so two implementations'
tables can be compared line by line.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from bench_fsdp import PRESETS, Decoder, Shape, training_step, wrap


def busy_ms(prof: torch.profiler.profile) -> tuple[float, dict[str, float]]:
    """GPU busy time (union of kernel intervals, ms) and total ms per kernel name."""
    spans, per_kernel = [], defaultdict(float)
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        spans.append((e.time_range.start, e.time_range.end))
        per_kernel[e.name] += (e.time_range.end - e.time_range.start) / 1000.0
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1000.0, dict(per_kernel)


def profile(impl: str, args: argparse.Namespace, device: torch.device, world: int) -> None:
    """Three warm-up steps, then ``args.steps`` profiled ones; rank 0 prints the tables."""
    shape = Shape(**PRESETS[args.model])
    if args.layers:
        shape.layers = args.layers
    torch.manual_seed(0)
    with torch.device(device):
        model = wrap(impl, Decoder(shape), world, device, not args.no_reshard)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, shape.vocab, (1, args.seq + 1), device=device)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    step = training_step(impl, model, opt, inputs, labels, device)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1000 / args.steps
    busy, kernels = busy_ms(prof)
    if dist.get_rank() == 0:
        print(f"\n### {impl}: wall {wall:.2f} ms/step (profiled), GPU busy {busy / args.steps:.2f} ms/step")
        for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {ms / args.steps:8.3f} ms  {name[:110]}")
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
        print("\n".join(table.splitlines()[: args.top + 4]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[k for k in PRESETS if k != "tiny"], default="bench-0.9b")
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--impls", default="none,mcore")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--no-reshard", action="store_true")
    args = parser.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    device, world = torch.device("cuda", local), dist.get_world_size()
    for impl in args.impls.split(","):
        profile(impl, args, device, world)
        torch.cuda.empty_cache()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
