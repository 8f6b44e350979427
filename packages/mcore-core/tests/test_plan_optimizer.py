"""``mcore plan`` asks the optimizer for its state size (``OptimizerStateSize``) instead of reading its name."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mcore.config import resolve_config
from mcore.params import ParamSpec, collect_param_specs
from mcore.plan.estimate import format_plan, plan_memory
from mcore.plugins import hookimpl
from mcore.protocols.optimizer import OptimizerFactory, OptimizerStateSize
from mcore_testing.hosts import isolated_host
from mcore_testing.reference import TinyConfig, TinyTransformer
from mcore_testing.reference_optim import NamedAdamW

MODEL = {"name": "reference-tiny", "vocab_size": 64, "hidden_size": 32, "num_layers": 2, "ffn_size": 64}
TRAIN = {"seq_len": 16, "micro_batch_size": 2, "global_batch_size": 8}


class Silent:
    """An optimizer that does not report its state size."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        lr: float = 0.1
        weight_decay: float = 0.0

    def __init__(self, config: Silent.Config | None = None) -> None:
        self.config = config or Silent.Config()

    def build(self, model: Any, *, mesh: Any, layouts: Any) -> NamedAdamW:
        return NamedAdamW(model, self.config.lr, self.config.weight_decay, (0.9, 0.95))  # not used by the planner


class MomentumSGD(Silent):
    """A third-party optimizer that says what it keeps: one fp32 momentum for hidden matrices only,
    split over data-parallel replicas (its name says nothing the planner could guess from)."""

    def state_bytes(self, shape: tuple[int, ...], spec: ParamSpec, *, param_dtype: torch.dtype) -> int:
        return 4 * math.prod(shape) if spec.role == "matrix" else 0

    def shards_state_over_dp(self, *, sharded_params: bool) -> bool:
        return True


class Plugin:
    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        class Replicate:
            name = "test-replicate"
            mesh_dims = ("dp_replicate",)

        registry.add("layout", "test-replicate", Replicate)
        registry.add("optimizer", "momentum-sgd", MomentumSGD)
        registry.add("optimizer", "silent", Silent)


def plan(optimizer: str, *, world_size: int = 4) -> Any:
    host = isolated_host("mcore_testing.plugin", Plugin())
    raw = {
        "model": MODEL,
        "optimizer": {"name": optimizer},
        "train": TRAIN,
        "parallel": {"layouts": ["test-replicate"]},
    }
    return plan_memory(resolve_config(raw, host), host, world_size=world_size)


def matrix_elements() -> int:
    model = TinyTransformer(TinyConfig(vocab_size=64, hidden_size=32, num_layers=2, ffn_size=64))
    specs = collect_param_specs(model)
    return sum(p.numel() for name, p in model.named_parameters() if specs[name].role == "matrix")


def test_a_third_party_optimizer_is_planned_as_it_reports() -> None:
    assert isinstance(MomentumSGD(), OptimizerStateSize) and isinstance(MomentumSGD(), OptimizerFactory)
    result = plan("momentum-sgd")
    # the old planner: 2 fp32 tensors for every element, never split over dp_replicate
    assert result.optimizer == 4 * matrix_elements() // 4, format_plan(result)
    assert "bytes per parameter as 'momentum-sgd' reports it, split over dp_replicate" in format_plan(result)


def test_an_optimizer_that_does_not_say_is_assumed_adamw_like() -> None:
    assert not isinstance(Silent(), OptimizerStateSize)
    result = plan("silent")
    numel = sum(p.numel() for p in TinyTransformer(TinyConfig(vocab_size=64, hidden_size=32, ffn_size=64)).parameters())
    assert result.optimizer == 8 * numel  # fp32 parameters: no master copy; not split
    assert "'silent' does not report its size, assumed AdamW-like" in format_plan(result)


def test_the_default_counts_an_fp32_master_copy_of_bf16_parameters() -> None:
    host = isolated_host("mcore_testing.plugin", Plugin())
    raw = {"model": MODEL, "optimizer": {"name": "silent"}, "train": TRAIN, "precision": {"recipe": "bf16"}}
    result = plan_memory(resolve_config(raw, host), host)
    numel = sum(p.numel() for p in TinyTransformer(TinyConfig(vocab_size=64, hidden_size=32, ffn_size=64)).parameters())
    assert result.optimizer == 12 * numel and "+ fp32 master copy" in format_plan(result)


def test_reference_adamw_reports_torch_adamw_state() -> None:
    result = plan("reference-adamw", world_size=2)
    params = list(TinyTransformer(TinyConfig(vocab_size=64, hidden_size=32, ffn_size=64)).parameters())
    assert result.optimizer == sum(4 + 8 * p.numel() for p in params)  # step + two fp32 moments, replicated
    host = isolated_host("mcore_testing.plugin")
    raw = {"model": MODEL, "optimizer": {"name": "reference-adamw"}, "train": TRAIN, "precision": {"recipe": "bf16"}}
    bf16 = plan_memory(resolve_config(raw, host), host)
    assert bf16.optimizer == sum(4 + 4 * p.numel() for p in params)  # torch keeps the moments in bf16, no master
