"""The issue-23 scaling driver (``benchmarks/scaling/run.py``) on the CPU: its commands name real scripts and flags
those scripts accept, bad input is one line with exit code 2, and the time budget skips (and reports) steps.

Why here: the driver runs only when a multi-GPU machine is lent, for minutes; a wrong flag or path found then
costs a row. Every check below is what can be checked without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from mcore_models.presets import preset_config
from mcore_moe.presets import MOE_BENCH

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "benchmarks" / "scaling" / "run.py"


def _driver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scaling_run", DRIVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaling_run"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


run = _driver()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(DRIVER), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def _script_and_args(argv: list[str]) -> tuple[str, list[str]] | None:
    """The repo script a step launches and its arguments (None for pytest and ``-m mcore`` steps)."""
    if "pytest" in argv:
        return None
    for i, a in enumerate(argv):
        if a.endswith(".py") and "::" not in a and not a.startswith("-"):
            return a, argv[i + 1 :]
    return None


def test_dry_run_prints_every_row_and_every_path_it_names_exists() -> None:
    done = _cli("--dry-run", "--gpus", "8", "--out", "/nonexistent/scaling")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for row in run.ROWS:
        assert any(line.startswith(f"[{row}/") for line in lines), (row, done.stdout)
    assert not any("skipped" in line for line in lines), done.stdout  # 8 GPUs: every size 1..8 fits
    assert not Path("/nonexistent/scaling").exists()
    steps = run.build_steps(list(run.ROWS), 8, Path("/tmp/unused"))
    assert len(lines) == len(steps) >= 20
    named = 0
    for step in steps:
        for arg in step.argv:
            path = arg.split("::")[0]
            if path.endswith(".py") and not path.startswith("-"):
                assert (ROOT / path).is_file(), (step.name, path)
                named += 1
                if "::" in arg:  # a pytest node: the test function is in that file
                    assert f"def {arg.split('::')[1]}(" in (ROOT / path).read_text(), arg
    assert named >= len(steps) - 1  # all but the e2e row (``-m mcore``) name a file


class _Parsed(Exception):
    def __init__(self, namespace: Any) -> None:
        self.namespace = namespace


def test_every_benchmark_flag_the_driver_passes_is_accepted_by_that_script(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each script runs as ``__main__`` with the driver's arguments up to its own ``parse_args``, which is stopped
    there: an unknown flag or a value outside ``choices`` / of the wrong type ends in argparse's exit 2."""
    original = argparse.ArgumentParser.parse_args

    def stop_after_parsing(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop_after_parsing)
    monkeypatch.setattr(argparse.ArgumentParser, "exit", lambda self, status=0, message=None: pytest.fail(f"{self.prog}: {message}"))  # fmt: skip
    seen: set[tuple[str, ...]] = set()
    for gpus in (8, 2):
        for step in run.build_steps(list(run.ROWS), gpus, Path("/tmp/unused")):
            found = _script_and_args(step.argv)
            if found is None or step.skip:
                continue
            script, args = found
            if (script, *args) in seen:
                continue
            seen.add((script, *args))
            monkeypatch.setattr(sys, "argv", [script, *args])
            with pytest.raises(_Parsed) as parsed:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            ns = vars(parsed.value.namespace)
            for a in args:  # every flag given is one of the parser's (abbreviations would hide a typo)
                if a.startswith("--"):
                    assert a[2:].replace("-", "_") in ns, (script, a)
            if script in (run.MULTI, run.PP):  # a free-form --model: a gpt preset that exists
                assert preset_config(ns["model"]).num_layers > 0, (script, ns["model"])
            if script == run.EP_MULTI:  # the moe-bench preset's moe layer
                v = MOE_BENCH.values
                assert (ns["hidden"], ns["experts"], ns["top_k"], ns["ffn"]) == (
                    v["hidden_size"], v["moe"]["num_experts"], v["moe"]["top_k"], v["moe"]["moe_ffn_hidden_size"])  # fmt: skip
    assert {s[0] for s in seen} == {run.FSDP, run.MULTI, run.CP_MULTI, run.CP_BALANCE, run.PP, run.EP_MULTI}


