"""What the run-loop integration tests share: a small tokenized corpus, merging config tables and reading a run's
metrics."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any


def merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in, table by table (neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def metrics(out_dir: Path) -> dict[int, dict[str, Any]]:
    """The run's ``metrics.jsonl`` records by step."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "step" in r}


def run_update(
    out_dir: Path, corpus: str, parallel: dict[str, Any], train: dict[str, Any] | None = None, every: int = 0
) -> dict[str, Any]:
    """The tables a run-loop test sets over its base config: layouts, output directory, data, checkpoints."""
    return {
        "parallel": parallel,
        "train": {"out_dir": str(out_dir), **(train or {})},
        "data": {"source": corpus},
        "checkpoint": {"every": every},
    }


def stdlib_corpus(root: Path) -> str:
    """``root/corpus``: 20,000 byte tokens of this Python's standard library, tokenized once (the runs' data)."""
    from mcore.data.shards import prepare
    from mcore.data.sources import iter_documents

    out = root / "corpus"
    prepare(iter_documents("stdlib"), out, tokenizer_spec="byte", workers=0, max_tokens=20_000)
    return str(out)
