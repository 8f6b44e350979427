"""What the run-loop tests of this package share: an isolated plugin host, a small prepared corpus, a
run config over the harness's reference model, and the metrics a run wrote.

The host is isolated: the core's built-ins, the harness's ``reference-tiny`` model and
``reference-adamw`` optimizer, and this plugin (never the installed entry points).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from mcore.config import RunConfig, resolve_config
from mcore.data.shards import prepare
from mcore.data.sources import iter_documents
from mcore_parallel import plugin
from mcore_testing.hosts import isolated_host

BASE: dict[str, Any] = {
    "model": {"name": "reference-tiny", "vocab_size": 258, "hidden_size": 32, "max_seq_len": 32},
    "optimizer": {"name": "reference-adamw", "lr": 3e-3},
    "train": {
        "seq_len": 16,
        "micro_batch_size": 2,
        "warmup_steps": 1,
        "grad_clip": 0.5,
        "deterministic": True,
        "cpu_threads": 1,
        "resume": "none",
    },
    "data": {"workers": 0, "packing": "concat"},
    "log": {"progress": "none", "tensorboard": False, "plot": False, "every": 1},
    "checkpoint": {"async_save": False, "save_final": True},  # stop_at_step saves there too
}


def merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in, table by table."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def host() -> Any:
    return isolated_host("mcore_testing.plugin", plugin)


def corpus(root: Path) -> str:
    """A prepared byte-level corpus of the first stdlib files (20,000 tokens) under ``root``."""
    out = root / "corpus"
    prepare(iter_documents("stdlib"), out, tokenizer_spec="byte", workers=0, max_tokens=20_000)
    return str(out)


def run_config(plugin_host: Any, out_dir: Path, source: str, update: dict[str, Any]) -> RunConfig:
    """``BASE`` with ``update`` merged in, writing to ``out_dir`` and reading ``source``."""
    raw = merged(BASE, merged(update, {"train": {"out_dir": str(out_dir)}, "data": {"source": source}}))
    return resolve_config(raw, plugin_host)


def metrics(out_dir: Path) -> dict[int, dict[str, Any]]:
    """The run's ``metrics.jsonl`` records by step."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "step" in r}
