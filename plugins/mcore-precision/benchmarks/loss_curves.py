"""Loss curves of every precision recipe on one model, one seed and one stream of tokens: the measured part of
``docs/low-precision.md``.

Why it exists: a recipe's GEMM tests say its numbers are format-exact; only training says whether the format
costs loss. This runs ``python -m mcore train`` once per recipe (a subprocess each: same preset, seed, data
and learning-rate schedule), each into ``--out/<recipe>``, and writes under ``--out``:

* ``loss_curves.png``: every recipe's training loss on one axis (raw faint, a running mean on top) and, below,
  each recipe's smoothed loss minus bf16's at the same steps;
* ``summary.json`` / ``summary.md``: per recipe the final loss (mean of the last 50 steps), its difference to
  bf16 over the same steps, the last held-out loss, the median tokens/s after warm-up, peak memory, wall time,
  skipped steps and which GEMM path ran (counted in a profiled step: torch scaled-mm calls against the
  quantised linears' GEMMs; "emulated" = quantise, dequantise, fp32 GEMM).

Every run uses the schedule of the longest one (``train.steps`` = the largest step count); a recipe given fewer
steps is stopped after them with SIGTERM (``mcore train`` stops at a step boundary with a checkpoint), so its
curve is directly comparable with bf16's first steps. A failed recipe (bad name, crash, timeout) is reported
and the others go on (exit code 1 at the end). ``--out`` must be new or empty, unless ``--resume-runs``: then
recipes whose ``result.json`` says finished (same settings) are reused, unfinished ones continue from their
checkpoint, and the summary is rebuilt from every ``result.json`` (so results of earlier sessions can be
carried in as those small files alone).

    # the guide's runs (GPU; one recipe list per device session, then all together with --resume-runs):
    python plugins/mcore-precision/benchmarks/loss_curves.py --out runs/loss_curves
    # CPU smoke run
    python plugins/mcore-precision/benchmarks/loss_curves.py --out /tmp/lc --device cpu --preset tiny --steps 3 \\
        --recipes bf16,fp8-current --max-tokens 200000 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Recipes run for ``--long-steps`` by default (the guide's headline comparison); every other one for ``--short-steps``.
LONG_RECIPES = ("bf16", "fp8-current", "fp8-blockwise", "mxfp8", "nvfp4")
#: Recipes without quantised GEMMs (their compiled runs are high precision, not hidden quantised linears).
HIGH_PRECISION = ("fp32", "bf16", "fp16")
BASELINE = "bf16"
FINAL_WINDOW = 50  # steps averaged for the final loss
_STEP_LINE = re.compile(r"^step (\d+)/(\d+)\b")
_TRAINED_LINE = re.compile(r"^trained steps (\d+)\.\.(\d+) in ([0-9.]+) s")


class UsageError(Exception):
    """Bad command line: one line on stderr, exit code 2."""


# ----------------------------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="new or empty directory for the runs and the summary")
    p.add_argument("--resume-runs", action="store_true", help="reuse finished runs in --out, continue unfinished ones")
    p.add_argument("--recipes", default=None, help="comma-separated (default: every registered precision recipe)")
    p.add_argument("--steps", type=int, default=None, help="steps of every recipe (overrides the two below)")
    p.add_argument("--long-steps", type=int, default=1000, help=f"steps of {', '.join(LONG_RECIPES)}")
    p.add_argument("--short-steps", type=int, default=300, help="steps of the other recipes")
    p.add_argument("--recipe-steps", action="append", default=[], metavar="NAME=N", help="steps of one recipe")
    p.add_argument(
        "--schedule-steps",
        type=int,
        default=None,
        help="train.steps of every run, the lr schedule's length (default: the largest step count asked for)",
    )
    p.add_argument("--preset", default="gpt-125m", help="model.preset of the gpt model")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="parallel.device")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--global-batch", type=int, default=16, help="train.global_batch_size (rows per step)")
    p.add_argument("--micro-batch", type=int, default=None, help="train.micro_batch_size (default: the whole batch)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (cosine schedule)")
    p.add_argument("--warmup", type=int, default=50, help="train.warmup_steps (capped at a tenth of the schedule)")
    p.add_argument("--eval-every", type=int, default=100, help="held-out loss every this many steps")
    p.add_argument("--tokenizer", default="byte", help="'byte' (the demo's), 'bpe' (train one on the source) or a path")
    p.add_argument("--bpe-vocab", type=int, default=32768, help="vocabulary of --tokenizer bpe")
    p.add_argument("--source", default="stdlib", help="data.source to prepare once for every run")
    p.add_argument("--max-tokens", type=int, default=None, help="tokenize at most this many tokens")
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds one run may take (then stopped)")
    p.add_argument("--budget", type=float, default=None, help="seconds for all runs: later ones are not started")
    p.add_argument("--grace", type=float, default=120.0, help="seconds between SIGTERM and SIGKILL of a late run")
    p.add_argument("--profile-step", type=int, default=20, help="step profiled to count the GEMM path (0: none)")
    p.add_argument("--warmup-skip", type=int, default=10, help="first steps left out of the tokens/s median")
    p.add_argument("--smooth", type=int, default=25, help="running-mean window of the plot (steps)")
    p.add_argument("--checkpoint-every", type=int, default=250, help="checkpoints for resuming a stopped run")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each finished run's checkpoints")
    p.add_argument("--cpu-threads", type=int, default=0, help="train.cpu_threads of CPU runs")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="extra mcore override")
    args = p.parse_args(argv)
    for key in (
        "steps",
        "long_steps",
        "short_steps",
        "schedule_steps",
        "seq_len",
        "global_batch",
        "eval_every",
        "smooth",
    ):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise UsageError(f"--{key.replace('_', '-')} {value}: must be >= 1")
    for key in ("profile_step", "warmup_skip", "checkpoint_every", "cpu_threads", "warmup"):
        if getattr(args, key) < 0:
            raise UsageError(f"--{key.replace('_', '-')} {getattr(args, key)}: must be >= 0")
    if args.budget is not None and not args.budget > 0:
        raise UsageError(f"--budget {args.budget}: must be > 0")
    return args


def recipe_steps(args: argparse.Namespace, recipes: list[str]) -> tuple[dict[str, int], int]:
    """Steps of each recipe (``--steps``, else long/short by recipe, then the ``--recipe-steps`` overrides) and the
    schedule every run follows: ``--schedule-steps``, else the largest count asked for, whichever recipes this
    invocation runs (so runs of several invocations share it)."""
    steps = {r: args.steps or (args.long_steps if r in LONG_RECIPES else args.short_steps) for r in recipes}
    asked = [args.steps] if args.steps else [args.long_steps, args.short_steps]
    for item in args.recipe_steps:
        name, _, value = item.partition("=")
        if name not in steps or not value.isdigit() or int(value) < 1:
            raise UsageError(f"--recipe-steps {item!r}: allowed NAME=N with NAME one of --recipes and N >= 1")
        steps[name] = int(value)
        asked.append(int(value))
    schedule = args.schedule_steps or max(asked)
    if max(steps.values()) > schedule:
        raise UsageError(f"--schedule-steps {schedule}: smaller than the {max(steps.values())} steps of a recipe")
    return steps, schedule


# ----------------------------------------------------------------------------------------------------- subprocesses


def _mcore(*args: str) -> list[str]:
    return [sys.executable, "-m", "mcore", *args]


def registered_recipes() -> list[str]:
    """The precision recipes ``mcore plugins --json`` lists, bf16 first, then the long ones, then the rest."""
    out = subprocess.run(_mcore("plugins", "--json"), capture_output=True, text=True, check=True).stdout
    names = {i["name"] for i in json.loads(out)["implementations"] if i["kind"] == "precision"}
    return sorted(names, key=lambda n: (n != BASELINE, n not in LONG_RECIPES, n))


def describe_device(device: str) -> dict[str, Any]:
    """Torch, the device and its compute capability, asked in a subprocess (this process never touches CUDA)."""
    code = (
        "import json, torch\n"
        f"cuda = torch.cuda.is_available() and {device!r} != 'cpu'\n"
        "info = {'torch': torch.__version__, 'device': 'cpu', 'capability': None}\n"
        "if cuda:\n"
        "    info['device'] = torch.cuda.get_device_name(0)\n"
        "    info['capability'] = list(torch.cuda.get_device_capability(0))\n"
        "print(json.dumps(info))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    info: dict[str, Any] = json.loads(out)
    info["MCORE_PRECISION_KERNELS"] = os.environ.get("MCORE_PRECISION_KERNELS")
    return info


def prepare_data(args: argparse.Namespace) -> tuple[Path, str]:
    """Tokenize ``--source`` once into ``--out/data`` (reused when there); answers it and the tokenizer to train with."""
    tokenizer = args.tokenizer
    if tokenizer == "bpe":
        tok_dir = args.out / "tokenizer"
        if not (tok_dir / "tokenizer.json").exists():
            cmd = _mcore("data", "train-tokenizer", "--source", args.source, "--out", str(tok_dir))
            subprocess.run([*cmd, "--vocab-size", str(args.bpe_vocab)], check=True)
        tokenizer = str(tok_dir)
    data = args.out / "data"
    if not (data / "index.json").exists():
        cmd = _mcore("data", "prepare", "--source", args.source, "--out", str(data), "--tokenizer", tokenizer)
        cmd += ["--workers", str(min(8, os.cpu_count() or 1))]
        if args.max_tokens is not None:
            cmd += ["--max-tokens", str(args.max_tokens)]
        subprocess.run(cmd, check=True)
    return data, tokenizer


@dataclass
class Attempt:
    """One ``mcore train`` process: its exit, why it was stopped, what it printed."""

    returncode: int | None = None
    stopped: str | None = None  # "steps" (reached its step count), "timeout"
    last_step: int = 0
    resumed_from: int = 0
    train_s: float | None = None
    wall_s: float = 0.0
    error: str = ""
    warnings: list[str] = field(default_factory=list)


def profiled_step(args: argparse.Namespace, steps: int) -> int:
    """The step a run of ``steps`` steps profiles (to count its GEMM path): ``--profile-step``, or its last but one;
    0: none (``--profile-step 0``; the GEMM path is then unknown)."""
    return 0 if args.profile_step == 0 else int(min(args.profile_step, max(1, steps - 1)))


def train_command(args: argparse.Namespace, recipe: str, run_dir: Path, data: Path, tokenizer: str) -> list[str]:
    """``python -m mcore train ...`` of one recipe: every run the same but for the recipe and its directory."""
    schedule = args.schedule_steps
    profile = profiled_step(args, args.steps_of[recipe])
    cmd = _mcore(
        "train",
        "--model.name=gpt",
        f"--model.preset={args.preset}",
        f"--precision.recipe={recipe}",
        f"--parallel.device={args.device}",
        f"--train.steps={schedule}",
        f"--train.seq_len={args.seq_len}",
        f"--train.global_batch_size={args.global_batch}",
        f"--train.micro_batch_size={args.micro_batch if args.micro_batch else 'none'}",
        f"--train.seed={args.seed}",
        f"--train.out_dir={run_dir}",
        f"--train.warmup_steps={warmup_steps(args)}",
        f"--train.eval_every={args.eval_every}",
        f"--train.cpu_threads={args.cpu_threads}",
        f"--optimizer.lr={args.lr}",
        f"--data.source={data}",
        f"--data.tokenizer={tokenizer}",
        "--log.every=1",
        "--log.progress=lines",
        "--log.tensorboard=false",
        "--log.plot=false",
        f"--log.profile_from={profile}",
        "--log.profile_steps=1",
        f"--checkpoint.every={args.checkpoint_every}",
        "--checkpoint.keep_last=1",
        f"--checkpoint.save_final={str(args.keep_checkpoints).lower()}",  # a stopped run still saves
    )
    return cmd + [f"--{item}" for item in args.set]


class MetricsTail:
    """The newest step a run has written to its ``metrics.jsonl`` (flushed every step): read as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0  # a resumed run appends: only new records
        self.partial = ""
        self.last_step = 0

    def poll(self) -> int:
        if self.path.exists():
            with self.path.open() as f:
                f.seek(self.offset)
                chunk = f.read()
                self.offset = f.tell()
            *lines, self.partial = (self.partial + chunk).split("\n")
            for line in lines:
                if line.strip():
                    self.last_step = max(self.last_step, int(json.loads(line).get("step", 0)))
        return self.last_step


