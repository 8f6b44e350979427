"""``mcore train`` with an optimizer setting that cannot run on this run's device: one line, exit 2, no traceback."""

from __future__ import annotations

from pathlib import Path

from conftest import run_mcore


def test_triton_adamw_on_cpu_parameters_is_one_line_exit_2(tmp_path: Path) -> None:
    done = run_mcore(
        "train",
        "--model.preset=tiny",
        "--parallel.device=cpu",
        "--optimizer.impl=triton",
        "--train.steps=1",
        f"--train.out_dir={tmp_path / 'run'}",
        "--data.max_tokens=20000",
        "--data.workers=0",
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert errors == ["mcore: error: impl = 'triton' needs CUDA parameters and Triton installed; allowed here: auto, "
                      "foreach, fused"], done.stderr[-2000:]  # fmt: skip
    assert "Traceback" not in done.stderr
