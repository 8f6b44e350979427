"""A/B timing of the ``bench-0.9b`` training step (or of building a preset): this checkout against another version.

A refactor must not slow the step. Two versions of a package cannot live in one process, so each
repeat is a fresh child process that imports one source tree (``PYTHONPATH``) and times the step;
the trees alternate (A B A B ...), so drift of the card's clocks or temperature hits both alike.

    python ab_step.py --tree new=packages/mcore-core/src:plugins/mcore-models/src \
                       --tree old=.old/packages/mcore-core/src:.old/plugins/mcore-models/src --repeats 6

The child script is the same text for every tree: it builds ``bench-0.9b`` through
``mcore_models.presets.preset_config`` (run config schema 2) and, where a tree has none, through
the older ``GPTConfig(**GPT.presets()[...])``; each JSON line names the API it used (``config_api``).

Step: ``bench-0.9b``, batch 2 x seq 4096, fp32 parameters, forward/backward under bf16 autocast,
``clip_grad_norm_(1.0)``, fused AdamW (the scheme of ``bench.py``); median of 20 steps after 5
warm-up steps per child. Prints one JSON line per child and a summary (median, min, max per tree).

``--task build --preset llama3-8b``: each child times ``GPT.build(cfg, seed=0, device="cuda")`` in
fp32 (model construction and initialisation, what a run does before its layouts) and reports the
seconds, the process's peak host RSS and its rise during the build, and the peak device memory.

``--task profile``: each child runs the step under ``torch.profiler`` (5 steps after the warm-up)
and reports the 25 kernels with the most device time per step, to find where two trees differ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CONFIG = r"""
import json, resource, sys, time, torch
from mcore_models.gpt import GPT, GPTConfig
PRESET = sys.argv[1]
try:  # run config schema 2: presets are registered values with per-block tables
    from mcore_models.presets import preset_config
    cfg, config_api = preset_config(PRESET), "preset_config"
except ImportError:  # an older tree: flat keys from the model factory
    cfg, config_api = GPTConfig(**GPT.presets()[PRESET]), "GPT.presets"
"""

BUILD = (
    CONFIG
    + r"""
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
torch.cuda.synchronize()
t0 = time.perf_counter()
model = GPT.build(cfg, seed=0, device="cuda")
torch.cuda.synchronize()
seconds = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"build_s": seconds, "peak_rss_GiB": rss, "rss_rise_GiB": rss - rss0,
                  "peak_device_GiB": torch.cuda.max_memory_allocated() / 2**30,
                  "params": sum(p.numel() for p in model.parameters()), "config_api": config_api}))
"""
)

STEP = (
    CONFIG
    + r"""
model = GPT.build(cfg, seed=0, device="cuda")
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
g = torch.Generator(device="cuda").manual_seed(0)
tokens = torch.randint(0, cfg.vocab_size, (2, 4096), device="cuda", generator=g)
labels = torch.randint(0, cfg.vocab_size, (2, 4096), device="cuda", generator=g)
def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(tokens, labels=labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss
for _ in range(5):
    step()
torch.cuda.synchronize()
"""
)

CHILD = (
    STEP
    + r"""
times = []
for _ in range(20):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); loss = step(); b.record(); torch.cuda.synchronize()
    times.append(a.elapsed_time(b))
times.sort()
print(json.dumps({"step_ms": times[len(times) // 2], "min_ms": times[0], "loss": float(loss),
                  "peak_GiB": torch.cuda.max_memory_allocated() / 2**30, "module": GPT.__module__,
                  "file": sys.modules[GPT.__module__].__file__, "config_api": config_api}))
"""
)


PROFILE = (
    STEP
    + r"""
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
rows = [(e.key, e.self_device_time_total / 5e3, e.count // 5) for e in prof.key_averages()]
rows = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])
print(json.dumps({"device_ms_per_step": sum(r[1] for r in rows), "top": rows[:25], "config_api": config_api}))
"""
)

TASKS = {"step": (CHILD, "step_ms"), "build": (BUILD, "build_s"), "profile": (PROFILE, "device_ms_per_step")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=SRC_ROOT[:SRC_ROOT...] (PYTHONPATH)")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    parser.add_argument("--task", choices=sorted(TASKS), default="step")
    parser.add_argument("--preset", default=None, help="default: bench-0.9b for step, llama3-8b for build")
    args = parser.parse_args()
    script, metric = TASKS[args.task]
    preset = args.preset or ("llama3-8b" if args.task == "build" else "bench-0.9b")
    trees = [t.split("=", 1) for t in args.tree]
    results: dict[str, list[float]] = {name: [] for name, _ in trees}
    for repeat in range(args.repeats):
        order = trees if repeat % 2 == 0 else trees[::-1]
        for name, roots in order:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(Path(r).resolve()) for r in roots.split(":"))}
            out = subprocess.run(
                [sys.executable, "-c", script, preset], env=env, capture_output=True, text=True, check=False
            )
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            row = {"tree": name, "repeat": repeat, **json.loads(out.stdout.strip().splitlines()[-1])}
            results[name].append(row[metric])
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(line + "\n")
    for name, values in results.items():
        summary = {
            "tree": name,
            "metric": metric,
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "n": len(values),
        }
        print(json.dumps(summary))
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
