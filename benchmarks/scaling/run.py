"""One driver for issue 23's multi-GPU runs: every row's commands, run on the GPUs at hand within a time limit.

Why: multi-GPU machines are lent rarely, for a short device budget and at most 10 minutes a command. This
script knows each row's steps (existing benchmarks and tests of this repository, launched with
``torchrun --standalone --nproc-per-node=N`` or ``pytest -m gpu``), runs the chosen rows on the machine's GPU
count, skips (and reports) a step whose size does not fit the GPU count or whose own time limit exceeds what
is left of ``--limit-s``, and leaves everything under ``--out``:

* ``env.txt``: GPU names, ``nvidia-smi topo -m``, NCCL and torch versions, date (also printed first);
* ``<row>/<step>.log``: the step's stdout and stderr;
* ``steps.jsonl``: one line per step (row, step, command, rc, wall_s, skipped);
* ``<row>/results.jsonl``: the JSON lines the step printed (or wrote to its metrics file), ``scaling_step`` added;
* ``summary.md``: one table per row, with the numbers found under ``step_ms``/``tokens_per_s``/``median_ms``/
  ``mfu``-like keys.

    python3 benchmarks/scaling/run.py --rows fsdp,tp --limit-s 560 --out $OUT/scaling
    python3 benchmarks/scaling/run.py --dry-run --gpus 8          # print every command, run nothing
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FSDP = "plugins/mcore-fsdp/benchmarks/bench_fsdp.py"
MULTI = "plugins/mcore-parallel/benchmarks/bench_multi.py"
CP_MULTI = "plugins/mcore-parallel/benchmarks/bench_cp_multi.py"
CP_BALANCE = "plugins/mcore-parallel/benchmarks/bench_cp_balance.py"
PP = "plugins/mcore-parallel/benchmarks/bench_pp.py"
EP_MULTI = "plugins/mcore-moe/benchmarks/bench_ep_multi.py"
HEARTBEAT_TEST = (
    "packages/mcore-core/tests/test_heartbeat.py"
    "::test_on_nccl_a_sigstopped_rank_ends_every_other_rank_with_one_line_within_the_timeout"
)
INFERENCE_EP_TEST = "integration_tests/test_inference_ep.py"
SERVE_EP_TEST = "integration_tests/test_serve_ep.py"
SIZES = (2, 4, 8)
KEY_PREFIXES = (
    "step_ms",
    "step_time_s",
    "tokens_per_s",
    "median_ms",
    "mfu",
    "bubble",
    "exposed",
    "exchange_share",
    "peak",
)
LABEL_KEYS = ("impl", "arm", "kind", "dispatcher", "plan", "cp", "model", "seq", "world_size", "status")
SUMMARY_MEDIAN_ABOVE = 12
"""A step with more result rows than this (a training run's metrics) is summarised by their medians."""
SUMMARY_SKIP_FIRST = 10


class UsageError(Exception):
    """Bad command-line input: one line, exit code 2."""


@dataclass
class Step:
    """One command of a row: ``nproc`` GPUs it needs (0: none), its own time limit."""

    row: str
    name: str
    argv: list[str]
    limit_s: float
    nproc: int = 0
    skip: str | None = None
    metrics_file: Path | None = None
    """A JSON-lines file the command writes (``mcore train``'s metrics) read as its results, besides stdout."""


@dataclass
class Ctx:
    """What the row builders need: the GPU count, the interpreter, the output folder and the e2e layout."""

    gpus: int
    python: str
    out: Path
    e2e_layouts: str = "fsdp"
    steps: list[Step] = field(default_factory=list)


def torchrun(ctx: Ctx, n: int, script: str, *args: str) -> list[str]:
    return [ctx.python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", script, *args]


def fits(ctx: Ctx, n: int) -> str | None:
    """Why ``n`` GPUs cannot run here (None: they can)."""
    if n > ctx.gpus:
        return f"needs {n} GPUs, --gpus is {ctx.gpus}"
    if ctx.gpus % n:
        return f"{n} does not divide the GPU count {ctx.gpus}"
    return None


def sizes(ctx: Ctx, *extra: int) -> list[int]:
    """2, 4, 8 and the GPU count (plus ``extra``), ascending, without repeats."""
    return sorted({*SIZES, ctx.gpus, *extra} - {0})


def add(ctx: Ctx, row: str, name: str, argv: list[str], limit_s: float, nproc: int, **kw: Any) -> None:
    ctx.steps.append(Step(row, name, argv, limit_s, nproc, fits(ctx, nproc) if nproc else None, **kw))


def row_fsdp(ctx: Ctx) -> None:
    """bench-0.9b and llama3-8b (full depth): mcore fsdp vs FSDP2 (and DDP on 0.9b), weak scaling 2..N; hsdp."""
    common = ("--seq", "4096", "--batch", "1", "--repeats", "2", "--steps", "10", "--warmup", "3")
    for n in sizes(ctx):
        add(ctx, "fsdp", f"bench-0.9b_n{n}",
            torchrun(ctx, n, FSDP, "--model", "bench-0.9b", "--impls", "mcore,torch,ddp", *common), 150, n)  # fmt: skip
    for n in sizes(ctx):
        add(ctx, "fsdp", f"llama3-8b_n{n}",
            torchrun(ctx, n, FSDP, "--model", "llama3-8b", "--impls", "mcore,torch", *common), 270, n)  # fmt: skip
    n = ctx.gpus
    if n >= 4 and n % 2 == 0:
        add(ctx, "fsdp", f"hsdp2x{n // 2}_bench-0.9b",
            torchrun(ctx, n, FSDP, "--model", "bench-0.9b", "--replicate", "2", "--impls", "mcore,torch", *common),
            150, n)  # fmt: skip
    else:
        ctx.steps.append(
            Step(
                "fsdp",
                "hsdp2xM_bench-0.9b",
                [],
                240,
                max(n, 4),
                f"hsdp 2 x M needs an even GPU count >= 4, --gpus is {n}",
            )
        )


def row_tp(ctx: Ctx) -> None:
    """tp 2/4/8 with/without sequence parallel and chunked overlap; tp2 x fsdp vs fsdp, ddp vs torch DDP on all."""
    common = ("--model", "bench-0.9b", "--seq", "4096", "--rounds", "2", "--steps", "5", "--warmup", "2")
    arms = ("tp", "tp+sp", "tp+overlap", "tp+sp+overlap", "tp+sp+overlap-rs")
    for n in sizes(ctx):
        add(ctx, "tp", f"tp{n}", torchrun(ctx, n, MULTI, *common, "--arms", *arms), 210, n)
    n = ctx.gpus
    add(ctx, "tp", f"tp2xfsdp_vs_fsdp_n{n}",
        torchrun(ctx, n, MULTI, *common, "--arms", "tp-fsdp", "fsdp", "ddp", "torch-ddp"), 210, n)  # fmt: skip


def row_timeout(ctx: Ctx) -> None:
    """The NCCL collective timeout: one rank SIGSTOPped, every rank ends with one line (the test uses min(N, 8))."""
    argv = [ctx.python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", HEARTBEAT_TEST]
    add(ctx, "timeout", "nccl_sigstop", argv, 150, 2)


def row_ep_serve(ctx: Ctx) -> None:
    """Expert-parallel serving: the 2-GPU NCCL lockstep test, then ``mcore serve --ep 2`` under torchrun (gloo)."""
    pytest = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    add(ctx, "ep_serve", "lockstep_nccl_ep2", [*pytest, "-m", "gpu", INFERENCE_EP_TEST], 240, 2)
    add(ctx, "ep_serve", "serve_ep2_torchrun", [*pytest, SERVE_EP_TEST], 180, 0)


def row_cp(ctx: Ctx) -> None:
    """ring / a2a / allgather / a2a+ring at 32k-128k on cp = 2/4/8; static vs dynamic split (no GPU)."""
    for n in sizes(ctx):
        argv = torchrun(ctx, n, CP_MULTI, "--seqs", "32768", "65536", "131072", "--repeats", "3", "--iters", "3")
        add(ctx, "cp", f"cp{n}", argv, 180, n)
    cps = [str(c) for c in sizes(ctx) if c <= ctx.gpus] or ["2"]
    add(ctx, "cp", "balance", [ctx.python, CP_BALANCE, "--seq-len", "131072", "--cps", *cps], 60, 0)


def row_pp(ctx: Ctx) -> None:
    """1F1B / interleaved / zero-bubble (ours) and torch 1F1B / interleaved at pp 2/4/8, llama3-8b full depth."""
    for n in sizes(ctx):
        argv = torchrun(ctx, n, PP, "--model", "llama3-8b", "--seq", "4096", "--micro-batches", "16",
                        "--rounds", "2", "--steps", "2", "--warmup", "1")  # fmt: skip
        add(ctx, "pp", f"pp{n}", argv, 300, n)


def row_ep(ctx: Ctx) -> None:
    """One moe layer of moe-bench's shape at ep 1 (the baseline) and 2/4/8, each dispatcher; 8192 tokens a rank."""
    shape = ("--hidden", "2048", "--experts", "64", "--top-k", "8", "--ffn", "1024", "--tokens", "8192")
    for n in sizes(ctx, 1):
        add(ctx, "ep", f"ep{n}", torchrun(ctx, n, EP_MULTI, *shape, "--repeats", "5"), 120, n)


def row_e2e(ctx: Ctx) -> None:
    """``mcore train`` llama3-8b, 200 steps on the default text source, seq 8192, 1 row per GPU a step."""
    n = ctx.gpus
    run_dir = ctx.out / "e2e" / "run"
    argv = [ctx.python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "mcore",
            *e2e_overrides(ctx.e2e_layouts, n, run_dir)]  # fmt: skip
    add(ctx, "e2e", f"llama3-8b_{ctx.e2e_layouts.replace(',', '-')}_n{n}", argv, 540, n,
        metrics_file=run_dir / "metrics.jsonl")  # fmt: skip


def e2e_overrides(layouts: str, n: int, run_dir: Path) -> list[str]:
    """The ``mcore train`` command line of the end-to-end row (also checked by ``mcore config`` in the test)."""
    return ["train", "--model.preset=llama3-8b", f"--parallel.layouts={layouts}", "--precision.recipe=bf16",
            "--train.steps=200", "--train.seq_len=8192", f"--train.global_batch_size={max(n, 1)}",
            "--train.micro_batch_size=1", "--data.max_tokens=20000000", f"--train.out_dir={run_dir}",
            "--train.resume=none", "--train.overwrite=true", "--log.every=1", "--log.progress=lines",
            "--log.plot=false", "--log.tensorboard=false", "--checkpoint.every=0",
            "--checkpoint.save_final=false"]  # fmt: skip


ROWS: dict[str, Callable[[Ctx], None]] = {
    "fsdp": row_fsdp,
    "tp": row_tp,
    "timeout": row_timeout,
    "ep_serve": row_ep_serve,
    "cp": row_cp,
    "pp": row_pp,
    "ep": row_ep,
    "e2e": row_e2e,
}


def build_steps(
    rows: Sequence[str], gpus: int, out: Path, python: str = sys.executable, e2e_layouts: str = "fsdp"
) -> list[Step]:
    """Every step of ``rows`` for ``gpus`` GPUs, in row order (sizes that do not fit carry their skip reason)."""
    ctx = Ctx(gpus, python, out, e2e_layouts)
    for r in rows:
        ROWS[r](ctx)
    return ctx.steps


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc; torchrun's workers may sit in sessions of their own)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the step's process group and every descendant, then reap it."""
    pids = _descendants(proc.pid)
    for target in (
        lambda: os.killpg(proc.pid, signal.SIGKILL),
        *[(lambda p=p: os.kill(p, signal.SIGKILL)) for p in pids],
    ):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            target()
    proc.wait()


def run_step(step: Step, log: Path, timeout_s: float) -> tuple[int | None, float, bool]:
    """Run one step with its output in ``log``, in a session of its own; returns (rc, wall_s, timed_out)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as fh:
        fh.write(f"$ {shlex.join(step.argv)}\n".encode())
        fh.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(step.argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            rc, timed_out = proc.returncode, True
            fh.write(f"\n[scaling driver] killed after its limit of {timeout_s:g} s\n".encode())
        # a worker left in the step's process group after its launcher exited (no pid is reused while its group lives)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return rc, time.perf_counter() - t0, timed_out


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` that is a JSON object."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                rows.append(obj)
    return rows


def run_steps(
    steps: Sequence[Step], out: Path, limit_s: float, echo: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Run ``steps`` in order within ``limit_s`` seconds in all; write logs, steps.jsonl and results; return records.

    A step starts only if at least its own ``limit_s`` is left of the budget; otherwise (or when its size does
    not fit) it is recorded as skipped with the reason."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    records = []
    for step in steps:
        left = limit_s - (time.monotonic() - start)
        record: dict[str, Any] = {"row": step.row, "step": step.name, "command": shlex.join(step.argv),
                                  "nproc": step.nproc, "rc": None, "wall_s": 0.0, "skipped": step.skip}  # fmt: skip
        if record["skipped"] is None and left < step.limit_s:
            record["skipped"] = (
                f"budget: {left:.0f} s left of --limit-s {limit_s:g}, the step's limit is {step.limit_s:g} s"
            )
        if record["skipped"] is None:
            echo(f"[{step.row}/{step.name}] {record['command']}")
            log = out / step.row / f"{step.name}.log"
            rc, wall, timed_out = run_step(step, log, step.limit_s)
            record.update(rc=rc, wall_s=round(wall, 2), timed_out=timed_out, log=str(log.relative_to(out)))
            results = json_lines(log.read_text(errors="replace"))
            if step.metrics_file is not None and step.metrics_file.is_file():
                results += json_lines(step.metrics_file.read_text(errors="replace"))
            record["results"] = len(results)
            with (out / step.row / "results.jsonl").open("a") as f:
                for r in results:
                    f.write(json.dumps({"scaling_step": step.name, **r}) + "\n")
            echo(
                f"[{step.row}/{step.name}] rc={rc} wall={wall:.1f} s{' (timed out)' if timed_out else ''}, {len(results)} JSON lines"
            )
        else:
            echo(f"[{step.row}/{step.name}] skipped: {record['skipped']}")
        records.append(record)
        with (out / "steps.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
    return records


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")


def key_numbers(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in row.items()
        if k.startswith(KEY_PREFIXES) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _refused(row: dict[str, Any]) -> bool:
    """A benchmark's row for an arm it did not run (``"status": "not available: ..."``)."""
    return str(row.get("status", "ok")) != "ok"


def summary(records: Sequence[dict[str, Any]], out: Path, env: str) -> str:
    """``summary.md``: the environment, then per row the steps' rc/wall and the key numbers of their JSON lines."""
    lines = ["# Scaling runs (issue 23)", "", "```", env.rstrip(), "```", ""]
    for row in dict.fromkeys(r["row"] for r in records):
        lines += [f"## {row}", "", "| step | rc | wall s | skipped |", "|---|---|---|---|"]
        mine = [r for r in records if r["row"] == row]
        for r in mine:
            rc = "timeout" if r.get("timed_out") else ("-" if r["rc"] is None else r["rc"])
            lines.append(f"| {r['step']} | {rc} | {r['wall_s']} | {_fmt(r['skipped'] or '')} |")
        results_file = out / row / "results.jsonl"
        results = json_lines(results_file.read_text()) if results_file.is_file() else []
        table = []
        for r in mine:
            rows = [x for x in results if x.get("scaling_step") == r["step"] and (key_numbers(x) or _refused(x))]
            if len(rows) > SUMMARY_MEDIAN_ABOVE:  # a training run: medians over its steady steps
                steady = rows[SUMMARY_SKIP_FIRST:]
                keys = sorted({k for x in steady for k in key_numbers(x)})
                med = {k: statistics.median(x[k] for x in steady if isinstance(x.get(k), (int, float))) for k in keys}
                table.append((r["step"], f"median of {len(steady)} rows (first {SUMMARY_SKIP_FIRST} left out)", med))
            else:
                for x in rows:
                    label = " ".join(f"{k}={_fmt(x[k])}" for k in LABEL_KEYS if k in x)
                    table.append((r["step"], label, key_numbers(x)))
        if table:
            lines += ["", "| step | what | numbers |", "|---|---|---|"]
            for step, label, nums in table:
                lines.append(f"| {step} | {label} | {', '.join(f'{k}={_fmt(v)}' for k, v in nums.items())} |")
        lines.append("")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


def _cmd_text(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        return (done.stdout + done.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"


def environment() -> str:
    """GPU names, link topology, NCCL and torch versions, date (UTC)."""
    import torch

    try:
        nccl: Any = torch.cuda.nccl.version()
    except Exception as e:  # a CPU build of torch has no NCCL: recorded, not fatal
        nccl = f"unavailable: {e}"
    return "\n".join([
        f"date_utc: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"torch: {torch.__version__} cuda {torch.version.cuda} nccl {nccl}",
        "gpus:",
        _cmd_text(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]),
        "nvidia-smi topo -m:",
        _cmd_text(["nvidia-smi", "topo", "-m"]),
    ])  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit code 2
        raise UsageError(message)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _Parser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)} (default: all)")
    p.add_argument("--gpus", type=int, default=None, help="GPU count (default: torch.cuda.device_count())")
    p.add_argument("--limit-s", type=float, default=560.0, help="total wall budget in seconds")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT/scaling, else ./scaling-out)")
    p.add_argument("--e2e-layouts", default="fsdp", help="parallel.layouts of the e2e row (the best layout found)")
    p.add_argument("--only", default="", help="comma-separated step names of the chosen rows (default: all)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise UsageError(
            f"--rows {args.rows!r}: unknown row {', '.join(unknown) or '(none given)'}; known: {', '.join(ROWS)}"
        )
    args.rows = rows
    if args.limit_s <= 0:
        raise UsageError(f"--limit-s {args.limit_s:g}: must be > 0")
    if args.gpus is not None and args.gpus < 0:
        raise UsageError(f"--gpus {args.gpus}: must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        gpus = args.gpus
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        if gpus == 0 and not args.dry_run:
            raise UsageError("--gpus 0: no GPU to run on; allowed: a machine with GPUs, or --dry-run")
    except UsageError as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2
    default_out = Path(os.environ["OUT"]) / "scaling" if os.environ.get("OUT") else Path("scaling-out")
    out = (args.out or default_out).resolve()
    steps = build_steps(args.rows, gpus, out, e2e_layouts=args.e2e_layouts)
    if args.only:
        only = [o.strip() for o in args.only.split(",") if o.strip()]
        unknown = [o for o in only if o not in {s.name for s in steps}]
        if unknown:
            known = ", ".join(s.name for s in steps)
            print(
                f"run.py: error: --only {args.only!r}: no step {', '.join(unknown)} in rows {','.join(args.rows)}; known: {known}",
                file=sys.stderr,
            )
            return 2
        steps = [s for s in steps if s.name in only]
    if args.dry_run:
        for s in steps:
            tail = f"  # skipped: {s.skip}" if s.skip else f"  # limit {s.limit_s:g} s"
            print(f"[{s.row}/{s.name}] {shlex.join(s.argv)}{tail}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(env, flush=True)
    (out / "env.txt").write_text(env + "\n")
    records = run_steps(steps, out, args.limit_s, echo=lambda s: print(s, flush=True))
    summary(records, out, env)
    failed = [r for r in records if r["rc"] not in (0, None) or r.get("timed_out")]
    print(f"{len(records)} steps: {sum(r['rc'] == 0 for r in records)} ok, {len(failed)} failed, "
          f"{sum(r['skipped'] is not None for r in records)} skipped; {out / 'summary.md'}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
