"""A/B timing of the ``bench-0.9b`` training step: this checkout against another version of the code.

A refactor must not slow the step. Two versions of a package cannot live in one process, so each
repeat is a fresh child process that imports one source tree (``PYTHONPATH``) and times the step;
the trees alternate (A B A B ...), so drift of the card's clocks or temperature hits both alike.

    python ab_step.py --tree new=packages/mcore-core/src:plugins/mcore-models/src \
                       --tree old=.old/packages/mcore-core/src:.old/plugins/mcore-models/src --repeats 6

Step: ``bench-0.9b``, batch 2 x seq 4096, fp32 parameters, forward/backward under bf16 autocast,
``clip_grad_norm_(1.0)``, fused AdamW (the scheme of ``bench.py``); median of 20 steps after 5
warm-up steps per child. Prints one JSON line per child and a summary (median, min, max per tree).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, torch
from mcore_models.gpt import GPT, GPTConfig
cfg = GPTConfig(**GPT.presets()["bench-0.9b"])
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
times = []
for _ in range(20):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); loss = step(); b.record(); torch.cuda.synchronize()
    times.append(a.elapsed_time(b))
times.sort()
print(json.dumps({"step_ms": times[len(times) // 2], "min_ms": times[0], "loss": float(loss),
                  "peak_GiB": torch.cuda.max_memory_allocated() / 2**30, "module": GPT.__module__,
                  "file": sys.modules[GPT.__module__].__file__}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=SRC_ROOT[:SRC_ROOT...] (PYTHONPATH)")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    args = parser.parse_args()
    trees = [t.split("=", 1) for t in args.tree]
    results: dict[str, list[float]] = {name: [] for name, _ in trees}
    for repeat in range(args.repeats):
        order = trees if repeat % 2 == 0 else trees[::-1]
        for name, roots in order:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(Path(r).resolve()) for r in roots.split(":"))}
            out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            row = {"tree": name, "repeat": repeat, **json.loads(out.stdout.strip().splitlines()[-1])}
            results[name].append(row["step_ms"])
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(line + "\n")
    for name, values in results.items():
        summary = {
            "tree": name,
            "median_ms": statistics.median(values),
            "min_ms": min(values),
            "max_ms": max(values),
            "n": len(values),
        }
        print(json.dumps(summary))
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
