"""What the captured decode step of bench-0.9b spends its device time on: the graph replayed under torch.profiler,
kernels grouped by name with their count and time per step, at batch 1 and 32 (issue 20: the graph alone is ~40%
of the weight-read roofline at batch 1)."""

import argparse
import sys

import torch

sys.path.insert(0, "plugins/mcore-inference/benchmarks")
import bench_host
from mcore_inference.sampling import SamplingParams
from torch.profiler import ProfilerActivity, profile

args = argparse.Namespace(
    preset=sys.argv[1] if len(sys.argv) > 1 else "bench-0.9b",
    prompt=128,
    output=64,
    detok=False,
    eager=False,
    no_prefix_caching=False,
)
STEPS = 20
for batch in (1, 32):
    engine = bench_host.build(args, batch, torch.device("cuda"))
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=args.output, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(torch.randint(0, 512, (args.prompt,), generator=gen).tolist(), params)
    for _ in range(4):
        engine.step()
    decoder = engine.decoder
    assert decoder is not None and batch in decoder.graphs
    graph = decoder.graphs[batch][0]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            graph.replay()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    first = last = None
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start, end = event.time_range.start, event.time_range.end
        first = start if first is None else min(first, start)
        last = end if last is None else max(last, end)
        kernels.setdefault(event.name, []).append(end - start)
    busy = sum(sum(v) for v in kernels.values()) / STEPS
    span = (last - first) / STEPS if first is not None else 0.0
    count = sum(len(v) for v in kernels.values()) / STEPS
    print(f"== batch {batch}: {count:.0f} kernels a step, busy {busy:.0f} us of a {span:.0f} us span a step")
    rows = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))
    for name, times in rows[:25]:
        print(
            f"{sum(times) / STEPS:8.1f} us {len(times) / STEPS:6.1f}x  {sum(times) / len(times):7.2f} us each  {name[:110]}"
        )
    del engine, decoder, graph
    torch.cuda.empty_cache()