def run_once(cmd: list[str], run_dir: Path, stop_at: int | None, timeout: float, grace: float) -> Attempt:
    """Run ``cmd`` (stdout to ``train.log``, stderr to ``train.err``); SIGTERM it once its metrics reach step
    ``stop_at`` (``None``: it ends by itself) or after ``timeout`` s, and SIGKILL it ``grace`` s after that."""
    run_dir.mkdir(parents=True, exist_ok=True)
    attempt = Attempt()
    tail = MetricsTail(run_dir / "metrics.jsonl")
    start = time.monotonic()
    with (run_dir / "train.log").open("a") as log, (run_dir / "train.err").open("a") as err:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=err, stdin=subprocess.DEVNULL)
        signalled: float | None = None
        while proc.poll() is None:
            now = time.monotonic()
            if attempt.stopped is None and stop_at is not None and tail.poll() >= stop_at:
                attempt.stopped = "steps"
                proc.send_signal(signal.SIGTERM)  # stops after the current step, with a checkpoint
                signalled = now
            elif attempt.stopped is None and now - start > timeout:
                attempt.stopped = "timeout"
                proc.send_signal(signal.SIGTERM)
                signalled = now
            elif signalled is not None and now - signalled > grace:
                proc.kill()
            time.sleep(0.1)
    attempt.returncode = proc.returncode
    attempt.wall_s = time.monotonic() - start
    attempt.last_step = tail.poll()
    text = (run_dir / "train.log").read_text(errors="replace").split(f"$ {' '.join(cmd)}\n")[-1]
    for line in text.splitlines():
        if m := _TRAINED_LINE.match(line):
            attempt.train_s = float(m.group(3))
        elif line.startswith("resuming from") and (m := re.search(r"\(step (\d+) of", line)):
            attempt.resumed_from = int(m.group(1))
    err_lines = [ln.strip() for ln in (run_dir / "train.err").read_text(errors="replace").splitlines()]
    messages = [ln for ln in err_lines if ln and not _STEP_LINE.match(ln) and not ln.startswith("USDT:")]
    attempt.warnings = sorted({ln for ln in messages if "emulated" in ln and "Warning" in ln})[:5]
    attempt.error = messages[-1] if messages else ""
    return attempt


