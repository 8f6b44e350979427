"""The core's run loop with ``parallel.layouts = ["tp", "ep"]`` on a gpt with moe layers, MoE parallel folding
(``[parallel.ep] borrow = ["tp"]``, sequence parallelism): tp2 alone (``ep = 1``) runs expert parallelism over
the two tp ranks and equals one process over 4 steps (loss, gradient norm and the per-expert load metrics, which
count both ranks' tokens). Dropless routing with no auxiliary loss, so the token split changes nothing.

The plugin host is isolated: the core's built-ins, mcore-models, the harness's ``reference-adamw``, mcore-moe
and mcore-parallel."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from mcore.config import RunConfig, resolve_config
from mcore.data.shards import prepare
from mcore.data.sources import iter_documents
from mcore.train import run
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host

STEPS = 4
MODEL: dict[str, Any] = {
    "name": "gpt",
    "vocab_size": 258,  # the byte tokenizer (257) rounded up to split over tp
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
    },
}


def host() -> Any:
    return isolated_host("mcore_testing.plugin", "mcore_models.plugin", "mcore_moe.plugin", "mcore_parallel.plugin")


def config(plugin_host: Any, out_dir: Path, corpus: str, *, folded: bool) -> RunConfig:
    parallel: dict[str, Any] = {"layouts": ["single"]}
    if folded:
        parallel = {
            "layouts": ["tp", "ep"],
            "sizes": {"tp": 2, "ep": 1},
            "tp": {"sequence_parallel": True},
            "ep": {"borrow": ["tp"]},
        }
    raw = {
        "model": copy.deepcopy(MODEL),
        "optimizer": {"name": "reference-adamw", "lr": 3e-3},
        "parallel": parallel,
        "train": {
            "steps": STEPS,
            "seq_len": 16,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "warmup_steps": 1,
            "grad_clip": 0.5,
            "deterministic": True,
            "cpu_threads": 1,
            "out_dir": str(out_dir),
        },
        "data": {"workers": 0, "packing": "concat", "source": corpus},
        "log": {"progress": "none", "tensorboard": False, "plot": False, "every": 1},
        "checkpoint": {"async_save": False, "every": 0},
    }
    return resolve_config(raw, plugin_host)


def metrics(out_dir: Path) -> dict[int, dict[str, Any]]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "step" in r}


def _folded(root: str, corpus: str) -> None:
    plugin_host = host()
    run(config(plugin_host, Path(root) / "folded", corpus, folded=True), plugin_host)


def test_tp2_folded_run_equals_one_process(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    prepare(iter_documents("stdlib"), corpus, tokenizer_spec="byte", workers=0, max_tokens=20_000)
    run_distributed(_folded, 2, str(tmp_path), str(corpus), timeout=480)
    plugin_host = host()
    run(config(plugin_host, tmp_path / "one", str(corpus), folded=False), plugin_host)
    many, one = metrics(tmp_path / "folded"), metrics(tmp_path / "one")
    loads = [k for k in one[1] if k.startswith("moe/") and "/load/" in k]
    assert loads, sorted(one[1])
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", *loads):
            assert many[step][key] == pytest.approx(one[step][key], rel=1e-5), (step, key)
