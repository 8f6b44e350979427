"""``bench_serving.py`` (mcore-inference's serving benchmarks) runs end to end on the CPU (``--quick``): every section
gives its result lines (no section failed), the engine produced exactly the tokens the workload asked for (as HF's
fixed batches did), the numbers are finite and positive, and bad arguments end with one line and exit code 2.

An integration test: the benchmark builds mcore-models' presets (and HF's Llama when ``transformers`` imports)."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).parents[1] / "plugins" / "mcore-inference" / "benchmarks" / "bench_serving.py"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_")} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@functools.cache
def _bench() -> ModuleType:
    sys.path.insert(0, str(SCRIPT.parent))  # bench_serving imports bench_decode from its folder
    try:
        spec = importlib.util.spec_from_file_location("bench_serving", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_serving"] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPT.parent))


def _finite_positive(row: dict[str, object], *keys: str) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


def test_quick_run_gives_every_section(tmp_path: Path) -> None:
    out = tmp_path / "serving.jsonl"
    proc = _run("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["config"] and lines[0]["torch"] and lines[0]["device"] == "cpu" and lines[0]["date"]
    rows = lines[1:]
    assert not [r for r in rows if "error" in r]
    assert all(r["card"] == "cpu" and r["torch"] == lines[0]["torch"] and r["date"] for r in rows)
    by = {(r["section"], r["candidate"]) for r in rows if "candidate" in r}
    assert {("workload", "engine"), ("prefix", "ttft"), ("prefix", "zero-hit-cost")} <= by
    ours = next(r for r in rows if r["section"] == "workload" and r["candidate"] == "engine")
    _finite_positive(ours, "output_tok_s", "ttft_mean_ms", "ttft_p99_ms", "itl_mean_ms", "itl_p99_ms")
    assert ours["ttft_p99_ms"] >= ours["ttft_mean_ms"] * 0.999
    if importlib.util.find_spec("transformers") is not None:
        hf = next(r for r in rows if r["section"] == "workload" and r["candidate"].startswith("hf-generate"))
        assert hf["output_tokens"] == ours["output_tokens"]  # both: exactly the tokens the requests asked for
    prefix = next(r for r in rows if r["candidate"] == "ttft")
    _finite_positive(prefix, "miss_ms", "hit_ms", "speedup")
    cost = next(r for r in rows if r["candidate"] == "zero-hit-cost")
    _finite_positive(cost, "on_tok_s", "off_tok_s", "on_over_off")
    server = next(r for r in rows if r["section"] == "server")
    _finite_positive(server, "engine_tok_s", "server_tok_s", "server_over_engine")
    assert "| server | tiny |" in proc.stdout and "| prefix | tiny |" in proc.stdout


def test_workload_lengths_fit_their_ranges_and_the_context() -> None:
    bench = _bench()
    reqs = bench.make_workload(
        200, vocab=50, context=300, prompt_range=(32, 2048), output_range=(16, 512), rate=4.0, seed=1
    )
    assert len(reqs) == 200
    assert all(32 <= len(r.prompt) <= 298 and 1 <= r.max_tokens <= 512 for r in reqs)
    assert all(len(r.prompt) + r.max_tokens <= 300 for r in reqs)
    assert all(0 <= t < 50 for r in reqs for t in r.prompt)
    arrivals = [r.arrival for r in reqs]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0  # Poisson: increasing, mean gap 1/rate
    assert 0.15 < arrivals[-1] / 200 < 0.4
    again = bench.make_workload(
        200, vocab=50, context=300, prompt_range=(32, 2048), output_range=(16, 512), rate=4.0, seed=1
    )
    assert [r.prompt for r in again] == [r.prompt for r in reqs]  # seeded


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--sections", "nope"], "--sections"),
        (["--preset", "no-such-preset"], "--preset"),
        (["--rate", "0"], "--rate"),
        (["--prompt-range", "9..3"], "--prompt-range"),
        (["--clients", "0"], "--clients"),
        (["--context", "100000"], "--context"),
    ],
)
def test_bad_arguments_end_with_one_line(args: list[str], names: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _bench().parse(args)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and names in lines[0], lines


def test_bad_arguments_exit_2_from_the_command_line() -> None:
    proc = _run("--sections", "nope", timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["bench_serving: --sections 'nope': allowed workload, prefix, server"]


def test_a_failing_section_reports_and_the_others_go_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()

    def broken(*_: object) -> None:
        raise RuntimeError("boom in prefix")

    monkeypatch.setattr(bench, "section_prefix", broken)
    monkeypatch.setattr(bench, "section_workload", lambda model, args, lines, table: table.append("| workload | ok |"))
    assert bench.main(["--quick", "--sections", "prefix", "workload"]) == 1
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert rows[-1]["section"] == "prefix" and rows[-1]["error"] == "RuntimeError: boom in prefix"
    assert "| prefix | tiny | FAILED: RuntimeError: boom in prefix |" in out and "| workload | ok |" in out
