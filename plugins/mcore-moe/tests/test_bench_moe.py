"""The MoE benchmarks run where CI runs: ``bench_moe.py --quick`` on CPU, every candidate agreeing with the loop;
``bench_hash_balance.py --quick``, the balanced table never worse than round robin; ``bench_ep_multi.py --tiny``
on 2 gloo ranks, every dispatcher computing the same layer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import torch.distributed as dist

from mcore_testing.dist import distributed

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_moe_quick_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "moe.jsonl"
    assert _script("bench_moe").main(["--quick", "--out", str(out)]) == 0
    header, *rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert header["config"] and header["experts"] == 8 and header["dtype"] == "torch.float32"
    by_name = {row["candidate"]: row for row in rows}
    assert set(by_name) == {
        "per_expert_loop",
        "mcore_moe",
        "mcore_moe_unpacked",
        "mcore_moe_unfused",
        "mcore_moe_triton_gemm",
        "mcore_moe_chunked",
        "grouped_mm_plain",
        "dense_ceiling",
    }
    assert by_name["grouped_mm_plain"]["status"].startswith("not available")  # CPU
    for name in ("mcore_moe", "mcore_moe_unpacked", "mcore_moe_unfused", "mcore_moe_triton_gemm", "mcore_moe_chunked"):
        row = by_name[name]
        assert row["rel_err_vs_reference"] < 1e-5 and row["min_ms"] <= row["median_ms"] <= row["max_ms"]


def test_bench_hash_balance_quick(tmp_path: Path) -> None:
    out = tmp_path / "hash.jsonl"
    assert _script("bench_hash_balance").main(["--quick", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()][1:]
    by = {(r["zipf"], r["experts"], r["table"]): r for r in rows}
    for zipf, experts, _ in by:
        balanced, robin = by[(zipf, experts, "balanced")], by[(zipf, experts, "round_robin")]
        assert balanced["best_possible_max_over_mean"] <= balanced["max_over_mean"] <= robin["max_over_mean"]
        assert balanced["max_over_mean"] < 1.01 * balanced["best_possible_max_over_mean"]  # at the bound


@distributed(world_size=2)
def test_bench_ep_multi_tiny_on_two_ranks(tmp_path: Path) -> None:
    out = tmp_path / "ep.jsonl"
    assert _script("bench_ep_multi").main(["--tiny", "--out", str(out)]) == 0
    if dist.get_rank() != 0:
        return
    header, *rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert header["world"] == 2 and [row["dispatcher"] for row in rows] == ["allgather", "alltoall", "allgatherv"]
    for row in rows:
        assert row["ep"] == 2 and row["min_ms"] <= row["median_ms"] <= row["max_ms"] and row["tokens_per_s"] > 0
        assert row["rel_err_vs_allgather"] < 1e-5 and row["exchange_rel_err"] < 1e-5  # the same layer
        assert row["exchange_share"] > 0
