"""Post-step hooks (``AfterOptimizerStep``): called once per step by the run loop, told whether the
step was applied, and given a reduction over exactly the ranks that saw distinct tokens."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from test_train_loop import make_config, make_corpus
from torch import nn

from mcore.checkpoint.store import load_model_weights
from mcore.mesh import build_mesh
from mcore.plugins import hookimpl
from mcore.protocols import AfterOptimizerStep, ReportsStepMetrics
from mcore.train import run
from mcore.train.microbatch import classify
from mcore.train.step_hooks import after_optimizer_step, metric_modules, post_step_modules, step_metrics, token_groups
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host
from mcore_testing.layouts import AllReduceLayout
from mcore_testing.reference import TinyConfig, TinyTransformer
from mcore_testing.split_layouts import SequenceSplitLayout


class TokenCounter(nn.Module):
    """Counts the tokens of each id it sees in training and, after each step, moves a bias by the
    reduced counts (the shape of MoE's loss-free balancing)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.register_buffer("counts", torch.zeros(vocab))
        self.register_buffer("bias", torch.zeros(vocab))
        self.calls: list[bool] = []
        self.last_step: torch.Tensor | None = None  # the finished step's counts, for step_metrics

    def observe(self, tokens: torch.Tensor) -> None:
        if self.training:
            self.counts += torch.bincount(tokens.flatten(), minlength=self.counts.numel()).float()

    def after_optimizer_step(self, reduce: Callable[[torch.Tensor], torch.Tensor], *, applied: bool) -> None:
        total = reduce(self.counts.clone())
        if applied:
            self.bias += total
        self.last_step = self.counts.clone()
        self.counts.zero_()
        self.calls.append(applied)

    def step_metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        if self.last_step is None:
            return {}
        return {"counted_tokens": float(reduce(self.last_step.clone()).sum())}


class CountingTiny(TinyTransformer):
    def __init__(self, cfg: TinyConfig | None = None, *, seed: int = 0) -> None:
        super().__init__(cfg, seed=seed)
        self.counter = TokenCounter(self.config.vocab_size)

    def forward(self, tokens: torch.Tensor, *, labels: torch.Tensor | None = None, ctx: Any = None) -> torch.Tensor:
        self.counter.observe(tokens)
        return super().forward(tokens, labels=labels, ctx=ctx)


class CountingFactory:
    Config = TinyConfig

    @staticmethod
    def build(config: TinyConfig, *, seed: int, device: Any = "cpu", block_lookup: Any = None) -> nn.Module:
        return CountingTiny(config, seed=seed).to(device)


class CountingPlugin:
    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        registry.add("model", "counting-tiny", f"{__name__}:CountingFactory", summary="tests: post-step counts")


def test_the_run_loop_calls_the_hook_once_per_step(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    host = isolated_host("mcore_testing.plugin", CountingPlugin())
    update = {
        "model": {"name": "counting-tiny"},
        "train": {"steps": 4, "eval_every": 1},
        "checkpoint": {"save_final": True},
        "log": {"every": 2},
    }
    result = run(make_config(host, tmp_path / "run", corpus, update), host)
    model = CountingTiny(TinyConfig(vocab_size=257, hidden_size=32, max_seq_len=32))
    assert isinstance(model.counter, AfterOptimizerStep) and isinstance(model.counter, ReportsStepMetrics)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # every logged step (each has an evaluation here) carries that step's own count, not a running sum
    assert [(r["step"], r["counted_tokens"]) for r in rows] == [(1, 128.0), (2, 128.0), (3, 128.0), (4, 128.0)]
    assert result.last_checkpoint is not None
    load_model_weights(result.last_checkpoint, model)
    # every training token of the 4 steps (global batch 8 rows x 16 tokens) counted once, no eval token
    assert float(model.counter.bias.sum()) == 4 * 8 * 16
    assert float(model.counter.counts.sum()) == 0  # dropped after each step


def _reduce_over_distinct_ranks() -> None:
    rank = dist.get_rank()
    # data parallel: two ranks with different tokens -> the counts add up
    mesh = build_mesh(("dp_replicate",), {}, fill="dp_replicate", device_type="cpu")
    ddp = AllReduceLayout()
    ddp.apply(nn.Linear(1, 1), mesh)
    groups = token_groups([ddp], ["test-ddp"], classify([ddp], ["test-ddp"]))
    counter = TokenCounter(4)
    counter.observe(torch.tensor([[rank, rank]]))
    after_optimizer_step([counter], lambda t: [dist.all_reduce(t, group=g) for g in groups] and t, applied=True)
    assert counter.bias.tolist() == [2.0, 2.0, 0.0, 0.0]
    # a skipped step: the same collective, nothing applied, counts dropped
    counter.observe(torch.tensor([[3]]))
    after_optimizer_step([counter], lambda t: [dist.all_reduce(t, group=g) for g in groups] and t, applied=False)
    assert counter.bias.tolist() == [2.0, 2.0, 0.0, 0.0] and float(counter.counts.sum()) == 0
    # a split sequence: the loss group's ranks saw different tokens of one batch -> summed too
    seq_mesh = build_mesh(("cp",), {}, fill="cp", device_type="cpu")
    seq = SequenceSplitLayout()
    seq.apply(nn.Linear(1, 1), seq_mesh)
    assert len(token_groups([seq], ["test-seq"], classify([seq], ["test-seq"]))) == 1


def _stage_metrics_gathered() -> None:
    rank = dist.get_rank()

    class Stage(nn.Module):  # each rank holds a different layer (pipeline stages)
        def step_metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
            return {f"layer/{rank}": float(rank + 1)}

    modules = metric_modules(nn.Sequential(nn.Linear(1, 1), Stage()))
    assert step_metrics(modules, lambda t: t, gather=False) == {f"layer/{rank}": rank + 1.0}
    assert step_metrics(modules, lambda t: t, gather=True) == {"layer/0": 1.0, "layer/1": 2.0}


def test_stage_metrics_are_gathered_for_the_writer() -> None:
    run_distributed(_stage_metrics_gathered, 2, timeout=120)


def test_reduction_spans_the_ranks_with_distinct_tokens() -> None:
    run_distributed(_reduce_over_distinct_ranks, 2, timeout=120)


def test_single_rank_has_nothing_to_reduce() -> None:
    mesh = build_mesh(("dp_replicate",), {}, fill="dp_replicate", device_type="cpu")
    ddp = AllReduceLayout()
    ddp.apply(nn.Linear(1, 1), mesh)
    assert token_groups([ddp], ["test-ddp"], classify([ddp], ["test-ddp"])) == []
    model = nn.Sequential(nn.Linear(2, 2), TokenCounter(2), nn.Sequential(TokenCounter(3)))
    assert [type(m) for m in post_step_modules(model)] == [TokenCounter, TokenCounter]
