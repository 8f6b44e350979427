"""The run loop on one process: learning, determinism, accumulation, clipping, schedules,
recompute, the NaN/spike policy, eval, metrics files, hooks, and bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from mcore.config import RunConfig, load_raw, resolve_config
from mcore.data.shards import prepare
from mcore.data.sources import iter_documents
from mcore.errors import ConfigError, UserError
from mcore.plugins import hookimpl
from mcore.train import run
from mcore.train.grads import global_grad_norm
from mcore.train.health import TrainingHalted
from mcore.train.schedules import WSD, Constant, Cosine
from mcore_testing.hosts import isolated_host

BASE: dict[str, Any] = {
    "model": {"name": "reference-tiny", "vocab_size": 257, "hidden_size": 32, "max_seq_len": 32},
    "optimizer": {"name": "reference-adamw", "lr": 3e-3},
    "train": {
        "steps": 6,
        "seq_len": 16,
        "global_batch_size": 8,
        "micro_batch_size": 4,
        "warmup_steps": 2,
        "deterministic": True,
        "cpu_threads": 1,
    },
    "data": {"workers": 0},
    "log": {"progress": "none", "tensorboard": False, "plot": False},
    "checkpoint": {"async_save": False, "save_final": False},
}


def make_corpus(root: Path) -> str:
    """A small prepared dataset of real text (the first stdlib files), shared by a module."""
    out = root / "corpus"
    if not out.exists():
        prepare(iter_documents("stdlib"), out, tokenizer_spec="byte", workers=0, max_tokens=60_000)
    return str(out)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def make_config(host: Any, out_dir: Path, source: str, update: dict[str, Any] | None = None) -> RunConfig:
    raw = merge(BASE, {"train": {"out_dir": str(out_dir)}, "data": {"source": source}})
    return resolve_config(merge(raw, update or {}), host)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture
def host() -> Any:
    return isolated_host("mcore_testing.plugin")


def test_loss_falls_and_files_are_written(host: Any, corpus: str, tmp_path: Path) -> None:
    events: list[tuple[str, Any]] = []

    class Recorder:
        MCORE_PLUGIN_API = 1

        @hookimpl
        def mcore_run_start(self, config: Any, mesh: Any) -> None:
            events.append(("start", mesh.world_size))

        @hookimpl
        def mcore_step_end(self, step: int, metrics: dict[str, float]) -> None:
            events.append(("step", step))

        @hookimpl
        def mcore_checkpoint_saved(self, step: int, path: str) -> None:
            events.append(("saved", step))

        @hookimpl
        def mcore_run_end(self, step: int, metrics: dict[str, float]) -> None:
            events.append(("end", step))

    host = isolated_host("mcore_testing.plugin", Recorder())
    cfg = make_config(
        host,
        tmp_path / "run",
        corpus,
        {
            "train": {"steps": 30, "eval_every": 15},
            "log": {
                "every": 5,
                "tensorboard": True,
                "plot": True,
                "layer_stats_every": 10,
                "peak_tflops": 1.0,
                "profile_from": 3,
                "profile_steps": 2,
            },
            "checkpoint": {"every": 10, "save_final": True, "async_save": True},
        },
    )
    result = run(cfg, host)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "mfu", "memory_gb"} <= set(records[0])
    assert 0 < records[-1]["mfu"] < 1
    assert [r["step"] for r in records if "eval_loss" in r] == [15, 30]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "loss.png").stat().st_size > 1000 and result.plot is not None
    assert len((out / "layer_stats.jsonl").read_text().splitlines()) == 3 * 2  # 3 steps x 2 layers
    assert ("start", 1) in events and ("end", 30) in events
    trace = json.loads((out / "profile" / "rank0" / "trace.json").read_text())
    assert any(e.get("name") in ("aten::mm", "aten::addmm", "aten::linear") for e in trace["traceEvents"])
    top = (out / "profile" / "rank0" / "top_ops.txt").read_text()
    assert top.startswith("steps 3-4:") and "aten::" in top
    assert [e for e in events if e[0] == "saved"] == [("saved", 10), ("saved", 20), ("saved", 30)]
    assert len([e for e in events if e[0] == "step"]) == 30
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000020", "step_00000030"]


def test_progress_bar_and_lines(host: Any, corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(
        make_config(host, tmp_path / "a", corpus, {"train": {"steps": 2}, "log": {"progress": "lines", "every": 1}}),
        host,
    )
    assert "step 2/2 | loss" in capsys.readouterr().err
    run(
        make_config(host, tmp_path / "b", corpus, {"train": {"steps": 2}, "log": {"progress": "bar", "every": 1}}), host
    )


def test_deterministic_same_seed_same_losses(host: Any, corpus: str, tmp_path: Path) -> None:
    a = run(make_config(host, tmp_path / "a", corpus), host)
    b = run(make_config(host, tmp_path / "b", corpus), host)
    assert a.losses == b.losses  # bit for bit
    c = run(make_config(host, tmp_path / "c", corpus, {"train": {"seed": 99}}), host)
    assert c.losses != a.losses


def test_gradient_accumulation_matches_one_big_batch(host: Any, corpus: str, tmp_path: Path) -> None:
    one = run(make_config(host, tmp_path / "a", corpus, {"train": {"micro_batch_size": 8}}), host)
    four = run(make_config(host, tmp_path / "b", corpus, {"train": {"micro_batch_size": 2}}), host)
    for step in one.losses:
        assert one.losses[step] == pytest.approx(four.losses[step], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_keeps_the_losses(host: Any, corpus: str, tmp_path: Path, mode: str) -> None:
    base = run(make_config(host, tmp_path / "a", corpus, {"train": {"steps": 3}}), host)
    rc = run(make_config(host, tmp_path / "b", corpus, {"train": {"steps": 3, "recompute": mode}}), host)
    assert rc.losses == base.losses


def test_recompute_runs_blocks_twice(host: Any) -> None:
    from mcore.train.recompute import apply_recompute
    from mcore_testing.reference import TinyTransformer

    model = TinyTransformer()
    calls = []
    model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    assert apply_recompute(model, "full") == 2
    x = torch.randint(0, 64, (2, 8))
    model(x, labels=x).backward()
    assert len(calls) == 2  # forward, then again in backward


def test_schedules() -> None:
    c = Cosine(total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert c.factor(0) == pytest.approx(0.1) and c.factor(9) == pytest.approx(1.0)
    assert c.factor(99) == pytest.approx(0.1) and 0.1 < c.factor(50) < 1.0
    w = WSD(total_steps=100, warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    assert w.factor(50) == 1.0 and w.factor(79) == 1.0 and w.factor(99) == pytest.approx(0.0)
    assert w.factor(89) == pytest.approx(0.5)
    assert Constant(total_steps=10, warmup_steps=0).factor(7) == 1.0


def test_lr_follows_the_named_schedule(host: Any, corpus: str, tmp_path: Path) -> None:
    cfg = make_config(
        host,
        tmp_path / "r",
        corpus,
        {"train": {"steps": 10, "lr_schedule": "wsd", "warmup_steps": 2}, "log": {"every": 1}},
    )
    run(cfg, host)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[:2] == pytest.approx([1.5e-3, 3e-3]) and lrs[5] == pytest.approx(3e-3)
    assert lrs[-1] == pytest.approx(3e-3 * 0.1)


def test_global_norm_and_clipping(host: Any, corpus: str, tmp_path: Path) -> None:
    p1, p2 = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    p1.grad, p2.grad = torch.full((3,), 2.0), torch.full((4,), 1.0)
    assert float(global_grad_norm([p1, p2])) == pytest.approx(math.sqrt(12 + 4))
    run(
        make_config(host, tmp_path / "r", corpus, {"train": {"steps": 3, "grad_clip": 1e-4}, "log": {"every": 1}}), host
    )
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 1e-4 for r in records)  # reported before clipping


class NaNAt:
    """A plugin whose model multiplies its loss by ``factor`` (NaN by default) at chosen forward calls."""

    MCORE_PLUGIN_API = 1

    def __init__(self, bad_calls: set[int], factor: float = float("nan")) -> None:
        self.bad_calls, self.factor = bad_calls, factor

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        from mcore_testing.reference import TinyModelFactory

        bad_calls, factor = self.bad_calls, self.factor

        class Factory(TinyModelFactory):
            @staticmethod
            def build(config: Any, *, seed: int, device: Any = "cpu", block_lookup: Any = None) -> Any:
                model = TinyModelFactory.build(config, seed=seed, device=device)
                inner, calls = model.forward, [0]

                def forward(tokens: Any, *, labels: Any = None, ctx: Any = None) -> Any:
                    calls[0] += 1
                    out = inner(tokens, labels=labels, ctx=ctx)
                    return out * factor if calls[0] in bad_calls else out

                model.forward = forward
                return model

        registry.add("model", "nan-tiny", Factory)


def test_nan_policy_skip(corpus: str, tmp_path: Path) -> None:
    host = isolated_host("mcore_testing.plugin", NaNAt({5, 6}))  # step 3 (2 micro-batches per step)
    cfg = make_config(host, tmp_path / "r", corpus, {"model": {"name": "nan-tiny"}, "log": {"every": 1}})
    with pytest.warns(RuntimeWarning, match="step 3 skipped: the loss is nan"):
        result = run(cfg, host)
    assert result.steps_done == 6 and math.isnan(result.losses[3])
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False, False, True, False, False, False]


def test_nan_policy_stop_names_the_last_good_checkpoint(corpus: str, tmp_path: Path) -> None:
    host = isolated_host("mcore_testing.plugin", NaNAt({7}))  # step 4
    cfg = make_config(
        host,
        tmp_path / "r",
        corpus,
        {"model": {"name": "nan-tiny"}, "train": {"nan_policy": "stop"}, "checkpoint": {"every": 2}},
    )
    with pytest.raises(
        TrainingHalted, match="stopped at step 4: the loss is nan.*followed by a good step is .*step_00000002"
    ):
        run(cfg, host)
    # the state before step 4 is not saved: resuming from it would replay step 4
    assert not (tmp_path / "r" / "checkpoints" / "step_00000003").exists()
    clean = run(
        make_config(host, tmp_path / "c", corpus, {"train": {"steps": 2}, "checkpoint": {"save_final": True}}), host
    )
    from mcore.checkpoint.store import read_meta

    assert read_meta(tmp_path / "r" / "checkpoints" / "step_00000002")["step"] == 2
    # the named weights equal a clean run's after 2 steps
    from mcore.train.generate import load_for_inference

    m1, *_ = load_for_inference(
        tmp_path / "r" / "checkpoints" / "step_00000002", isolated_host("mcore_testing.plugin", NaNAt(set()))
    )
    m2, *_ = load_for_inference(clean.last_checkpoint, host)
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), n


def test_spike_policy(corpus: str, tmp_path: Path) -> None:
    host = isolated_host("mcore_testing.plugin", NaNAt({7, 8}, factor=10.0))  # step 4's loss x 10
    cfg = make_config(
        host,
        tmp_path / "r",
        corpus,
        {"model": {"name": "nan-tiny"}, "train": {"spike_factor": 3.0, "spike_warmup_steps": 2}},
    )
    with pytest.warns(RuntimeWarning, match="step 4 skipped: the loss .* spiked above 3.0 x its running mean"):
        result = run(cfg, host)
    assert result.losses[4] > 3 * result.losses[3]


def test_bad_input_errors(host: Any, corpus: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'train.stepz'.*did you mean 'steps'"):
        resolve_config(merge(BASE, load_raw(None, ["--train.stepz=3"])), host)
    with pytest.raises(UserError, match="no such file or directory"):
        run(make_config(host, tmp_path / "r1", str(tmp_path / "missing")), host)
    assert not (tmp_path / "r1" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="model.vocab_size = 64 is smaller"):
        run(make_config(host, tmp_path / "r2", corpus, {"model": {"vocab_size": 64}}), host)
    with pytest.raises(ConfigError, match="global_batch_size = 6 is not a multiple of train.micro_batch_size = 4"):
        resolve_config(merge(BASE, {"train": {"global_batch_size": 6, "micro_batch_size": 4}}), host)


def test_a_recipe_with_bind_mesh_gets_the_mesh_before_prepare(corpus: str, tmp_path: Path) -> None:
    """``PrecisionRecipe.bind_mesh`` (optional): the run's mesh, once, before ``prepare``."""
    from mcore.precision.basic import FP32

    calls: list[str] = []

    class MeshAware(FP32):
        name = "mesh-aware"

        def bind_mesh(self, mesh: Any) -> None:
            calls.append(f"bind {mesh.size('dp_shard') if mesh.has('dp_shard') else 1}")

        def prepare(self, model: Any) -> Any:
            calls.append("prepare")
            return super().prepare(model)

    class Plugin:
        MCORE_PLUGIN_API = 1

        @hookimpl
        def mcore_register(self, registry: Any) -> None:
            registry.add("precision", "mesh-aware", MeshAware)

    host = isolated_host("mcore_testing.plugin", Plugin())
    run(
        make_config(host, tmp_path / "run", corpus, {"precision": {"recipe": "mesh-aware"}, "train": {"steps": 1}}),
        host,
    )
    assert calls == ["bind 1", "prepare"]
