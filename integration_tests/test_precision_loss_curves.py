"""mcore-precision's loss-curve runner (``benchmarks/loss_curves.py``) end to end on CPU: the ``tiny`` gpt preset,
bf16 for 4 steps and fp8-current for 3 (stopped by SIGTERM inside bf16's 4-step schedule), a recipe that does not
exist; then its refusal of a used ``--out`` and its reuse of finished runs. It needs mcore-models (the model), so it
lives here rather than in mcore-precision's own tests."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).parents[1] / "plugins" / "mcore-precision" / "benchmarks" / "loss_curves.py"
ARGS = ["--device", "cpu", "--preset", "tiny", "--steps", "3", "--recipe-steps", "bf16=4", "--seq-len", "64"]
ARGS += ["--max-tokens", "100000", "--cpu-threads", "1", "--eval-every", "2", "--profile-step", "2"]


def _runner() -> ModuleType:
    """The script as a module (registered under its name: its dataclasses look their module up)."""
    if "loss_curves" not in sys.modules:
        spec = importlib.util.spec_from_file_location("loss_curves", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["loss_curves"] = module
        spec.loader.exec_module(module)
    return sys.modules["loss_curves"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("curves") / "out"
    return out, _run("--out", str(out), "--recipes", "bf16,fp8-current,no-such-recipe", *ARGS)


def test_runner_writes_curves_and_summary_and_reports_the_bad_recipe(
    runs: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, proc = runs
    assert proc.returncode == 1, proc.stderr  # a recipe failed; the others ran
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    recipes = summary["recipes"]
    assert list(recipes) == ["bf16", "fp8-current", "no-such-recipe"]
    bad = recipes["no-such-recipe"]
    assert bad["status"] == "failed" and "not a registered precision recipe" in bad["reason"]
    results = {name: json.loads((out / name / "result.json").read_text()) for name in ("bf16", "fp8-current")}
    for name, steps in (("bf16", 4), ("fp8-current", 3)):
        row, result = recipes[name], results[name]
        assert row["status"] == "ok" and row["steps_done"] == steps, row
        losses = [loss for _, loss in result["loss"]]
        assert [s for s, _ in result["loss"]] == list(range(1, steps + 1))  # fp8's 4th step (after SIGTERM) cut
        assert all(math.isfinite(v) for v in losses) and math.isfinite(row["final_loss"])
        assert row["final_loss"] == pytest.approx(sum(losses) / steps, rel=1e-12)
        assert row["eval_step"] == 2 * (steps // 2) and math.isfinite(row["eval_loss"])
        assert row["tokens_per_s_median"] > 0 and row["peak_memory_gb"] > 0
        assert not (out / name / "checkpoints").exists()  # finished: checkpoints removed
    # the same data order and schedule: the difference is over bf16's own steps 1..3
    bf16_first3 = [loss for step, loss in results["bf16"]["loss"] if step <= 3]
    diff = recipes["fp8-current"]["final_loss"] - sum(bf16_first3) / 3
    assert recipes["fp8-current"]["diff_to_bf16"] == pytest.approx(diff, rel=1e-9)
    assert recipes["bf16"]["diff_to_bf16"] == 0.0
    assert abs(diff) < 0.05  # step-1 losses of one init agree; FP8 rounding moves the next ones a little
    # the profiled step: tiny has 2 layers x 7 matrix linears; on CPU every FP8 GEMM is emulated
    assert results["fp8-current"]["gemm_counts"] == {
        "quantized_linears": 14,
        "quantized_gemms": 42,
        "native_scaled_mm": 0,
    }
    assert recipes["fp8-current"]["gemm_path"].startswith("emulated on cpu")
    assert recipes["bf16"]["gemm_path"] == "high precision (no quantised GEMMs)"
    table = (out / "summary.md").read_text()
    assert "| `fp8-current` | ok | 3/3 |" in table and "- `no-such-recipe`: not a registered" in table


def test_used_out_is_refused_then_reused_with_resume_runs(runs: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = runs
    refused = _run("--out", str(out), "--recipes", "bf16", *ARGS)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and f"--out {out}: exists and is not empty" in refused.stderr
    before = (out / "bf16" / "result.json").read_text()
    again = _run("--out", str(out), "--recipes", "bf16,fp8-current", "--resume-runs", *ARGS)
    assert again.returncode == 0, again.stderr
    assert "[bf16] reusing the finished run" in again.stdout and "[fp8-current] reusing" in again.stdout
    assert (out / "bf16" / "result.json").read_text() == before
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["recipes"]) == {"bf16", "fp8-current"}  # the failed recipe's folder holds no result


def test_running_mean_window_and_gemm_path_words() -> None:
    lc = _runner()
    nan = float("nan")
    got = lc.running_mean([1.0, 2.0, 3.0, nan, 5.0], 2)
    assert got == [1.0, 1.5, 2.5, 3.0, 5.0]
    assert math.isnan(lc.running_mean([nan], 3)[0])
    assert lc.window_mean({1: 1.0, 2: nan, 3: 4.0}, range(1, 4)) == 2.5
    gpu = {"device": "NVIDIA H200", "capability": [9, 0]}
    path = lc.gemm_path
    assert path({"quantized_linears": 2, "quantized_gemms": 6, "native_scaled_mm": 6}, gpu).startswith(
        "native scaled-mm on NVIDIA H200 (sm90) (6/6"
    )
    assert path({"quantized_linears": 2, "quantized_gemms": 6, "native_scaled_mm": 2}, gpu).startswith("mixed")
    assert path({"quantized_linears": 2, "quantized_gemms": 6, "native_scaled_mm": 0}, gpu).startswith("emulated")
    assert path(None, gpu).startswith("unknown")
    # compiled blocks hide the quantised linears from the trace; their scaled-mm calls stay in sight
    compiled = {"quantized_linears": 0, "quantized_gemms": 0, "native_scaled_mm": 252}
    assert path(compiled, gpu, compiled=True).startswith("compiled blocks on NVIDIA H200 (sm90): 252 native")
    none = {"quantized_linears": 0, "quantized_gemms": 0, "native_scaled_mm": 0}
    assert "no native scaled-mm call" in path(none, gpu, compiled=True)
    assert path(none, gpu) == "high precision (no quantised GEMMs)"


def test_scaled_mm_calls_are_counted_once_when_nested() -> None:
    lc = _runner()
    op = {"cat": "cpu_op", "tid": 1}
    events = [
        {**op, "name": "aten::_scaled_mm", "ts": 0, "dur": 10},
        {**op, "name": "aten::_scaled_mm_out", "ts": 2, "dur": 5},  # called by the one above
        {**op, "name": "aten::_scaled_mm", "ts": 20, "dur": 10},
        {**op, "name": "aten::_scaled_dot_product_flash_attention", "ts": 40, "dur": 10},
        {"cat": "kernel", "name": "scaled_mm_kernel", "tid": 7, "ts": 3, "dur": 1},  # device side: not an op
        {**op, "tid": 2, "name": "aten::_scaled_mm", "ts": 3, "dur": 1},  # another thread
    ]
    assert lc.count_scaled_mm(events) == 3


def test_metrics_tail_reads_whole_records_only(tmp_path: Path) -> None:
    lc = _runner()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n')
    tail = lc.MetricsTail(metrics)  # what was there before the run started does not count
    assert tail.poll() == 0
    with metrics.open("a") as f:
        f.write('{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    assert tail.poll() == 2
    with metrics.open("a") as f:
        f.write('ss": 1.8}\n')
    assert tail.poll() == 3


def test_recipe_steps_and_the_shared_schedule() -> None:
    lc = _runner()
    args = lc.parse_args(["--out", "x"])
    steps, schedule = lc.recipe_steps(args, ["bf16", "fp16", "nvfp4"])
    assert steps == {"bf16": 1000, "fp16": 300, "nvfp4": 1000} and schedule == 1000
    steps, schedule = lc.recipe_steps(args, ["fp16", "fp8-delayed"])  # short recipes alone: still 1000's schedule
    assert steps == {"fp16": 300, "fp8-delayed": 300} and schedule == 1000
    with pytest.raises(lc.UsageError, match="--recipe-steps 'bf16=x'"):
        lc.recipe_steps(lc.parse_args(["--out", "x", "--recipe-steps", "bf16=x"]), ["bf16"])
