"""Careless ``[parallel]`` / batch settings refused in one line before any work (red-team regressions):
layout orders that cannot apply (``build.check_order``) and a global batch below the data-parallel size
(``build_train_data`` divided by zero). The same through real layouts on 2 processes:
``integration_tests/test_careless_parallel.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcore.config.sections import DataConfig, TrainConfig
from mcore.data.pipeline import build_train_data
from mcore.data.tokenizer import ByteTokenizer
from mcore.errors import ConfigError
from mcore.mesh import resolve_sizes
from mcore.train.build import check_order

TP, PP, EP, CP = ("tp",), ("pp",), ("ep",), ("cp",)
DDP, FSDP, HSDP = ("dp_replicate",), ("dp_shard",), ("dp_replicate", "dp_shard")


@pytest.mark.parametrize(
    ("names", "owned"),
    [
        (["tp", "fsdp"], [TP, FSDP]),
        (["tp", "ddp"], [TP, DDP]),
        (["pp", "tp", "ep", "cp", "hsdp"], [PP, TP, EP, CP, HSDP]),
        (["fsdp", "cp"], [FSDP, CP]),  # cp replaces no parameter: it may follow
        (["single"], [()]),
        (["tp", "pp"], [TP, PP]),
    ],
)
def test_orders_that_apply_pass(names: list[str], owned: list[tuple[str, ...]]) -> None:
    check_order(names, owned)


@pytest.mark.parametrize(
    ("names", "owned", "message"),
    [
        (
            ["fsdp", "tp"],
            [FSDP, TP],
            "parallel.layouts = ['fsdp', 'tp']: 'tp' is listed after the data-parallel layout 'fsdp', which must "
            "apply last of these; allowed: parallel.layouts = ['tp', 'fsdp']",
        ),
        (
            ["cp", "ddp", "pp", "tp"],
            [CP, DDP, PP, TP],
            "parallel.layouts = ['cp', 'ddp', 'pp', 'tp']: 'pp' is listed after the data-parallel layout 'ddp', which "
            "must apply last of these; allowed: parallel.layouts = ['cp', 'pp', 'tp', 'ddp']",
        ),
        (
            ["hsdp", "ep"],
            [HSDP, EP],
            "parallel.layouts = ['hsdp', 'ep']: 'ep' is listed after the data-parallel layout 'hsdp', which must "
            "apply last of these; allowed: parallel.layouts = ['ep', 'hsdp']",
        ),
        (
            ["ddp", "fsdp"],
            [DDP, FSDP],
            "parallel.layouts = ['ddp', 'fsdp']: 'ddp' and 'fsdp' are both data parallel; allowed: one of them "
            "('hsdp' replicates over dp_replicate and shards over dp_shard)",
        ),
    ],
)
def test_orders_that_cannot_apply_are_one_line(names: list[str], owned: list[tuple[str, ...]], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_order(names, owned)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("global_batch", "micro", "message"),
    [
        (
            1,
            None,
            "train.global_batch_size = 1 does not split over the data-parallel size 2; allowed: a multiple of 2 (e.g. 2)",
        ),
        (
            8,
            None,
            "train.global_batch_size = 8 does not split over the data-parallel size 3; allowed: a multiple of 3 (e.g. 6)",
        ),
        (
            8,
            2,
            "train.global_batch_size = 8 does not split over the data-parallel size 3 x train.micro_batch_size = 2; "
            "allowed: a multiple of 6 (e.g. 6)",
        ),
    ],
)
def test_a_global_batch_that_does_not_split_over_data_parallel_is_one_line(
    tmp_path: Path, global_batch: int, micro: int | None, message: str
) -> None:
    """A global batch below the data-parallel size divided by zero; the others named a micro-batch never given."""
    train = TrainConfig(seq_len=16, global_batch_size=global_batch, micro_batch_size=micro, out_dir=tmp_path)
    data = DataConfig(source=str(tmp_path / "unread.txt"), workers=0)
    with pytest.raises(ConfigError) as err:
        build_train_data(data, train, ByteTokenizer(), dp_rank=0, dp_size=3 if global_batch == 8 else 2)
    assert str(err.value) == message
    assert not (tmp_path / "data").exists()  # refused before any source is read


def test_sizes_not_matching_the_world_end_their_sentence() -> None:
    with pytest.raises(ValueError) as err:
        resolve_sizes(["tp"], {"tp": 4}, 2, fill=None)
    assert str(err.value).endswith("their product must equal the number of processes")
