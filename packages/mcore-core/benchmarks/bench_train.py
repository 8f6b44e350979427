"""Time whole training steps of ``mcore train`` for named variants of one command line.

Micro-benchmarks time one layer; this one times what a user runs: each variant is a fresh
``python -m mcore train`` subprocess (its own out_dir under ``--out``), so the data pipeline,
the precision recipe, compile and the optimizer are all in the number. Variants run interleaved
``--repeats`` rounds, the order rotated each round, so drift of the machine (clocks, other load)
spreads over all of them.

A variant is ``NAME=ARGS``: ARGS (``--section.key=value ...``, shell-quoted) are added after
``--common``; later keys win. Per variant, optionally:

* ``--env NAME:KEY=VAL[,KEY=VAL...]`` (repeatable): environment of that variant's runs only
  (e.g. ``--env hybrid:MCORE_SSM_KERNELS=triton``);
* ``--pre-run NAME:CMD`` (repeatable): a shell command run before each of that variant's runs
  (every round). For an A/B of two source trees of a package on a machine where the packages
  are installed non-editable (``pip install --no-deps ./tree_a/packages/mcore-core``): the
  installed copy in site-packages is what ``python -m mcore`` imports, so swapping a source file
  in the checkout changes nothing; the variant must reinstall its tree before it runs, and
  again each round because the other variant reinstalled its own.

Per variant: one JSON line (stdout and ``OUT/results.jsonl``) and a row of a Markdown table
(stdout and ``OUT/summary.md``): the median step time over the steady steps of all rounds
(``step_time_s`` of ``metrics.jsonl``, the first ``--warmup`` steps and skipped steps left
out), quartiles, min-max, tokens/s at the median, median MFU (the run's ``mfu``: model FLOPs per
token from the model's ``flops_per_token``, for MoE the active experts only), peak memory (max
``memory_gb``: ``torch.cuda.max_memory_allocated``, max RSS on CPU), median wall time of a run
(start-up, data preparation and compile included) and ratios against ``--baseline``. A run that
fails or passes ``--timeout`` is reported (its log is ``OUT/rNN/NAME/train.log``) and the others
go on; the exit status is 1 when any run failed.

    python packages/mcore-core/benchmarks/bench_train.py --quick --out /tmp/bt      # CPU smoke
    python packages/mcore-core/benchmarks/bench_train.py --suite issue14 --out runs/bench14
    python packages/mcore-core/benchmarks/bench_train.py --out runs/ab --steps 30 \\
        --common "--model.preset=bench-0.9b --train.seq_len=4096 --train.global_batch_size=2 \\
                  --precision.recipe=bf16" \\
        --variant "a=" --variant "b=" --baseline a \\
        --pre-run "a:pip install -q --no-deps ./tree_a/packages/mcore-core" \\
        --pre-run "b:pip install -q --no-deps ./tree_b/packages/mcore-core"

``--out`` must be missing or empty (exit 2 otherwise) unless ``--resume``: runs that finished
(``done.json`` in their directory) are then read back, not run again, and a run cut off midway
starts over; so a suite longer than one sitting is the same command again with ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Set on every run (before ``--common``): metrics on every step, nothing the timing does not need.
RUN_DEFAULTS = (
    "--log.progress=lines",
    "--log.plot=false",
    "--log.tensorboard=false",
    "--checkpoint.every=0",
    "--checkpoint.save_final=false",
)

#: Tokens the GPU suites prepare of the stdlib source: enough for 30 steps of 16384 tokens, quick to tokenize.
DATA_CAP = "--data.max_tokens=5000000"

#: The built-in suites: common args, variants (name, args), env per variant, baseline, steps.
SUITES: dict[str, dict[str, Any]] = {
    # issue 14: where does a bench-0.9b step go; packing and compile as the two levers
    "issue14": {
        "common": "--model.preset=bench-0.9b --train.seq_len=4096 --train.global_batch_size=2 --precision.recipe=bf16 "
        + DATA_CAP,
        "variants": [
            ("default", ""),
            ("concat", "--data.packing=concat"),
            ("compiled", "--train.compile=blocks"),
        ],
        "env": {},
        "baseline": "default",
        "steps": 30,
    },
    # moe-bench trimmed to 4 of its 16 layers: the full 6.9B parameters with AdamW (~16 bytes a
    # parameter) do not fit one 80 GB H100; 8192 tokens x top-8 = 65536 routed rows, 4 chunks
    "moe": {
        "common": "--model.preset=moe-bench --model.num_layers=4 --train.seq_len=4096 "
        "--train.global_batch_size=2 --precision.recipe=bf16 " + DATA_CAP,
        "variants": [
            ("default", ""),
            ("chunked", "--model.moe.chunk_tokens=16384"),
            ("compiled", "--train.compile=blocks"),
        ],
        "env": {},
        "baseline": "default",
        "steps": 30,
    },
    # 16384 tokens a step in all four; the hybrid with the Triton SSM kernels
    "hybrid": {
        "common": "--precision.recipe=bf16 --model.max_position_embeddings=16384 " + DATA_CAP,
        "variants": [
            ("dense-4k", "--model.preset=bench-0.9b --train.seq_len=4096 --train.global_batch_size=4"),
            ("hybrid-4k", "--model.preset=hybrid-bench --train.seq_len=4096 --train.global_batch_size=4"),
            ("dense-16k", "--model.preset=bench-0.9b --train.seq_len=16384 --train.global_batch_size=1"),
            ("hybrid-16k", "--model.preset=hybrid-bench --train.seq_len=16384 --train.global_batch_size=1"),
        ],
        "env": {"hybrid-4k": {"MCORE_SSM_KERNELS": "triton"}, "hybrid-16k": {"MCORE_SSM_KERNELS": "triton"}},
        "baseline": "dense-4k",
        "steps": 30,
    },
    # issue 19: the FP8 recipes' bench-0.9b step against bf16's, eager and compiled (the eager FP8 linear is
    # host-bound; a compiled block takes the host out of it), and torchao's float8 training (its wheel carried)
    "fp8": {
        "common": "--model.preset=bench-0.9b --train.seq_len=4096 --train.global_batch_size=2 " + DATA_CAP,
        "variants": [
            ("bf16", "--precision.recipe=bf16"),
            ("bf16-compiled", "--precision.recipe=bf16 --train.compile=blocks"),
            ("fp8-current", "--precision.recipe=fp8-current"),
            ("fp8-current-compiled", "--precision.recipe=fp8-current --train.compile=blocks"),
            ("fp8-blockwise-compiled", "--precision.recipe=fp8-blockwise --train.compile=blocks"),
            ("fp8-delayed-compiled", "--precision.recipe=fp8-delayed --train.compile=blocks"),
            # torchao's float8 training on the same linears (issue 19: "faster than torchao on the same model")
            ("torchao-float8-compiled", "--precision.recipe=torchao-float8 --train.compile=blocks"),
        ],
        "env": {},
        "baseline": "bf16",
        "steps": 30,
    },
    # the CPU smoke test: tiny preset, 3 steps, 2 variants, 1 round
    "quick": {
        "common": "--model.preset=tiny --parallel.device=cpu --train.cpu_threads=1 --data.max_tokens=20000 "
        "--data.workers=0",
        "variants": [("default", ""), ("concat", "--data.packing=concat")],
        "env": {},
        "baseline": "default",
        "steps": 3,
    },
}


@dataclass
class Variant:
    """One named command line: its extra args, extra environment and pre-run commands."""

    name: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    pre_run: list[str] = field(default_factory=list)


@dataclass
class RunRecord:
    """What one run of one variant left: exit status, wall time, its metrics rows."""

    variant: str
    round: int
    ok: bool
    wall_s: float
    error: str | None
    rows: list[dict[str, Any]]


def parse_variant(spec: str) -> Variant:
    """``NAME=ARGS`` (ARGS shell-quoted, may be empty) as a :class:`Variant`."""
    name, sep, args = spec.partition("=")
    if not sep or not name[:1].isalnum() or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"--variant {spec!r}: want NAME=ARGS, NAME of letters, digits, '-', '_', '.' (not first)")
    return Variant(name, shlex.split(args))


def parse_named(option: str, spec: str, names: set[str]) -> tuple[str, str]:
    """``NAME:VALUE`` of ``--env``/``--pre-run``, NAME one of the variants."""
    name, sep, value = spec.partition(":")
    if not sep or name not in names:
        raise ValueError(f"{option} {spec!r}: want NAME:VALUE with NAME one of {sorted(names)}")
    return name, value


def parse_env(spec: str) -> dict[str, str]:
    """``KEY=VAL,KEY=VAL`` as a dict."""
    out: dict[str, str] = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {spec!r}: want KEY=VAL[,KEY=VAL...]")
        out[key] = value
    return out


def quantiles(values: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max of ``values`` (at least one)."""
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    """The per-step rows of a run's ``metrics.jsonl`` (empty when it has none)."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "step_time_s" in r]


def tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " | ".join(text[-lines:])


def run_one(
    variant: Variant, rnd: int, base: list[str], out: Path, steps: int, timeout: float, python: str
) -> RunRecord:
    """Run ``variant`` once in ``out/rNN/NAME`` (pre-run commands first); a finished run is read back."""
    run_dir = out / f"r{rnd:02d}" / variant.name
    done = run_dir / "done.json"
    if done.is_file():
        rec = json.loads(done.read_text())
        return RunRecord(variant.name, rnd, rec["ok"], rec["wall_s"], rec["error"], read_metrics(run_dir / "run"))
    if run_dir.exists():  # a run cut off before it finished (a killed bench under --resume): start it again
        if not (run_dir / "train.log").is_file():  # not a run this script started: never delete it
            error = f"{run_dir} exists and is not a run of this benchmark (no train.log); left as it is"
            return RunRecord(variant.name, rnd, False, 0.0, error, [])
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    log = run_dir / "train.log"
    env = {**os.environ, **variant.env}
    error: str | None = None
    with log.open("w") as fh:
        for cmd in variant.pre_run:
            fh.write(f"$ {cmd}\n")
            fh.flush()
            pre = subprocess.run(cmd, shell=True, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
            if pre.returncode != 0:
                error = f"pre-run {cmd!r} exited {pre.returncode}"
                break
        argv = [python, "-m", "mcore", "train", *RUN_DEFAULTS, *base, *variant.args]
        argv += [f"--train.out_dir={run_dir / 'run'}", f"--train.steps={steps}", "--log.every=1"]
        fh.write("$ " + shlex.join(argv) + "\n")
        fh.flush()
        t0 = time.perf_counter()
        if error is None:
            # a session of its own, so a timeout ends the run's workers too
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                if rc != 0:
                    error = f"exit {rc}: {tail(log)}"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                error = f"timeout after {timeout:g} s"
        wall = time.perf_counter() - t0
    rows = read_metrics(run_dir / "run")
    if error is None and len(rows) < steps:
        error = f"{len(rows)} of {steps} steps in metrics.jsonl"
    done.write_text(json.dumps({"ok": error is None, "wall_s": wall, "error": error}) + "\n")
    return RunRecord(variant.name, rnd, error is None, wall, error, rows)


def summarize(name: str, records: list[RunRecord], warmup: int) -> dict[str, Any]:
    """One variant's numbers over its good runs (the steady steps of all rounds pooled)."""
    good = [r for r in records if r.ok]
    out: dict[str, Any] = {"variant": name, "runs": len(records), "failed": len(records) - len(good)}
    out["errors"] = [f"round {r.round}: {r.error}" for r in records if not r.ok]
    steady = [row for r in good for row in r.rows if row["step"] > warmup and not row.get("skipped")]
    if not steady:
        return out
    times = [float(row["step_time_s"]) for row in steady]
    stats = quantiles(times)
    out["steps"] = len(times)
    out |= {f"step_s_{k}": v for k, v in stats.items()}
    tokens = float(steady[0]["tokens_per_s"]) * float(steady[0]["step_time_s"])  # global batch x seq_len
    out["tokens_per_step"] = round(tokens)
    out["tokens_per_s"] = tokens / stats["median"]
    mfu = [float(row["mfu"]) for row in steady if row.get("mfu") is not None]
    out["mfu"] = statistics.median(mfu) if mfu else None
    mem = [float(row["memory_gb"]) for r in good for row in r.rows if row.get("memory_gb") is not None]
    out["peak_memory_gb"] = max(mem) if mem else None
    out["wall_s"] = statistics.median(r.wall_s for r in good)
    return out


