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


@pytest.mark.parametrize(("schedule", "virtual", "in_flight"), [("1f1b", 1, [2, 1]), ("interleaved", 2, [5, 3])])
def test_plan_per_pipeline_rank(schedule: str, virtual: int, in_flight: list[int]) -> None:
    """Under ``pp`` each rank's row: its layers, the parameters it holds (the embedding on the first, the head
    on the last, from the model's own stages), and the activations of the micro-batches its schedule keeps."""
    host = load_plugins(env=False, unpackaged=False, strict=True)
    raw = {
        "model": {"name": "gpt", "preset": "tiny", "num_layers": 4},
        "optimizer": {"name": "adamw"},
        "train": {"seq_len": 64, "micro_batch_size": 2, "global_batch_size": 8},  # 4 micro-batches
        "parallel": {"layouts": ["pp"], "sizes": {"pp": 2}, "pp": {"schedule": schedule, "virtual_stages": virtual}},
    }
    config = resolve_config(raw, host)
    plan = plan_memory(config, host, world_size=2)
    model = build_parts(resolve_config({**raw, "parallel": {"layouts": ["single"]}}, host), host).model

    def numel(part: torch.nn.Module) -> int:
        return sum(p.numel() for p in part.parameters())

    chunks = (
        [[range(0, 2)], [range(2, 4)]] if virtual == 1 else [[range(0, 1), range(2, 3)], [range(1, 2), range(3, 4)]]
    )
    assert [s.layers for s in plan.stages] == (["0-1", "2-3"] if virtual == 1 else ["0,2", "1,3"])
    assert [s.in_flight for s in plan.stages] == in_flight
    for rank, stage in enumerate(plan.stages):
        parts = [model.pipeline_stage(r, first=rank == 0 and r.start == 0, last=r.stop == 4) for r in chunks[rank]]
        held = {id(p): p for part in parts for p in part.parameters()}  # the embedding counted once
        assert stage.params == sum(p.numel() for p in held.values()) * 4, (rank, format_plan(plan))  # fp32
        kept = max(sum(plan.layers[i].activations for i in r) for r in chunks[rank])
        assert stage.activations == stage.in_flight * kept + (plan.other_activations if rank == 1 else 0)
    assert sum(s.params for s in plan.stages) == numel(model) * 4  # untied: every parameter on one rank
    assert plan.peak == max(s.peak for s in plan.stages)
    assert "per pipeline rank" in format_plan(plan)
