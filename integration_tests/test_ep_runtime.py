"""The core's run loop with ``parallel.layouts = ["ep"]`` on a gpt with moe layers (capacity on): two gloo
processes equal one process over 5 steps (loss and gradient norm, rel 1e-5; grad_clip reads the norm), a
resume from the two processes' step-3 checkpoint repeats their steps 4 and 5 bit for bit, and the same
checkpoint loads on one process (``ep`` of size 1: the ``Shard(0)`` expert tensors resharded) and continues
as the one-process run does. The same for a deepseek-v3-mini-like model (MLA, a dense first layer,
group-limited sigmoid routing with bias, a shared expert, MTP) under ``["ep", "fsdp"]`` (ep2 x fsdp2 on 4
processes, fsdp borrowing ``ep``). ``num_experts`` not divisible by ep is refused before launch.
Slow: saved at ep4, loaded at ep2 and on one process; ``["ep", "ddp"]`` (ep2 x ddp2); ``["pp", "ep"]`` (pp2 x ep2).

The plugin host is isolated: the core's built-ins, mcore-models (the ``gpt`` model), the harness's
``reference-adamw`` optimizer, mcore-moe, and mcore-parallel and mcore-fsdp for the compositions (never
the installed entry points).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from run_helpers import stdlib_corpus

from mcore.config import RunConfig, resolve_config
from mcore.errors import ConfigError
from mcore.train import run
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host

SAVED = 3  # the checkpoint the resumes start from
TOTAL = 5

MODEL: dict[str, Any] = {
    "name": "gpt",
    "vocab_size": 257,
    "hidden_size": 32,
    "num_layers": 2,
    "layers": ["attention/swiglu", "attention/moe"],
    "max_position_embeddings": 32,
    "attention": {"num_heads": 4, "num_kv_heads": 2},
    "swiglu": {"ffn_hidden_size": 48},
    "moe": {
        "num_experts": 4,
        "top_k": 2,
        "moe_ffn_hidden_size": 16,
        "num_shared_experts": 1,
        "score_function": "sigmoid",
        "expert_bias": True,
        "bias_update_rate": 0.01,
        "aux_loss_coeff": 0.01,
        "capacity_factor": 1.0,
    },
}


#: deepseek-v3-mini's shape, scaled down: MLA, a dense first layer, group-limited sigmoid routing with bias and
#: scaling, a shared expert, multi-token prediction
DEEPSEEK_LIKE: dict[str, Any] = {
    **{k: v for k, v in MODEL.items() if k != "attention"},
    "layers": ["mla/swiglu", "mla/moe"],
    "mtp_num_layers": 1,
    "mla": {
        "num_heads": 4,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
    },
    "moe": {
        **MODEL["moe"],
        "num_groups": 2,
        "topk_groups": 1,
        "routed_scaling_factor": 2.5,
        "seq_aux_loss_coeff": 0.001,
        "aux_loss_coeff": 0.0,
        "capacity_factor": None,
    },
}


def host() -> Any:
    """The harness, mcore-models, mcore-moe, mcore-parallel (``ddp``) and mcore-fsdp."""
    plugins = ("mcore_models.plugin", "mcore_moe.plugin", "mcore_parallel.plugin", "mcore_fsdp.plugin")
    return isolated_host("mcore_testing.plugin", *plugins)


def config(
    plugin_host: Any,
    out_dir: Path,
    corpus: str,
    *,
    layouts: list[str],
    ep: int,
    resume: str = "none",
    model: dict[str, Any] | None = None,
) -> RunConfig:
    parallel: dict[str, Any] = {"layouts": layouts, "sizes": {"ep": ep} if "ep" in layouts else {}}
    if "fsdp" in layouts:  # dense parameters over dp_shard x ep, experts over dp_shard
        parallel["fsdp"] = {"borrow": ["ep"]}
    raw = {
        "model": copy.deepcopy(model or MODEL),
        "optimizer": {"name": "reference-adamw", "lr": 3e-3},
        "parallel": parallel,
        "train": {
            "steps": TOTAL,
            "seq_len": 16,
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "warmup_steps": 1,
            "grad_clip": 0.5,
            "deterministic": True,
            "cpu_threads": 1,
            "resume": resume,
            "out_dir": str(out_dir),
        },
        "data": {"workers": 0, "packing": "concat", "source": corpus},
        "log": {"progress": "none", "tensorboard": False, "plot": False, "every": 1},
        "checkpoint": {"async_save": False, "every": SAVED, "keep_last": 5},
    }
    return resolve_config(raw, plugin_host)


def metrics(out_dir: Path) -> dict[int, dict[str, Any]]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "step" in r}


def checkpoint(out_dir: Path, step: int = SAVED) -> str:
    return str(out_dir / "checkpoints" / f"step_{step:08d}")


def _train_and_resume(root: str, corpus: str, layouts: list[str], ep: int, name: str, model: dict[str, Any]) -> None:
    """5 steps (a checkpoint at 3), then steps 4 and 5 again from that checkpoint."""
    plugin_host, out = host(), Path(root) / name
    run(config(plugin_host, out, corpus, layouts=layouts, ep=ep, model=model), plugin_host)
    dist.barrier()
    resume = checkpoint(out)
    again = config(
        plugin_host, Path(root) / f"{name}-resumed", corpus, layouts=layouts, ep=ep, resume=resume, model=model
    )
    assert run(again, plugin_host).start_step == SAVED
    dist.barrier()


def _resume_at(root: str, corpus: str, ep: int, name: str, saved: str) -> None:
    plugin_host = host()
    cfg = config(plugin_host, Path(root) / name, corpus, layouts=["ep"], ep=ep, resume=saved)
    run(cfg, plugin_host)
    dist.barrier()


def _check(
    root: Path,
    corpus: str,
    ep: int,
    *,
    layouts: tuple[str, ...] = ("ep",),
    world: int | None = None,
    model: dict[str, Any] = MODEL,
) -> None:
    """``world`` ranks equal one process; their resume is bit for bit; their checkpoint continues on one process."""
    name = "x".join(layouts) + str(ep)
    run_distributed(_train_and_resume, world or ep, str(root), corpus, list(layouts), ep, name, model, timeout=480)
    plugin_host = host()
    one = run(config(plugin_host, root / "one", corpus, layouts=["single"], ep=1, model=model), plugin_host)
    many, resumed, single = metrics(root / name), metrics(root / f"{name}-resumed"), metrics(root / "one")
    for step in range(1, TOTAL + 1):
        for key in ("loss", "grad_norm"):
            assert many[step][key] == pytest.approx(single[step][key], rel=1e-5), (step, key)
    for step in range(SAVED + 1, TOTAL + 1):
        assert resumed[step]["loss"] == many[step]["loss"], step  # bit for bit
        assert resumed[step]["grad_norm"] == many[step]["grad_norm"], step
    resume = checkpoint(root / name)
    on_one = run(
        config(plugin_host, root / "on-one", corpus, layouts=["ep"], ep=1, resume=resume, model=model), plugin_host
    )
    for step in range(SAVED + 1, TOTAL + 1):
        assert on_one.losses[step] == pytest.approx(one.losses[step], rel=1e-5), step


def test_ep2_run_equals_one_process_resumes_and_reshards_to_one(tmp_path: Path) -> None:
    _check(tmp_path, stdlib_corpus(tmp_path), 2)


@pytest.mark.slow
def test_ep4_checkpoint_loads_at_ep2(tmp_path: Path) -> None:
    corpus = stdlib_corpus(tmp_path)
    _check(tmp_path, corpus, 4)
    run_distributed(_resume_at, 2, str(tmp_path), corpus, 2, "at-ep2", checkpoint(tmp_path / "ep4"), timeout=480)
    for step, row in metrics(tmp_path / "at-ep2").items():
        if step > SAVED:
            assert row["loss"] == pytest.approx(metrics(tmp_path / "one")[step]["loss"], rel=1e-5), step


@pytest.mark.slow
def test_ep2_x_ddp2_run_equals_one_process(tmp_path: Path) -> None:
    _check(tmp_path, stdlib_corpus(tmp_path), 2, layouts=("ep", "ddp"), world=4)


def test_deepseek_like_ep2_x_fsdp2_run_equals_one_process_resumes_and_reshards_to_one(tmp_path: Path) -> None:
    """fsdp borrowing ep: dense parameters over dp_shard x ep, experts over dp_shard; MLA, MTP, grouped routing."""
    _check(tmp_path, stdlib_corpus(tmp_path), 2, layouts=("ep", "fsdp"), world=4, model=DEEPSEEK_LIKE)


def test_bad_ep_settings_are_refused_before_launch(tmp_path: Path) -> None:
    plugin_host = host()
    model = {**MODEL, "moe": {**MODEL["moe"], "num_experts": 6}}
    with pytest.raises(ConfigError) as info:
        config(plugin_host, tmp_path / "run", str(tmp_path / "corpus"), layouts=["ep"], ep=4, model=model)
    message = str(info.value)
    assert "\n" not in message and "num_experts = 6 is not divisible by parallel.sizes.ep = 4" in message, message
    assert "allowed: ep in 1, 2, 3, 6" in message, message
    raw = {
        "model": copy.deepcopy(MODEL),
        "optimizer": {"name": "reference-adamw"},
        "parallel": {"layouts": ["ep"], "sizes": {"ep": 2}, "ep": {"dispatcher": "ring"}},
        "data": {"source": str(tmp_path / "corpus")},
    }
    with pytest.raises(ConfigError, match=r"^parallel\.ep\.dispatcher = 'ring'; allowed: 'allgather', 'alltoall'"):
        resolve_config(raw, plugin_host)


@pytest.mark.slow
def test_pp2_x_ep2_run_equals_one_process(tmp_path: Path) -> None:
    """``["pp", "ep"]`` on 4 processes: the dense layer on the first stage, the moe layer on the second (whose
    ranks split its experts); the dense stage joins the step metrics' gather (it hung before)."""
    _check(tmp_path, stdlib_corpus(tmp_path), 2, layouts=("pp", "ep"), world=4)