def test_e2e_command_line_resolves_as_mcore_train_would(tmp_path: Path) -> None:
    (step,) = run.build_steps(["e2e"], 8, tmp_path)
    i = step.argv.index("-m", step.argv.index("--nproc-per-node=8"))
    assert step.argv[i + 1 : i + 3] == ["mcore", "train"]
    overrides = step.argv[i + 3 :]
    done = subprocess.run([sys.executable, "-m", "mcore", "config", *overrides], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'preset = "llama3-8b"' in done.stdout and "steps = 200" in done.stdout


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (("--rows", "fsdp,nope", "--dry-run"), "run.py: error: --rows 'fsdp,nope': unknown row nope; known: fsdp, tp"),
        (("--gpus", "0", "--rows", "tp"), "run.py: error: --gpus 0: no GPU to run on"),
        (("--limit-s", "0", "--dry-run"), "run.py: error: --limit-s 0: must be > 0"),
        (
            ("--rows", "ep", "--only", "ep3", "--gpus", "8", "--dry-run"),
            "run.py: error: --only 'ep3': no step ep3 in rows ep; known: ep1, ep2",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: tuple[str, ...], start: str, tmp_path: Path) -> None:
    done = _cli(*args, "--out", str(tmp_path / "o"))
    assert done.returncode == 2, done
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1 and done.stderr.startswith(start), done.stderr
    assert not (tmp_path / "o").exists()


def test_only_runs_the_named_steps() -> None:
    done = _cli("--rows", "ep,cp", "--only", "ep2,balance", "--gpus", "8", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()] == ["[ep/ep2]", "[cp/balance]"]


def test_sizes_that_do_not_fit_the_gpu_count_are_skipped_with_a_reason() -> None:
    steps = {s.name: s for s in run.build_steps(["tp", "fsdp", "ep"], 6, Path("/tmp/unused"))}
    assert steps["tp2"].skip is None and steps["tp6"].skip is None
    assert steps["tp4"].skip == "4 does not divide the GPU count 6"
    assert steps["tp8"].skip == "needs 8 GPUs, --gpus is 6"
    assert steps["ep1"].skip is None and steps["hsdp2x3_bench-0.9b"].skip is None
    assert run.build_steps(["fsdp"], 2, Path("/tmp/unused"))[-1].skip.startswith("hsdp 2 x M needs an even GPU")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_time_budget_skips_a_step_and_a_step_past_its_limit_is_killed_whole(tmp_path: Path) -> None:
    py = sys.executable
    quick = (
        'import json; print("warming up"); print(json.dumps({"impl": "a", "step_ms": 1.5, "mfu": 0.4})); '
        'print(json.dumps({"arm": "b", "status": "not available: no"})); print(json.dumps({"bench": "header"}))'
    )
    hang = (  # a launcher whose worker sits in a session of its own, as torchrun's may
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True); "
        "print('worker', p.pid, flush=True); time.sleep(120)"
    )
    steps = [
        run.Step("r1", "quick", [py, "-c", quick], limit_s=20),
        run.Step("r1", "too_long", [py, "-c", "pass"], limit_s=1000),
        run.Step("r2", "hang", [py, "-c", hang], limit_s=3),
        run.Step("r2", "too_big", [py, "-c", "pass"], limit_s=1, skip="needs 8 GPUs, --gpus is 2"),
    ]
    t0 = time.monotonic()
    records = run.run_steps(steps, tmp_path, limit_s=30, echo=lambda s: None)
    assert time.monotonic() - t0 < 25
    by = {r["step"]: r for r in records}
    assert by["quick"]["rc"] == 0 and by["quick"]["skipped"] is None and by["quick"]["results"] == 3
    assert by["too_long"]["rc"] is None and by["too_long"]["skipped"].startswith("budget: ")
    assert "the step's limit is 1000 s" in by["too_long"]["skipped"]
    assert by["hang"]["timed_out"] is True and 3 <= by["hang"]["wall_s"] < 15
    assert by["too_big"]["skipped"] == "needs 8 GPUs, --gpus is 2" and by["too_big"]["rc"] is None
    log = (tmp_path / "r2" / "hang.log").read_text()
    (worker,) = [int(line.split()[1]) for line in log.splitlines() if line.startswith("worker ")]
    deadline = time.monotonic() + 5
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker), "the step's worker outlived the timeout"
    assert "killed after its limit of 3 s" in log
    lines = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == ["quick", "too_long", "hang", "too_big"]
    assert set(lines[0]) >= {"row", "step", "command", "rc", "wall_s", "skipped"}
    results = [json.loads(x) for x in (tmp_path / "r1" / "results.jsonl").read_text().splitlines()]
    assert results[0] == {"scaling_step": "quick", "impl": "a", "step_ms": 1.5, "mfu": 0.4} and len(results) == 3
    md = run.summary(records, tmp_path, "env text")
    assert md == (tmp_path / "summary.md").read_text()
    assert "## r1" in md and "## r2" in md and "| quick | 0 |" in md and "| hang | timeout |" in md
    assert "| quick | impl=a | step_ms=1.5, mfu=0.4 |" in md and "| quick | arm=b status=not available: no |  |" in md
    assert "header" not in md and "budget: " in md


def test_a_training_run_s_metrics_are_summarised_by_their_medians(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": i, "tokens_per_s": 100.0 if i <= 10 else 1000.0 + i % 3, "mfu": 0.5} for i in range(1, 31)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    step = run.Step("e2e", "train", [sys.executable, "-c", "pass"], limit_s=20, metrics_file=metrics)
    records = run.run_steps([step], tmp_path / "out", limit_s=60, echo=lambda s: None)
    assert records[0]["results"] == 30
    md = run.summary(records, tmp_path / "out", "env")
    assert "| train | median of 20 rows (first 10 left out) | mfu=0.5, tokens_per_s=1001 |" in md


def test_environment_record_names_torch_and_the_date_without_a_gpu() -> None:
    env = run.environment()
    assert env.startswith("date_utc: 20") and f"torch: {__import__('torch').__version__}" in env
    assert "nvidia-smi topo -m:" in env and os.linesep in env
