"""The ``cp`` benchmarks run where CI runs: ``bench_cp.py --quick`` on CPU, ``bench_cp_multi.py --tiny`` on gloo ranks
(its length sweep with torch's context parallelism beside our kinds, and its static-against-dynamic mix),
``bench_cp_balance.py --quick`` (plans only).

They are scripts, not modules of the package: loaded from their files. Each run must give one JSON line per
candidate/kind with times, and outputs that agree (every candidate computes the same attention); a candidate that
cannot run here gives its reason, and the test checks it is the true one.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import parallelize_module

from mcore_testing.dist import distributed

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
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


def _multi(tmp_path: Path, argv: list[str], refused: dict[str, str]) -> list[dict]:
    """Run ``bench_cp_multi.py --tiny argv``; on rank 0 check the length rows (every kind timed and equal to one
    process's attention, those in ``refused`` a row whose status starts with the reason given) and return the mix
    rows."""
    out = tmp_path / "multi.jsonl"
    script = _script("bench_cp_multi")
    assert script.main(["--tiny", *argv, "--out", str(out)]) == 0
    if dist.get_rank() != 0:
        return []
    header, rows = _rows(out)
    assert header["world"] == dist.get_world_size()
    lengths = [row for row in rows if "plan" not in row]
    assert {row["seq"] for row in lengths} == {16, 32}
    for row in lengths:
        if row["kind"] in refused:
            assert row["status"].startswith(f"not available: {refused[row['kind']]}"), row
            continue
        assert row["tokens_per_s"] > 0 and row["min_ms"] <= row["median_ms"] <= row["max_ms"], row
        assert row["rel_err_vs_single"] < 1e-5, row  # one process's attention over the whole rows
    return [row for row in rows if "plan" in row]


def _torch_cp_sdpa_on_cpu_fails(script: ModuleType) -> None:
    """What the torch_cp rows say, seen directly: torch's SDPA context parallelism, set up as torchtitan sets it up,
    has no CPU kernel to ring (CPU's SDPA op has no sharding strategy under it)."""
    api = script.torch_cp_api()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    style = api._ContextParallel(seq_dim=2, attention_type=api._ContextParallel.AttentionType.SDPA)
    module = parallelize_module(script.SDPAttention(0.5), mesh, style)
    api._enable_context_parallel_dispatcher()
    try:
        q = torch.randn(1, 2, 8, 4)  # (B, nh, L, hd): this rank's tokens
        with pytest.raises(NotImplementedError, match="_scaled_dot_product_flash_attention_for_cpu"):
            module(q, q, q)
    finally:
        api._disable_context_parallel_dispatcher()


TORCH_SDPA_ON_CPU = (
    "needs CUDA: torch's context_parallel rings only aten._scaled_dot_product_cudnn_attention.default, "
    "aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_flash_attention.default; "
    "SDPA on cpu runs aten._scaled_dot_product_flash_attention_for_cpu.default"
)


def _check_mix(mix: list[dict]) -> None:
    """Static against dynamic CP: every kind under both plans timed, exact, and the plans' balance reported."""
    by = {(row["kind"], row["plan"]): row for row in mix}
    assert set(by) == {(kind, plan) for kind in ("allgather", "ring", "a2a") for plan in ("static", "dynamic")}
    for row in mix:
        assert row["seq"] == 64 and row["micro_batches"] == 2 and row["cp"] == 2, row
        assert row["tokens_per_s"] > 0 and row["min_ms"] <= row["median_ms"] <= row["max_ms"], row
        assert row["rel_err_vs_single"] < 1e-5, row  # documents attended exactly under either plan
        assert 1.0 <= row["max_over_mean_tokens"] <= row["worst_max_over_mean_tokens"], row
    for kind in ("allgather", "ring", "a2a"):  # the same plans whatever the kind; dynamic keeps some keys local
        static, dynamic = by[(kind, "static")], by[(kind, "dynamic")]
        assert static["needed_fraction"] == 1.0 > dynamic["needed_fraction"] > 0.0
        assert dynamic["sent_fraction"] < static["sent_fraction"]


@distributed(world_size=2)
def test_bench_cp_multi_tiny_on_two_ranks(tmp_path: Path) -> None:
    refused = {
        "a2a+ring": "kind 'a2a+ring' needs at least 4 ranks",
        "torch_cp": TORCH_SDPA_ON_CPU,
        "torch_cp_ring": TORCH_SDPA_ON_CPU,
        "torch_cp_flex": "needs CUDA: FlexAttention does not support backward on CPU.",
    }
    mix = _multi(tmp_path, [], refused)  # every kind over the lengths, then the mix of allgather, ring and a2a
    if dist.get_rank() == 0:
        _check_mix(mix)
    _torch_cp_sdpa_on_cpu_fails(_script("bench_cp_multi"))


@pytest.mark.slow
@distributed(world_size=4, timeout=240)
def test_bench_cp_multi_tiny_on_four_ranks_with_hybrid(tmp_path: Path) -> None:
    _multi(tmp_path, ["--kinds", "ring", "a2a+ring", "--mix-kinds"], refused={})
