"""Careless ``[parallel]`` and batch settings on 2 gloo processes: each is refused with one line naming the
keys and what is allowed, on every rank, before any step (red-team regressions).

* layouts in an order that cannot apply: a data-parallel layout before ``tp`` or ``pp`` (``fsdp`` would shard,
  ``ddp`` bucket, parameters that ``tp`` then replaces; ``pp`` then cuts a sharded model), or two data-parallel
  layouts (``ddp`` + ``fsdp``): ``mcore.train.build.check_order``;
* ``train.global_batch_size`` below the data-parallel size (it divided by zero): ``build_train_data``;
* a quantised precision recipe with ``tp > 1`` (its linears refuse sharded weights): refused by the recipe's
  ``check_run`` when the config is resolved, not at the first forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from run_helpers import merged, run_update, stdlib_corpus

from mcore.config import RunConfig, resolve_config
from mcore.errors import ConfigError
from mcore.train import run
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host

pytestmark = pytest.mark.usefixtures("one_thread")

BASE: dict[str, Any] = {
    "model": {"name": "gpt", "preset": "tiny"},
    "optimizer": {"name": "adamw"},
    "train": {"steps": 2, "seq_len": 32, "global_batch_size": 4, "warmup_steps": 1, "cpu_threads": 1},
    "data": {"workers": 0},
    "log": {"progress": "none", "tensorboard": False, "plot": False},
    "checkpoint": {"async_save": False},
}

#: (parallel table, train table, the error's pattern) of each careless 2-process run.
REFUSED: list[tuple[dict[str, Any], dict[str, Any], str]] = [
    (
        {"layouts": ["fsdp", "tp"], "sizes": {"dp_shard": 1, "tp": 2}},
        {},
        r"^parallel\.layouts = \['fsdp', 'tp'\]: 'tp' is listed after the data-parallel layout 'fsdp', .*"
        r"allowed: parallel\.layouts = \['tp', 'fsdp'\]$",
    ),
    (
        {"layouts": ["ddp", "tp"], "sizes": {"dp_replicate": 1, "tp": 2}},
        {},
        r"allowed: parallel\.layouts = \['tp', 'ddp'\]$",
    ),
    (
        {"layouts": ["fsdp", "pp"], "sizes": {"dp_shard": 1, "pp": 2}},
        {},
        r"allowed: parallel\.layouts = \['pp', 'fsdp'\]$",
    ),
    (
        {"layouts": ["ddp", "fsdp"]},
        {},
        r"^parallel\.layouts = \['ddp', 'fsdp'\]: 'ddp' and 'fsdp' are both data parallel; allowed: one of them",
    ),
    (
        {"layouts": ["ddp"]},
        {"global_batch_size": 1},
        r"^train\.global_batch_size = 1 does not split over the data-parallel size 2; allowed: a multiple of 2 \(e\.g\. 2\)$",
    ),
]


def _host() -> Any:
    return isolated_host(
        "mcore_models.plugin",
        "mcore_optim.plugin",
        "mcore_parallel.plugin",
        "mcore_fsdp.plugin",
        "mcore_precision.plugin",
    )


def _config(out_dir: Path, corpus: str, parallel: dict[str, Any], train: dict[str, Any]) -> RunConfig:
    return resolve_config(merged(BASE, run_update(out_dir, corpus, parallel, train)), _host())


def _refused_on_every_rank(root: str, corpus: str) -> None:
    for i, (parallel, train, pattern) in enumerate(REFUSED):
        out_dir = Path(root) / f"run{i}"
        with pytest.raises(ConfigError, match=pattern) as err:
            run(_config(out_dir, corpus, parallel, train), _host())
        assert "\n" not in str(err.value)
        assert not (out_dir / "checkpoints").exists()  # refused before any step


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    return stdlib_corpus(tmp_path_factory.mktemp("careless"))


def test_careless_layouts_and_batches_are_one_line_on_every_rank(tmp_path: Path, corpus: str) -> None:
    run_distributed(_refused_on_every_rank, 2, str(tmp_path), corpus, timeout=120)


@pytest.mark.parametrize("recipe", ["fp8-current", "mxfp8"])
def test_quantised_recipe_with_tp_is_refused_when_resolved(tmp_path: Path, corpus: str, recipe: str) -> None:
    raw = merged(
        BASE,
        {
            **run_update(tmp_path, corpus, {"layouts": ["tp", "fsdp"], "sizes": {"tp": 2}}),
            "precision": {"recipe": recipe},
        },
    )
    with pytest.raises(
        ConfigError, match=rf"^precision\.recipe = '{recipe}' with parallel\.sizes\.tp = 2: .*allowed: "
    ):
        resolve_config(raw, _host())
    ok = merged(raw, {"parallel": {"sizes": {"tp": 1}}})  # tp = 1 keeps whole weights: accepted
    assert resolve_config(ok, _host()).precision.name == recipe