# ----------------------------------------------------------------------------------------------------- run results


def read_metrics(run_dir: Path, last: int) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` records up to step ``last``, one per step (a resumed run's later record wins)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "step" in record and record["step"] <= last:
                by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def gemm_counts(run_dir: Path) -> dict[str, int] | None:
    """In the profiled step: quantised linears called (forward), their GEMMs (3 each) and torch scaled-mm calls."""
    trace = run_dir / "profile" / "rank0" / "trace.json"
    if not trace.exists():
        return None
    events = json.loads(trace.read_text()).get("traceEvents", [])
    linears = sum(1 for e in events if e.get("name") == "_QuantizedLinearFn")
    return {"quantized_linears": linears, "quantized_gemms": 3 * linears, "native_scaled_mm": count_scaled_mm(events)}


def count_scaled_mm(events: list[dict[str, Any]]) -> int:
    """Host-side operator events whose name holds ``scaled_mm`` (``aten::_scaled_mm``, ``F.scaled_mm``'s op,
    ``_scaled_grouped_mm``), an op that calls another such op (an ``.out`` variant) counted once: the outermost."""
    calls = sorted(
        (e.get("tid"), float(e.get("ts", 0)), float(e.get("dur", 0)))
        for e in events
        if e.get("cat") == "cpu_op" and "scaled_mm" in e.get("name", "")
    )
    count = 0
    end_of: dict[Any, float] = {}  # per thread: where the outermost call being counted ends
    for tid, ts, dur in calls:
        if ts < end_of.get(tid, -1.0):
            continue  # inside the previous call
        count += 1
        end_of[tid] = ts + dur
    return count


def _compiled(recipe: str, args: argparse.Namespace) -> bool:
    """Whether a quantised recipe's run compiled its blocks (``--set train.compile=blocks``)."""
    return recipe not in HIGH_PRECISION and "train.compile=blocks" in args.set


def gemm_path(counts: dict[str, int] | None, device: dict[str, Any], compiled: bool = False) -> str:
    """Which GEMM path ran, in words, from ``gemm_counts`` of the profiled step. ``compiled``: the run compiled its
    blocks, whose quantised linears run inside compiled graphs, out of the trace's sight (their scaled-mm calls
    are still seen)."""
    cap = device.get("capability")
    where = device["device"] if cap is None else f"{device['device']} (sm{cap[0]}{cap[1]})"
    if counts is None:
        return "unknown (no profiled step)"
    if counts["quantized_linears"] == 0 and compiled:
        native = counts["native_scaled_mm"]
        seen = f"{native} native scaled-mm calls/step" if native else "no native scaled-mm call (emulated, or none)"
        return f"compiled blocks on {where}: {seen}; the quantised linears are not visible in the trace"
    if counts["quantized_linears"] == 0:
        return "high precision (no quantised GEMMs)"
    native, total = counts["native_scaled_mm"], counts["quantized_gemms"]
    if native == 0:
        return f"emulated on {where}: quantise, dequantise, fp32 GEMM ({total} GEMMs/step)"
    if native >= total:
        return f"native scaled-mm on {where} ({native}/{total} GEMMs/step)"
    return f"mixed on {where}: {native}/{total} GEMMs/step native scaled-mm, the rest emulated"


def collect(
    recipe: str,
    run_dir: Path,
    steps: int,
    attempt: Attempt,
    device: dict[str, Any],
    args: argparse.Namespace,
    previous: dict[str, Any] | None,
) -> dict[str, Any]:
    """The run's ``result.json``: status, per-step curves, timings and the GEMM path. ``previous``: the result of
    an unfinished attempt this one resumed (its GEMM count and time carry over)."""
    records = read_metrics(run_dir, steps)
    done = records[-1]["step"] if records else 0
    ok = done >= steps
    if ok:
        status, reason = "ok", ""
    elif attempt.stopped == "timeout":
        status, reason = (
            "failed",
            f"stopped by --timeout/--budget after {attempt.wall_s:.0f} s at step {done} of {steps}",
        )
    else:
        status = "failed"
        reason = attempt.error or f"exit code {attempt.returncode} at step {done} of {steps}"
    counts = gemm_counts(run_dir)
    resumed = previous if previous is not None and attempt.resumed_from > 0 else None
    if counts is None and resumed is not None:
        counts = resumed.get("gemm_counts")  # profiled before the stop
    wall = attempt.wall_s + (resumed["wall_s"] if resumed is not None else 0.0)
    result: dict[str, Any] = {
        "recipe": recipe,
        "status": status,
        "reason": reason,
        "steps": steps,
        "steps_done": done,
        "settings": settings(args),
        "device": device,
        "returncode": attempt.returncode,
        "resumed_from": attempt.resumed_from,
        "wall_s": round(wall, 2),
        "train_s": attempt.train_s,
        "gemm_counts": counts,
        "gemm_path": gemm_path(counts, device, compiled=_compiled(recipe, args)) if counts is not None or ok else "-",
        "gemm_warnings": attempt.warnings,
        "loss": [[r["step"], r.get("loss")] for r in records],
        "eval_loss": [[r["step"], r["eval_loss"]] for r in records if r.get("eval_loss") is not None],
        "tokens_per_s": [[r["step"], r.get("tokens_per_s")] for r in records],
        "memory_gb": max((_num(r.get("memory_gb")) for r in records), default=float("nan")),
        "skipped_steps": sum(1 for r in records if r.get("skipped")),
    }
    if ok and not args.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    trace = run_dir / "profile" / "rank0" / "trace.json"
    if trace.exists():
        trace.unlink()  # counted; tens of MB on a GPU (top_ops.txt stays)
    return result


def warmup_steps(args: argparse.Namespace) -> int:
    """``--warmup``, at most a tenth of the schedule (at least 1)."""
    return int(min(args.warmup, max(args.schedule_steps // 10, 1)))


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What must match for a finished run to be reused."""
    keys = ("preset", "device", "seq_len", "global_batch", "micro_batch", "seed", "lr", "tokenizer")
    out = {k: getattr(args, k) for k in keys} | {"warmup": warmup_steps(args)}
    out |= {"schedule_steps": args.schedule_steps, "source": args.source, "max_tokens": args.max_tokens}
    return out | {"set": list(args.set)}


def load_result(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


# ----------------------------------------------------------------------------------------------------- summary


def running_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start); non-finite values are left out of the means."""
    out, total, count = [], 0.0, 0
    finite = [v if math.isfinite(v) else None for v in values]
    for i, v in enumerate(finite):
        if v is not None:
            total, count = total + v, count + 1
        old = finite[i - window] if i >= window else None
        if old is not None:
            total, count = total - old, count - 1
        out.append(total / count if count else float("nan"))
    return out


def window_mean(curve: dict[int, float], steps: range) -> float:
    """Mean of the finite losses of ``curve`` at ``steps`` (NaN when none)."""
    values = [curve[s] for s in steps if s in curve and math.isfinite(curve[s])]
    return sum(values) / len(values) if values else float("nan")


def summarize(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Per recipe: final loss, difference to bf16 over the same steps, eval, tokens/s, memory, wall, GEMM path."""
    base = results.get(BASELINE)
    base_ok = base is not None and base["status"] == "ok"
    base_loss = {s: _num(v) for s, v in base["loss"]} if base_ok and base else {}
    base_eval = {s: _num(v) for s, v in base["eval_loss"]} if base_ok and base else {}
    rows: dict[str, Any] = {}
    for name, r in results.items():
        loss = {s: _num(v) for s, v in r["loss"]}
        done = r["steps_done"]
        window = range(max(1, done - FINAL_WINDOW + 1), done + 1)
        final = window_mean(loss, window)
        base_final = window_mean(base_loss, window) if base_loss else float("nan")
        skip = min(args.warmup_skip, max(len(r["tokens_per_s"]) // 2, 0))
        profiled = profiled_step(args, r["steps"])
        speeds = [_num(v) for s, v in r["tokens_per_s"] if s > skip and s != profiled and v is not None]
        last_eval = r["eval_loss"][-1] if r["eval_loss"] else None
        row: dict[str, Any] = {
            "status": r["status"],
            "reason": r["reason"],
            "steps": r["steps"],
            "steps_done": done,
            "final_loss": final,
            "final_window": [window.start, window.stop - 1] if done else None,
            "diff_to_bf16": final - base_final,
            "rel_diff_to_bf16": (final - base_final) / base_final if base_final else float("nan"),
            "eval_step": last_eval[0] if last_eval else None,
            "eval_loss": _num(last_eval[1]) if last_eval else float("nan"),
            "eval_diff_to_bf16": _num(last_eval[1]) - base_eval.get(last_eval[0], float("nan"))
            if last_eval
            else float("nan"),
            "tokens_per_s_median": statistics.median(speeds) if speeds else float("nan"),
            "s_per_step": args.global_batch * args.seq_len / statistics.median(speeds) if speeds else float("nan"),
            "peak_memory_gb": r["memory_gb"],
            "wall_s": r["wall_s"],
            "train_s": r["train_s"],
            "skipped_steps": r["skipped_steps"],
            "nonfinite_losses": sum(1 for v in loss.values() if not math.isfinite(v)),
            "gemm_path": r["gemm_path"],
            "gemm_counts": r["gemm_counts"],
            "gemm_warnings": r["gemm_warnings"],
        }
        rows[name] = row
    device = next(iter(results.values()))["device"] if results else {}
    return {"settings": settings(args), "device": device, "baseline": BASELINE, "recipes": rows}


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def summary_markdown(summary: dict[str, Any]) -> str:
    s, d = summary["settings"], summary["device"]
    lines = [
        "# Loss curves by precision recipe",
        "",
        f"Model preset `{s['preset']}`, seq {s['seq_len']} x global batch {s['global_batch']}, seed {s['seed']}, "
        f"lr {s['lr']} (cosine over {s['schedule_steps']} steps, warm-up {s['warmup']}), data `{s['source']}` "
        f"(tokenizer `{s['tokenizer']}`); {d.get('device')} (torch {d.get('torch')}, "
        f"MCORE_PRECISION_KERNELS={d.get('MCORE_PRECISION_KERNELS')}).",
        f"Final loss: mean of the last {FINAL_WINDOW} steps; the difference to bf16 is over the same steps "
        "(every run follows the same schedule). Tokens/s: median after warm-up, the profiled step left out.",
        "",
        "| recipe | status | steps | final loss | vs bf16 | eval loss (step) | eval vs bf16 | tokens/s | s/step "
        "| peak GB | wall s | skipped | GEMM path |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["recipes"].items():
        rel = r["rel_diff_to_bf16"]
        diff = f"{_fmt(r['diff_to_bf16'], '+.4f')} ({_fmt(100 * rel if math.isfinite(rel) else rel, '+.2f')}%)"
        lines.append(
            f"| `{name}` | {r['status']} | {r['steps_done']}/{r['steps']} | {_fmt(r['final_loss'], '.4f')} | {diff} "
            f"| {_fmt(r['eval_loss'], '.4f')} ({r['eval_step'] or '-'}) | {_fmt(r['eval_diff_to_bf16'], '+.4f')} "
            f"| {_fmt(r['tokens_per_s_median'], ',.0f')} | {_fmt(r['s_per_step'], '.3f')} "
            f"| {_fmt(r['peak_memory_gb'], '.2f')} | {_fmt(r['wall_s'], '.0f')} | {r['skipped_steps']} | {r['gemm_path']} |"
        )
    failed = {n: r for n, r in summary["recipes"].items() if r["status"] != "ok"}
    if failed:
        lines += ["", "Failed:", ""] + [f"- `{n}`: {r['reason']}" for n, r in failed.items()]
    warned = {n: r["gemm_warnings"] for n, r in summary["recipes"].items() if r["gemm_warnings"]}
    if warned:
        lines += ["", "GEMM fallbacks warned:", ""] + [f"- `{n}`: {'; '.join(w)}" for n, w in warned.items()]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, Any]], out: Path, window: int) -> None:
    """``loss_curves.png``: raw (faint) and smoothed losses on one axis; below, smoothed minus bf16's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    curves = {n: r["loss"] for n, r in results.items() if r["loss"]}
    smooth: dict[str, dict[int, float]] = {}
    high: list[float] = []  # smoothed values: the top of the axis
    low: list[float] = []  # raw values: its bottom
    for i, (name, points) in enumerate(curves.items()):
        steps = [s for s, _ in points]
        values = [_num(v) for _, v in points]
        mean = running_mean(values, window)
        smooth[name] = dict(zip(steps, mean, strict=True))
        color = f"C{i % 10}"
        top.plot(steps, values, color=color, alpha=0.2, linewidth=0.6)
        label = name if results[name]["status"] == "ok" else f"{name} ({results[name]['status']})"
        top.plot(steps, mean, color=color, linewidth=1.4, label=label)
        late = max(steps) // 10  # the first tenth (the fall from ln(vocab)) may leave the axis
        high += [v for s, v in zip(steps, mean, strict=True) if s > late and math.isfinite(v)]
        low += [v for s, v in zip(steps, values, strict=True) if s > late and math.isfinite(v)]
    if high and low:
        pad = 0.05 * (max(high) - min(low) + 1e-3)
        top.set_ylim(min(low) - pad, max(high) + pad)
    top.set_ylabel("training loss")
    top.set_title(f"loss by precision recipe (running mean over {window} steps; raw faint)")
    top.legend(loc="upper right", fontsize=8)
    top.grid(alpha=0.3)
    base = smooth.get(BASELINE)
    if base is not None:
        for i, name in enumerate(curves):
            if name == BASELINE:
                continue
            common = [s for s in smooth[name] if s in base]
            bottom.plot(common, [smooth[name][s] - base[s] for s in common], color=f"C{i % 10}", label=name)
        bottom.axhline(0.0, color="black", linewidth=0.8)
        bottom.set_ylabel(f"loss - {BASELINE} (smoothed)")
    else:
        bottom.text(0.5, 0.5, f"no {BASELINE} run to compare with", ha="center", transform=bottom.transAxes)
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        out: Path = args.out
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.resume_runs:
            raise UsageError(
                f"--out {out}: exists and is not empty; give a new directory, or --resume-runs to reuse it"
            )
        registered = registered_recipes()
        recipes = args.recipes.split(",") if args.recipes else registered
        if BASELINE in recipes:  # the baseline first: the others are compared with it as they finish
            recipes = [BASELINE] + [r for r in recipes if r != BASELINE]
        args.steps_of, args.schedule_steps = recipe_steps(args, recipes)
    except UsageError as exc:
        print(f"loss_curves: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        device = describe_device(args.device)
        data, tokenizer = prepare_data(args)
    except subprocess.CalledProcessError as exc:
        print(
            f"loss_curves: {' '.join(map(str, exc.cmd[1:4]))} failed with exit code {exc.returncode}", file=sys.stderr
        )
        return 1
    results: dict[str, dict[str, Any]] = {}
    for recipe in recipes:
        run_dir = out / recipe
        steps = args.steps_of[recipe]
        if recipe not in registered:
            reason = f"not a registered precision recipe (registered: {', '.join(registered)})"
            results[recipe] = not_run(recipe, steps, device, args, reason, status="failed")
            print(f"[{recipe}] failed: {reason}", flush=True)
            continue
        previous = load_result(run_dir) if args.resume_runs else None
        if (
            previous
            and previous["status"] == "ok"
            and previous["settings"] == settings(args)
            and previous["steps"] == steps
        ):
            print(f"[{recipe}] reusing the finished run in {run_dir}", flush=True)
            results[recipe] = previous
            continue
        left = None if args.budget is None else args.budget - (time.monotonic() - started)
        if left is not None and left < 30:
            results[recipe] = not_run(recipe, steps, device, args, "not started: --budget spent")
            print(f"[{recipe}] not started: --budget spent", flush=True)
            continue
        timeout = args.timeout if left is None else min(args.timeout, left)
        cmd = train_command(args, recipe, run_dir, data, tokenizer)
        if previous is not None and previous["settings"] != settings(args):
            cmd.append("--train.overwrite=true")  # another experiment's run: moved aside by mcore, then fresh
        print(f"[{recipe}] {steps} steps -> {run_dir}", flush=True)
        stop_at = steps if steps < args.schedule_steps else None
        attempt = run_once(cmd, run_dir, stop_at, timeout, args.grace)
        result = collect(recipe, run_dir, steps, attempt, device, args, previous)
        (run_dir / "result.json").write_text(json.dumps(_json_safe(result)) + "\n")
        results[recipe] = result
        note = result["reason"] or result["gemm_path"]
        print(f"[{recipe}] {result['status']} in {attempt.wall_s:.0f} s: {note}", flush=True)
    for extra in sorted(p for p in out.iterdir() if p.is_dir() and p.name not in results):  # carried-in results
        found = load_result(extra)
        if found is not None and found.get("settings") == settings(args):
            results[extra.name] = found
    summary = summarize(results, args)
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    plot(results, out, args.smooth)
    print(summary_markdown(summary))
    print(f"wrote {out / 'loss_curves.png'}, {out / 'summary.json'}, {out / 'summary.md'}")
    return 0 if all(r["status"] == "ok" for r in summary["recipes"].values()) else 1


def not_run(
    recipe: str, steps: int, device: dict[str, Any], args: argparse.Namespace, reason: str, status: str = "not run"
) -> dict[str, Any]:
    """The result of a recipe that did not run (``status`` "not run" or "failed")."""
    return {
        "recipe": recipe,
        "status": status,
        "reason": reason,
        "steps": steps,
        "steps_done": 0,
        "settings": settings(args),
        "device": device,
        "wall_s": 0.0,
        "train_s": None,
        "gemm_counts": None,
        "gemm_path": "-",
        "gemm_warnings": [],
        "loss": [],
        "eval_loss": [],
        "tokens_per_s": [],
        "memory_gb": float("nan"),
        "skipped_steps": 0,
    }


if __name__ == "__main__":
    sys.exit(main())
