"""The memory planner against the measured peak of real training steps on CPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mcore.config import resolve_config
from mcore.observe.memory import measure_peak_cpu
from mcore.plan.estimate import format_plan, plan_memory
from mcore.plugins import hookimpl
from mcore.train.build import build_parts
from mcore_testing.hosts import isolated_host

RAW = {
    "model": {
        "name": "reference-tiny",
        "vocab_size": 257,
        "hidden_size": 64,
        "max_seq_len": 128,
        "num_layers": 4,
        "ffn_size": 256,
    },
    "optimizer": {"name": "reference-adamw"},
    "train": {"seq_len": 128, "micro_batch_size": 16, "global_batch_size": 16},
}


@pytest.mark.parametrize(("recompute", "tolerance"), [("none", 0.10), ("selective", 0.15), ("full", 0.15)])
def test_plan_matches_measured_peak(recompute: str, tolerance: float) -> None:
    host = isolated_host("mcore_testing.plugin")
    config = resolve_config({**RAW, "train": {**RAW["train"], "recompute": recompute}}, host)
    plan = plan_memory(config, host, device_memory_gb=1.0)
    tokens = torch.randint(0, 257, (16, 128))

    def two_steps() -> None:  # build inside, so parameters and optimizer state are counted
        parts = build_parts(config, host)
        for _ in range(2):
            parts.optimizer.zero_grad(set_to_none=True)
            parts.model(tokens, labels=tokens).backward()
            parts.optimizer.step()

    peak, _ = measure_peak_cpu(two_steps)
    assert plan.peak == pytest.approx(peak, rel=tolerance), format_plan(plan)
    assert plan.fits is True and len(plan.layers) == 4


class ShardPlugin:
    """A layout that owns ``dp_shard`` (the planner only reads its ``mesh_dims``)."""

    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        class Shard:
            name = "test-shard"
            mesh_dims = ("dp_shard",)

        registry.add("layout", "test-shard", Shard)


def test_plan_divides_by_sharding_and_reports_fit() -> None:
    host = isolated_host("mcore_testing.plugin", ShardPlugin())
    config = resolve_config(RAW, host)
    base = plan_memory(config, host, device_memory_gb=0.01)
    assert base.fits is False and "does NOT fit" in format_plan(base)
    recompute = plan_memory(resolve_config({**RAW, "train": {**RAW["train"], "recompute": "full"}}, host), host)
    assert recompute.activations < base.activations
    assert base.layers[0].attention < base.layers[0].activations
    sharded = plan_memory(resolve_config({**RAW, "parallel": {"layouts": ["test-shard"]}}, host), host, world_size=2)
    assert sharded.params == base.params // 2 and sharded.optimizer == base.optimizer // 2
    assert sharded.activations == base.activations  # micro-batch of 16 rows given; each rank runs it whole


def test_plan_with_bf16_parameters() -> None:
    """bf16 recipes used to crash the planner (``_apply(): Couldn't swap Embedding.weight``)."""
    host = isolated_host("mcore_testing.plugin")
    fp32 = plan_memory(resolve_config(RAW, host), host)
    bf16 = plan_memory(resolve_config({**RAW, "precision": {"recipe": "bf16"}}, host), host)
    assert bf16.params == fp32.params // 2 and bf16.grads == fp32.grads // 2
    assert bf16.optimizer < fp32.optimizer  # reference-adamw (torch AdamW) keeps its moments in bf16, no master copy
    assert 0 < bf16.activations < fp32.activations  # measured in bf16
    autocast = plan_memory(resolve_config({**RAW, "precision": {"recipe": "bf16", "params": "fp32"}}, host), host)
    assert autocast.params == fp32.params


class StorageReadingPlugin:
    """``reference-tiny`` whose first block reads its input's memory, as a Triton kernel launch does."""

    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        from mcore_testing.reference import TinyModelFactory

        class Factory(TinyModelFactory):
            @staticmethod
            def build(config: Any, *, seed: int, device: Any = "cpu", block_lookup: Any = None) -> torch.nn.Module:
                model = TinyModelFactory.build(config, seed=seed, device=device)

                def read_memory(module: Any, args: Any) -> None:
                    args[0].data_ptr()

                model.layers[0].register_forward_pre_hook(read_memory)
                return model

        registry.add("model", "storage-reading", Factory)


class DataDependentPlugin:
    """``reference-tiny`` whose first block takes the nonzero entries of its input (a shape from values)."""

    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        from mcore_testing.reference import TinyModelFactory

        class Factory(TinyModelFactory):
            @staticmethod
            def build(config: Any, *, seed: int, device: Any = "cpu", block_lookup: Any = None) -> torch.nn.Module:
                model = TinyModelFactory.build(config, seed=seed, device=device)
                model.layers[0].register_forward_pre_hook(lambda module, args: args[0].nonzero())
                return model

        registry.add("model", "data-dependent", Factory)


def test_a_data_dependent_shape_is_a_one_line_user_error() -> None:
    """It was a traceback (DynamicOutputShapeException), e.g. from a MoE block's routing."""
    from mcore.errors import UserError

    host = isolated_host("mcore_testing.plugin", DataDependentPlugin())
    config = resolve_config({**RAW, "model": {**RAW["model"], "name": "data-dependent"}}, host)
    with pytest.raises(UserError, match=r"model 'data-dependent' computes a shape from tensor values \(aten.nonzero"):
        plan_memory(config, host)


def test_a_kernel_reading_fake_memory_is_a_user_error() -> None:
    """On CUDA such a kernel got a pointer to nothing (an illegal memory access that kills the process)."""
    from mcore.errors import UserError

    host = isolated_host("mcore_testing.plugin", StorageReadingPlugin())
    config = resolve_config({**RAW, "model": {**RAW["model"], "name": "storage-reading"}}, host)
    with pytest.raises(UserError, match="cannot run model 'storage-reading' on storage-less tensors"):
        plan_memory(config, host)


class TPPlugin:
    """A layout that owns ``tp`` (the planner reads its ``mesh_dims`` and the model's declarations)."""

    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        class TP:
            name = "test-tp"
            mesh_dims = ("tp",)

        registry.add("layout", "test-tp", TP)


def test_plan_under_tp_splits_only_the_declared_parameters() -> None:
    from mcore_testing.reference import TinyConfig, TinyTransformer

    host = isolated_host("mcore_testing.plugin", TPPlugin())
    raw = {**RAW, "model": {**RAW["model"], "fused": False}}
    base = plan_memory(resolve_config(raw, host), host)
    split = plan_memory(resolve_config({**raw, "parallel": {"layouts": ["test-tp"]}}, host), host, world_size=2)
    model = TinyTransformer(TinyConfig(**{k: v for k, v in raw["model"].items() if k != "name"}))
    # norm scales stay whole, and the head: the reference model has no vocab-parallel loss head
    whole = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1 or n == "lm_head.weight")
    total = sum(p.numel() for p in model.parameters())
    want = base.params * ((total - whole) / 2 + whole) / total
    assert split.params == pytest.approx(want, rel=1e-6) and base.params / 2 < split.params < base.params
    assert split.activations == base.activations  # no sequence parallelism: the hidden states stay whole
    assert any("under tp 2 a rank holds" in a for a in split.assumptions)
