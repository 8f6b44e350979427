"""GPU idle gaps in a torch.profiler Chrome trace: busy time, gaps > 50 us, kernels per step, what the host ran."""

import bisect
import json
import sys

path = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 1
with open(path) as fh:
    ev = json.load(fh)["traceEvents"]
kern = sorted(
    (e["ts"], e["ts"] + e.get("dur", 0), e["name"])
    for e in ev
    if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
)
cpu = sorted(
    (e["ts"], e.get("dur", 0), e["name"])
    for e in ev
    if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "python_function", "user_annotation")
)
launch = sorted((e["ts"], e["name"]) for e in ev if e.get("ph") == "X" and e.get("cat") == "cuda_runtime")
if not kern:
    sys.exit("no kernels")
start, end = kern[0][0], max(k[1] for k in kern)
busy = 0
cur_s, cur_e = kern[0][0], kern[0][1]
gaps = []
for s, e, n in kern[1:]:
    if s > cur_e:
        busy += cur_e - cur_s
        gaps.append((s - cur_e, cur_e, n))
        cur_s, cur_e = s, e
    else:
        cur_e = max(cur_e, e)
busy += cur_e - cur_s
span = end - start
print(
    f"span {span / 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms ({busy / span * 100:.1f}%), per step busy {busy / 1e3 / steps:.1f} span {span / 1e3 / steps:.1f}"
)
print(
    f"kernels+copies {len(kern)} ({len(kern) // steps}/step), runtime calls {len(launch)} ({len(launch) // steps}/step)"
)
big = [g for g in gaps if g[0] > 50]
print(
    f"gaps > 50 us: {len(big)}, sum {sum(g[0] for g in big) / 1e3:.2f} ms; all gaps sum {sum(g[0] for g in gaps) / 1e3:.2f} ms"
)
cpu_ts = [c[0] for c in cpu]
names = {}
for dur, at, nxt in sorted(big, reverse=True)[:25]:
    # innermost-ish CPU ops running during the gap
    i = bisect.bisect_right(cpu_ts, at + dur / 2)
    running = [c for c in cpu[max(0, i - 400) : i] if c[0] <= at + dur / 2 <= c[0] + c[1]]
    running.sort(key=lambda c: c[1])
    desc = " < ".join(c[2][:50] for c in running[:3])
    print(f"  {dur / 1e3:7.3f} ms before {nxt[:45]:45s} | host: {desc}")
