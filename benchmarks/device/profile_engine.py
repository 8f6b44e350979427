"""Why the eager engine's decode step takes ~20 ms: torch.profiler (device + host ops) and cProfile with the forward."""

import argparse
import cProfile
import io
import pstats
import sys
import time

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
    eager=True,
    no_prefix_caching=False,
)
dev = torch.device("cuda")
for batch in (1, 32):
    engine = bench_host.build(args, batch, dev)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=args.output, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(torch.randint(0, 512, (args.prompt,), generator=gen).tolist(), params)
    while any(s.num_pending > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    t = []
    for _ in range(10):
        b = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        t.append((time.perf_counter() - b) * 1e3)
    print(f"== batch {batch}: eager decode step ms {sorted(t)}")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))
    print(ka.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(45)
    print(s.getvalue()[-9000:])
