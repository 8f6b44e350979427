"""The recipes inside the core's run loop: selected by name from the config, trained on real text, and a
run stopped and resumed from its checkpoint continues bit-exact (the recipe's state: the fp16 loss scale,
the fp8-delayed amax histories, nvfp4's stochastic-rounding streams, goes through the core's checkpoint store)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mcore.config import resolve_config
from mcore.data.shards import prepare
from mcore.data.sources import iter_documents
from mcore.protocols import PrecisionRecipe
from mcore.train import run
from mcore_testing.hosts import isolated_host

BASE: dict[str, Any] = {
    "model": {"name": "reference-tiny", "vocab_size": 257, "hidden_size": 32, "max_seq_len": 32, "num_layers": 1},
    "optimizer": {"name": "reference-adamw", "lr": 3e-3},
    "train": {"steps": 4, "seq_len": 16, "global_batch_size": 4, "micro_batch_size": 2, "deterministic": True},
    "data": {"workers": 0},
    "log": {"progress": "none", "tensorboard": False, "plot": False, "every": 1},
    "checkpoint": {"async_save": False, "every": 2},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("data") / "corpus"
    prepare(iter_documents("stdlib"), out, tokenizer_spec="byte", workers=0, max_tokens=20_000)
    return str(out)


def losses(out_dir: Path) -> dict[int, float]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_the_plugin_registers_every_recipe() -> None:
    host = isolated_host("mcore_precision.plugin", builtins=False)
    for name in ("fp16", "fp8-current", "fp8-delayed", "fp8-rowwise", "fp8-blockwise", "mxfp8", "nvfp4"):
        cls = host.load("precision", name)
        recipe = cls(cls.Config())
        assert isinstance(recipe, PrecisionRecipe) and recipe.name == name


@pytest.mark.filterwarnings("ignore:step . skipped")  # fp16's overflowing steps are skipped on purpose
@pytest.mark.parametrize(
    "precision",
    [
        # the scale grows 2^15-fold a step: step 3 overflows (and is skipped) only with the scale restored
        {
            "recipe": "fp16",
            "params": "fp32",
            "initial_scale": 1.0,
            "growth_interval": 1,
            "growth_factor": 2.0**15,
            "max_scale": 2.0**40,
        },
        {"recipe": "fp8-delayed", "amax_history_len": 3, "params": "fp32"},
        {"recipe": "nvfp4", "params": "fp32", "seed": 5},  # the stochastic-rounding draws resume where they stood
    ],
    ids=["fp16", "fp8-delayed", "nvfp4"],
)
def test_stopped_and_resumed_run_continues_bit_exact(precision: dict, corpus: str, tmp_path: Path) -> None:
    host = isolated_host("mcore_testing.plugin", "mcore_precision.plugin")

    def config(out: Path) -> Any:
        raw = {**BASE, "train": {**BASE["train"], "out_dir": str(out)}, "data": {**BASE["data"], "source": corpus}}
        return resolve_config({**raw, "precision": precision}, host)

    straight = run(config(tmp_path / "straight"), host)
    assert straight.steps_done == 4
    run(config(tmp_path / "resumed"), host, stop_at_step=2)
    resumed = run(config(tmp_path / "resumed"), host)
    assert resumed.start_step == 2
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [a[s] for s in (3, 4)] == [b[s] for s in (3, 4)]
