"""``mcore plan`` asks these optimizers for their state size and how they split it over replicas.

Before, the planner read optimizer names (``"muon" in name``, ``name.startswith("distributed")``):
``layerwise-distributed`` was planned as replicated, and every optimizer's state was a guess.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from mcore.config import resolve_config
from mcore.params import collect_param_specs
from mcore.plan.estimate import format_plan, plan_memory
from mcore.plugins import hookimpl
from mcore_optim.adamw import AdamWFactory
from mcore_optim.muon import MuonFactory
from mcore_testing.hosts import isolated_host
from mcore_testing.reference import TinyConfig, TinyTransformer

MODEL = {"name": "reference-tiny", "vocab_size": 64, "hidden_size": 32, "num_layers": 2, "ffn_size": 64}
TRAIN = {"seq_len": 16, "micro_batch_size": 2, "global_batch_size": 8}
WORLD = 4


class ReplicatePlugin:
    """A layout that owns ``dp_replicate`` (the planner reads only its ``mesh_dims``)."""

    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        class Replicate:
            name = "test-replicate"
            mesh_dims = ("dp_replicate",)

        registry.add("layout", "test-replicate", Replicate)


def plan(optimizer: dict[str, Any], precision: str = "fp32") -> Any:
    host = isolated_host("mcore_testing.plugin", "mcore_optim.plugin", ReplicatePlugin())
    raw = {
        "model": MODEL,
        "optimizer": optimizer,
        "train": TRAIN,
        "parallel": {"layouts": ["test-replicate"]},
        "precision": {"recipe": precision},
    }
    return plan_memory(resolve_config(raw, host), host, world_size=WORLD)


def params() -> list[tuple[str, torch.Tensor]]:
    return list(
        TinyTransformer(TinyConfig(vocab_size=64, hidden_size=32, num_layers=2, ffn_size=64)).named_parameters()
    )


def adamw_bytes(itemsize: int = 4) -> int:
    master = 4 if itemsize < 4 else 0
    moments = 4 if itemsize < 4 else itemsize
    return sum(4 + p.numel() * (2 * moments + master) for _, p in params())


def muon_bytes() -> int:
    specs = collect_param_specs(TinyTransformer(TinyConfig(vocab_size=64, hidden_size=32, ffn_size=64)))
    return sum(p.numel() * 4 if specs[n].role == "matrix" else 4 + 8 * p.numel() for n, p in params())


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [
        ({"name": "adamw"}, lambda: adamw_bytes()),  # replicated
        ({"name": "distributed-adamw"}, lambda: adamw_bytes() // WORLD),
        ({"name": "layerwise-distributed"}, lambda: adamw_bytes() // WORLD),  # was planned replicated
        ({"name": "layerwise-distributed", "inner": "muon"}, lambda: muon_bytes() // WORLD),
        ({"name": "muon"}, lambda: muon_bytes()),  # one momentum per matrix element, AdamW's for the rest
    ],
)
def test_state_as_each_optimizer_reports_it(optimizer: dict[str, Any], expected: Any) -> None:
    result = plan(optimizer)
    assert result.optimizer == expected(), format_plan(result)
    split = optimizer["name"] in ("distributed-adamw", "layerwise-distributed")
    assert (", split over dp_replicate" in format_plan(result)) is split
    assert (", not split over dp_replicate" in format_plan(result)) is not split


def test_bf16_parameters_get_fp32_moments_and_masters() -> None:
    result = plan({"name": "adamw"}, precision="bf16")
    assert result.optimizer == adamw_bytes(itemsize=2)
    no_master = plan({"name": "adamw", "master_weights": False}, precision="bf16")
    assert no_master.optimizer == sum(4 + 4 * p.numel() for _, p in params())  # two bf16 moments


def test_factories_report_sizes_by_role() -> None:
    spec = collect_param_specs(TinyTransformer())
    shape = (96, 32)
    assert MuonFactory().state_bytes(shape, spec["layers.0.attn.qkv.weight"], param_dtype=torch.float32) == 4 * 96 * 32
    assert MuonFactory().state_bytes(shape, spec["lm_head.weight"], param_dtype=torch.float32) == 4 + 8 * 96 * 32
    assert AdamWFactory().state_bytes(shape, spec["lm_head.weight"], param_dtype=torch.float32) == 4 + 8 * math.prod(
        shape
    )
