"""The memory planner against the measured peak of real steps of ``gpt`` + ``adamw`` (CPU)."""

from __future__ import annotations

import pytest
import torch

from mcore.config import resolve_config
from mcore.observe.memory import measure_peak_cpu
from mcore.plan.estimate import format_plan, plan_memory
from mcore.plugins import load_plugins
from mcore.train.build import build_parts

RAW = {
    "model": {"name": "gpt", "preset": "tiny"},
    "optimizer": {"name": "adamw"},
    "train": {"seq_len": 128, "micro_batch_size": 8, "global_batch_size": 8},
}


@pytest.mark.parametrize(("recompute", "tolerance"), [("none", 0.10), ("selective", 0.15), ("full", 0.15)])
def test_plan_matches_measured_peak_for_gpt(recompute: str, tolerance: float) -> None:
    host = load_plugins(env=False, unpackaged=False, strict=True)
    config = resolve_config({**RAW, "train": {**RAW["train"], "recompute": recompute}}, host)
    plan = plan_memory(config, host, device_memory_gb=1.0)
    tokens = torch.randint(0, config.model.config.vocab_size, (8, 128))

    def two_steps() -> None:  # built inside, so parameters and optimizer state are counted
        parts = build_parts(config, host)
        for _ in range(2):
            parts.optimizer.zero_grad(set_to_none=True)
            parts.model(tokens, labels=tokens).backward()
            parts.optimizer.step()

    peak, _ = measure_peak_cpu(two_steps)
    assert plan.peak == pytest.approx(peak, rel=tolerance), format_plan(plan) + f"\nmeasured peak: {peak} bytes"
