"""``benchmarks/bench_multi.py --tiny`` on 2 gloo processes (torchrun, as its docstring runs it): the tp arms with
sequence parallelism and overlap of both sides, of the row side only, and compiled blocks, each give a timed row
whose first-step loss agrees with the first arm's (every arm computes the same model); the async TP arm lists its
one-line refusal (symmetric memory needs CUDA)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_multi.py"


@pytest.mark.slow
def test_bench_multi_tiny_tp_overlap_arms_on_two_gloo_processes(tmp_path: Path) -> None:
    out = tmp_path / "multi.jsonl"
    arms = ["tp+sp", "tp+sp+overlap", "tp+sp+overlap-rs", "tp+sp+compiled", "tp+sp+async"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(SCRIPT), "--tiny", "--device", "cpu", "--arms", *arms, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    header, *rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert header["world_size"] == 2 and header["backend"] == "gloo"
    by = {row["arm"]: row for row in rows}
    assert sorted(by) == ["tp2+sp", "tp2+sp+async", "tp2+sp+compiled", "tp2+sp+overlap", "tp2+sp+overlap-rs"]
    assert by["tp2+sp+overlap"]["parallel"]["tp"] == {"sequence_parallel": True, "overlap_chunks": 4}
    assert by["tp2+sp+overlap-rs"]["parallel"]["tp"]["overlap_all_gather"] is False
    refused = by.pop("tp2+sp+async")
    assert refused["status"].startswith("not available") and "symmetric memory needs CUDA" in refused["status"], refused
    for row in by.values():
        assert row["status"] == "ok" and row["loss_agrees"] is True, row
        assert row["step_ms_min"] <= row["step_ms_median"] <= row["step_ms_max"], row
