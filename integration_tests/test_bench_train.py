"""The training-step benchmark (``packages/mcore-core/benchmarks/bench_train.py``) on CPU.

It drives ``python -m mcore train`` with the models plugin's ``tiny`` preset, so it lives with the
integration tests. One smoke run of two variants (one failing) checks the numbers, the per-variant
environment and pre-run command, the failure report, ``--resume`` and the refusal of a used ``--out``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "packages" / "mcore-core" / "benchmarks" / "bench_train.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_train_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_parsing_and_stats(bench: ModuleType) -> None:
    v = bench.parse_variant("compiled=--train.compile=blocks --data.packing='concat'")
    assert (v.name, v.args) == ("compiled", ["--train.compile=blocks", "--data.packing=concat"])
    assert bench.parse_variant("plain=").args == []
    assert bench.parse_env("A=1,B=x=y") == {"A": "1", "B": "x=y"}
    with pytest.raises(ValueError, match="NAME=ARGS"):
        bench.parse_variant("--train.compile=blocks")
    with pytest.raises(ValueError, match="one of"):
        bench.parse_named("--env", "other:A=1", {"a", "b"})
    q = bench.quantiles([4.0, 1.0, 3.0, 2.0, 5.0])
    assert q == {"median": 3.0, "q1": 2.0, "q3": 4.0, "min": 1.0, "max": 5.0}
    assert bench.quantiles([7.0]) == {"median": 7.0, "q1": 7.0, "q3": 7.0, "min": 7.0, "max": 7.0}
    for bad in (["--warmup", "3"], ["--repeats", "0"], ["--baseline", "nope"], ["--timeout", "0"]):
        assert bench.main(["--quick", "--out", "/nonexistent/never-made", *bad]) == 2


def test_quick_smoke(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    for key in [k for k in os.environ if k.startswith("MCORE_")]:
        monkeypatch.delenv(key)
    out = tmp_path / "bench"
    marks = tmp_path / "marks.txt"
    argv = [
        "--quick",
        "--out",
        str(out),
        "--variant",
        "good=--data.packing=concat",
        "--variant",
        "bad=--train.no_such_key=1",
        "--env",
        "good:BT_MARK=hello",
        "--pre-run",
        f"good:echo $BT_MARK >> {marks}",
        "--timeout",
        "120",
    ]
    assert bench.main(argv) == 1  # one run failed
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    good, bad = lines
    assert good["variant"] == "good" and good["failed"] == 0 and good["steps"] == 2  # 3 steps, 1 warm-up
    assert 0 < good["step_s_min"] <= good["step_s_q1"] <= good["step_s_median"] <= good["step_s_q3"]
    assert good["step_s_q3"] <= good["step_s_max"] < 60
    assert good["tokens_per_step"] > 0
    assert good["tokens_per_s"] == pytest.approx(good["tokens_per_step"] / good["step_s_median"])
    assert good["peak_memory_gb"] > 0 and good["wall_s"] > good["step_s_max"]
    assert good["speedup"] == 1.0 and good["mem_ratio"] == 1.0
    assert bad["failed"] == 1 and "step_s_median" not in bad and "no_such_key" in bad["errors"][0]
    assert marks.read_text() == "hello\n"  # the env and the pre-run reached the good variant only
    table = (out / "summary.md").read_text()
    assert "| good |" in table and "| bad | - |" in table and "vs good" in table
    printed = capsys.readouterr().out
    assert printed.count('"variant"') == 2 and "| variant |" in printed

    # a used --out is refused; --resume reads the finished runs back without running them again
    assert bench.main(argv) == 2
    log = out / "r00" / "good" / "train.log"
    before = log.stat().st_mtime_ns
    assert bench.main([*argv, "--resume"]) == 1
    assert log.stat().st_mtime_ns == before and marks.read_text() == "hello\n"
    again = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert again[0]["step_s_median"] == good["step_s_median"]

    # a run cut off midway (no done.json) starts over under --resume
    (out / "r00" / "bad" / "done.json").unlink()
    (out / "r00" / "bad" / "leftover").write_text("x")
    assert bench.main([*argv, "--resume"]) == 1
    assert not (out / "r00" / "bad" / "leftover").exists() and (out / "r00" / "bad" / "done.json").is_file()

    # a run past --timeout is killed and reported
    slow = ["--quick", "--out", str(tmp_path / "slow"), "--variant", "slow=", "--timeout", "1"]
    assert bench.main(slow) == 1
    (result,) = [json.loads(x) for x in (tmp_path / "slow" / "results.jsonl").read_text().splitlines()]
    assert result["failed"] == 1 and "timeout after 1 s" in result["errors"][0]


def test_every_built_in_suite_resolves_through_mcore_config(bench: ModuleType, capsys) -> None:
    """A suite is run on the GPU machine, whose time is scarce: each variant's command line (common args, then
    its own) must be a configuration ``mcore config`` accepts here (known keys, registered recipes and
    layouts, values in range), and its baseline one of its variants."""
    from mcore.cli import main as mcore_main

    for name in bench.SUITES:
        args = bench.build_parser().parse_args(["--suite", name, "--warmup", "1", "--out", "/nonexistent/never-made"])
        common, variants, baseline, *_ = bench.resolve(args)
        assert baseline in {v.name for v in variants}, name
        for variant in variants:
            code = mcore_main(["config", *common, *variant.args])
            assert code == 0, (name, variant.name, capsys.readouterr().err[-500:])
        capsys.readouterr()
