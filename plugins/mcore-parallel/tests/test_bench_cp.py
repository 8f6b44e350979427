"""The ``cp`` benchmarks run where CI runs: ``bench_cp.py --quick`` on CPU, ``bench_cp_multi.py --tiny`` on gloo ranks,
``bench_cp_balance.py --quick`` (plans only).

They are scripts, not modules of the package: loaded from their files. Each run must give one JSON line per
candidate/kind with times, and outputs that agree (every candidate computes the same attention).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch.distributed as dist

from mcore_testing.dist import distributed

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> tuple[dict, list[dict]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return lines[0], lines[1:]


def test_bench_cp_quick_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "cp.jsonl"
    assert _script("bench_cp").main(["--quick", "--out", str(out)]) == 0
    header, rows = _rows(out)
    assert header["config"] and header["device"] == "cpu"
    timed = {row["candidate"]: row for row in rows if "median_ms" in row}
    assert set(timed) == {"sdpa", "ring_cp1", "autograd_cp1"}
    for row in timed.values():
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"] and row["rel_err_vs_sdpa"] < 1e-5
    assert [row["status"] for row in rows if row["candidate"] == "flex_cp1"] == [
        "not available: FlexAttention's compiled kernel needs CUDA"
    ]


def test_bench_cp_balance_quick(tmp_path: Path) -> None:
    out = tmp_path / "balance.jsonl"
    assert _script("bench_cp_balance").main(["--quick", "--out", str(out)]) == 0
    header, rows = _rows(out)
    assert header["config"] and header["seq_len"] == 2048
    by = {(row["cp"], row["plan"]): row for row in rows}
    assert set(by) == {(cp, plan) for cp in (2, 4) for plan in ("static", "dynamic", "dynamic-work")}
    for cp in (2, 4):
        assert by[(cp, "static")]["needed_fraction"] == 1.0 > by[(cp, "dynamic")]["needed_fraction"]
        assert by[(cp, "dynamic")]["max_over_mean_tokens"] < 1.2
        assert by[(cp, "dynamic-work")]["max_over_mean_cost"] <= by[(cp, "dynamic")]["max_over_mean_cost"]


def _multi(tmp_path: Path, kinds: list[str], expect_refused: list[str]) -> None:
    out = tmp_path / "multi.jsonl"
    assert _script("bench_cp_multi").main(["--tiny", "--kinds", *kinds, "--out", str(out)]) == 0
    if dist.get_rank() != 0:
        return
    header, rows = _rows(out)
    assert header["world"] == dist.get_world_size()
    assert {row["seq"] for row in rows} == {16, 32}
    for row in rows:
        if row["kind"] in expect_refused:
            assert row["status"].startswith("not available: "), row
            continue
        assert row["tokens_per_s"] > 0 and row["min_ms"] <= row["median_ms"] <= row["max_ms"], row
        assert row[f"rel_err_vs_{kinds[0]}"] < 1e-5, row  # every kind computes the same attention


@distributed(world_size=2)
def test_bench_cp_multi_tiny_on_two_ranks(tmp_path: Path) -> None:
    _multi(tmp_path, ["ring", "a2a", "allgather", "a2a+ring"], expect_refused=["a2a+ring"])


@pytest.mark.slow
@distributed(world_size=4, timeout=240)
def test_bench_cp_multi_tiny_on_four_ranks_with_hybrid(tmp_path: Path) -> None:
    _multi(tmp_path, ["ring", "a2a+ring"], expect_refused=[])