def add_ratios(results: list[dict[str, Any]], baseline: str) -> None:
    """Step time, tokens/s and memory of each variant over the baseline's (absent where either lacks it)."""
    base = next((r for r in results if r["variant"] == baseline), None)
    if base is None:
        return
    for r in results:
        for key, ratio in (
            ("step_s_median", "step_ratio"),
            ("tokens_per_s", "speedup"),
            ("peak_memory_gb", "mem_ratio"),
        ):
            if r.get(key) and base.get(key):
                r[ratio] = r[key] / base[key]


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: list[dict[str, Any]], baseline: str) -> str:
    """The results as a Markdown table (ratios against ``baseline``)."""
    head = (
        "| variant | step ms (median) | IQR ms | min-max ms | tokens/s | MFU | peak GB | wall s "
        f"| vs {baseline} | mem vs {baseline} | failed |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in results:
        if "step_s_median" not in r:
            lines.append(f"| {r['variant']} | - | - | - | - | - | - | - | - | - | {r['failed']}/{r['runs']} |")
            continue
        ms = {k: 1e3 * r[f"step_s_{k}"] for k in ("median", "q1", "q3", "min", "max")}
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        cells = [
            r["variant"],
            f"{ms['median']:.1f}",
            f"{ms['q1']:.1f}-{ms['q3']:.1f}",
            f"{ms['min']:.1f}-{ms['max']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            fmt(mfu, ".1f") + ("%" if mfu is not None else ""),
            fmt(r.get("peak_memory_gb"), ".2f"),
            f"{r['wall_s']:.0f}",
            fmt(r.get("speedup"), ".3f") + ("x" if r.get("speedup") else ""),
            fmt(r.get("mem_ratio"), ".3f"),
            f"{r['failed']}/{r['runs']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory of the runs and results (missing or empty)")
    p.add_argument("--suite", choices=sorted(SUITES), help="a built-in suite (its common args and variants)")
    p.add_argument("--quick", action="store_true", help="the CPU smoke test: --suite quick, 1 round")
    p.add_argument("--common", default=None, help="args given to every variant (shell-quoted)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS", help="a variant (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="NAME:KEY=VAL[,...]", help="env of one variant")
    p.add_argument("--pre-run", action="append", default=[], metavar="NAME:CMD", help="run before each run of NAME")
    p.add_argument("--baseline", default=None, help="variant the ratios are against (default: the first)")
    p.add_argument("--steps", type=int, default=None, help="training steps a run (default: the suite's, else 30)")
    p.add_argument("--warmup", type=int, default=None, help="first steps left out (default: 5, 1 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 3, 1 with --quick)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds a run may take before it is killed")
    p.add_argument("--resume", action="store_true", help="use a non-empty --out; finished runs are read back")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs `-m mcore train`")
    return p


def resolve(args: argparse.Namespace) -> tuple[list[str], list[Variant], str, int, int, int]:
    """Common args, variants, baseline, steps, warmup and repeats from the command line and the suite."""
    suite_name = "quick" if args.quick else args.suite
    suite = SUITES.get(suite_name or "", {})
    common = shlex.split(args.common if args.common is not None else suite.get("common", ""))
    if args.variant:
        variants = [parse_variant(v) for v in args.variant]
    else:
        variants = [Variant(n, shlex.split(a), dict(suite["env"].get(n, {}))) for n, a in suite.get("variants", [])]
    if not variants:
        raise ValueError("no variants: give --suite, --quick or --variant NAME=ARGS")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"--variant: names repeat in {names}")
    by_name = {v.name: v for v in variants}
    for spec in args.env:
        name, value = parse_named("--env", spec, set(by_name))
        by_name[name].env |= parse_env(value)
    for spec in args.pre_run:
        name, cmd = parse_named("--pre-run", spec, set(by_name))
        by_name[name].pre_run.append(cmd)
    baseline = args.baseline or (None if args.variant else suite.get("baseline")) or names[0]
    if baseline not in by_name:
        raise ValueError(f"--baseline {baseline!r}: not a variant; variants are {names}")
    steps = int(args.steps if args.steps is not None else suite.get("steps", 30))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    for option, number, low in (("--steps", steps, 1), ("--warmup", warmup, 0), ("--repeats", repeats, 1)):
        if number < low:
            raise ValueError(f"{option} {number}: must be >= {low}")
    if warmup >= steps:
        raise ValueError(f"--warmup {warmup}: must be below --steps {steps} (no steady steps left)")
    if not args.timeout > 0:
        raise ValueError(f"--timeout {args.timeout}: must be > 0")
    return common, variants, baseline, steps, warmup, repeats


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        common, variants, baseline, steps, warmup, repeats = resolve(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.resume:
        print(f"error: --out {out}: not empty (give another directory or --resume)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    records: list[RunRecord] = []
    for rnd in range(repeats):
        shift = rnd % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            rec = run_one(variant, rnd, common, out, steps, args.timeout, args.python)
            status = "ok" if rec.ok else f"FAILED ({rec.error})"
            print(f"round {rnd + 1}/{repeats} {variant.name}: {rec.wall_s:.1f} s {status}", file=sys.stderr)
            records.append(rec)
    results = [summarize(v.name, [r for r in records if r.variant == v.name], warmup) for v in variants]
    add_ratios(results, baseline)
    lines = [json.dumps(r) for r in results]
    table = markdown(results, baseline)
    print("\n".join(lines))
    print()
    print(table)
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    header = f"`{shlex.join(sys.argv)}`\n\nsteps {steps}, warmup {warmup}, rounds {repeats}\n\n"
    (out / "summary.md").write_text(header + table + "\n")
    return 1 if any(not r.ok for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
