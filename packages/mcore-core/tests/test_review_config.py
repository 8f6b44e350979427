"""Defects an adversarial review found in the config and the run's start (each test failed before its fix).

* Ranks that resolved different configs (other overrides on one rank) are refused on every rank, in one
  line naming the keys, before any collective whose shapes come from the config (rank 1 with another
  ``train.seq_len`` used to train silently; another ``train.out_dir`` ended rank 0 with a raw traceback).
* A ``metrics.jsonl`` / ``layer_stats.jsonl`` ending in a cut line, NUL bytes or a non-object line no
  longer breaks a resume: the bad lines are set aside with one warning.
* A config built in Python is type-checked: NaN, 2.5 or True in an int field fail like a bad range.
* ``train.out_dir`` empty is refused; ``~`` is expanded (as ``data.source`` is).
* ``mcore config /dev/zero`` stops at a size cap instead of reading until memory runs out.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_train_loop import make_config, make_corpus, merge

from mcore.cli import main as mcore_main
from mcore.config import MAX_CONFIG_BYTES, load_raw, resolve_config
from mcore.config.sections import CheckpointConfig, DataConfig, LogConfig, ParallelConfig, TrainConfig
from mcore.errors import ConfigError
from mcore.mesh import build_mesh
from mcore.train import run
from mcore.train.build import config_digests
from mcore.train.loop import trim_jsonl
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host
from mcore_testing.layouts import LayoutsPlugin

#: The model and optimizer of the test harness (the isolated host registers no others).
MODEL = ["--model.name=reference-tiny", "--model.vocab_size=257", "--optimizer.name=reference-adamw"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture
def host() -> Any:
    return isolated_host("mcore_testing.plugin")


# -- #20: NaN and non-integers fail the checks of a config built in Python --------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TrainConfig(steps=math.nan), "train.steps = nan: expected int"),
        (lambda: TrainConfig(steps=2.5), "train.steps = 2.5: expected int"),
        (lambda: TrainConfig(seq_len=True), "train.seq_len = True: expected int"),
        (lambda: TrainConfig(micro_batch_size=math.nan), "train.micro_batch_size = nan: expected int or none"),
        (lambda: TrainConfig(warmup_steps=math.nan), "train.warmup_steps = nan: expected int"),
        (lambda: TrainConfig(min_lr_ratio=math.nan), "train.min_lr_ratio = nan: must be in [0, 1]"),
        (lambda: TrainConfig(grad_clip="1"), "train.grad_clip = '1': expected float"),
        (lambda: CheckpointConfig(keep_last=math.nan), "checkpoint.keep_last = nan: expected int"),
        (lambda: CheckpointConfig(every=1.5), "checkpoint.every = 1.5: expected int"),
        (lambda: LogConfig(every=math.nan), "log.every = nan: expected int"),
        (lambda: LogConfig(peak_tflops=math.nan), "log.peak_tflops = nan: must be finite"),
        (lambda: DataConfig(workers=math.nan), "data.workers = nan: expected int"),
        (lambda: DataConfig(max_tokens=0.5), "data.max_tokens = 0.5: expected int or none"),
        (lambda: DataConfig(eval_fraction=math.nan), "data.eval_fraction = nan: must be in [0, 1)"),
        (lambda: DataConfig(weights=[1.0, math.nan]), "data.weights = [1.0, nan]: every weight must be finite"),
        (lambda: ParallelConfig(timeout_s=math.nan), "parallel.timeout_s = nan: must be finite"),
        (lambda: ParallelConfig(sizes={"tp": 1.5}), "parallel.sizes = {'tp': 1.5}: expected table of int"),
        (lambda: ParallelConfig(device="gpu"), "parallel.device = 'gpu': expected one of"),
    ],
)
def test_python_configs_refuse_nan_and_non_integers(make: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        make()
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(message), str(info.value)


def test_valid_python_configs_still_build() -> None:
    assert TrainConfig(steps=3, min_lr_ratio=0, grad_clip=1).steps == 3  # ints where floats are declared are fine
    assert DataConfig(weights=[1, 2.5], max_tokens=None).weights == [1, 2.5]
    assert ParallelConfig(sizes={"tp": 2}, timeout_s=5).sizes == {"tp": 2}


# -- #12: train.out_dir empty is refused, '~' is expanded ------------------------------------------


def test_empty_out_dir_is_refused(host: Any) -> None:
    with pytest.raises(ConfigError, match=r"^train.out_dir = '': expected Path, not an empty string"):
        resolve_config(load_raw(None, [*MODEL, "--train.out_dir="]), host)
    with pytest.raises(ValueError, match=r"^train.out_dir = '': must name a directory"):
        TrainConfig(out_dir="")
    with pytest.raises(ConfigError, match=r"^data.cache_dir = '  ': expected Path or none"):
        resolve_config(load_raw(None, [*MODEL, "--data.cache_dir=  "]), host)


def test_tilde_in_out_dir_is_the_home(host: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    run_config = resolve_config(load_raw(None, [*MODEL, "--train.out_dir=~/runs/a", "--data.cache_dir=~/cache"]), host)
    assert run_config.train.out_dir == tmp_path / "runs" / "a"
    assert run_config.data.cache_dir == tmp_path / "cache"
    assert TrainConfig(out_dir="~/b").out_dir == tmp_path / "b"


# -- #17: the config file's size is capped ---------------------------------------------------------


def test_config_from_dev_zero_stops_at_the_cap(capsys: pytest.CaptureFixture[str]) -> None:
    assert mcore_main(["config", "/dev/zero"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("config file '/dev/zero' is larger than 1 MiB; allowed: a run config .toml file (a few KiB)")
    assert "\n" not in err


def test_a_config_just_under_the_cap_is_read(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[train]\nsteps = 5\n" + "#" * (MAX_CONFIG_BYTES - 40) + "\n")
    assert load_raw(path)["train"]["steps"] == 5


# -- #4: a broken metrics.jsonl does not break a resume -----------------------------------------------


def test_trim_sets_bad_lines_aside_with_one_warning(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    good = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 3, "loss": 3.0}]
    lines = [json.dumps(good[0]), "[1, 2]", json.dumps(good[1]), '"text"', '{"step": "x"}', json.dumps(good[2])]
    path.write_bytes(("\n".join(lines) + '\n{"step": 4, "lo').encode() + b"\x00" * 64 + b"\n\x00\x00")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trim_jsonl(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == good[:2]
    assert len(caught) == 1 and "5 line(s)" in str(caught[0].message), [str(w.message) for w in caught]
    aside = (tmp_path / "metrics.jsonl.bad").read_text()
    assert "[1, 2]" in aside and '{"step": 4, "lo' in aside and "\x00" not in aside


def test_resume_over_a_broken_metrics_file(host: Any, corpus: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    update = {"train": {"steps": 2}, "checkpoint": {"save_final": True}, "log": {"layer_stats_every": 1}}
    run(make_config(host, out, corpus, update), host)
    for name in ("metrics.jsonl", "layer_stats.jsonl"):
        with (out / name).open("ab") as f:
            f.write(b'[1, 2]\n{"step": 3, "loss": 1.\x00\x00\x00')
    with pytest.warns(RuntimeWarning, match="not JSON records"):
        result = run(make_config(host, out, corpus, merge(update, {"train": {"steps": 3}})), host)
    assert result.start_step == 2 and result.steps_done == 3
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3 and steps == sorted(steps)


# -- #10, #11: ranks that resolved different configs are refused -----------------------------------


def test_digests_name_fields_of_core_sections(host: Any, tmp_path: Path) -> None:
    a = resolve_config(load_raw(None, [*MODEL, f"--train.out_dir={tmp_path}", "--train.seq_len=32"]), host).to_dict()
    b = resolve_config(load_raw(None, [*MODEL, f"--train.out_dir={tmp_path}", "--train.seq_len=64"]), host).to_dict()
    da, db = config_digests(a), config_digests(b)
    assert [k for k, _ in da] == [k for k, _ in db]
    assert [k for (k, x), (_, y) in zip(da, db) if x != y] == ["train.seq_len"]
    assert all(0 <= d < 1 << 63 for _, d in da)


def _ranks_differ(root: str, corpus: str, rank1: dict[str, Any], expected: str) -> None:
    host = isolated_host("mcore_testing.plugin", LayoutsPlugin())
    update = {"parallel": {"layouts": ["test-ddp"], "timeout_s": 30.0}, "train": {"steps": 2}}
    if dist.get_rank() == 1:
        update = merge(update, rank1)
    cfg = make_config(host, Path(root) / "run", corpus, update)
    with pytest.raises(ConfigError) as info:
        run(cfg, host)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"the ranks resolved different configs: rank(s) 1 differ from rank 0 in {expected};")
    assert not (Path(root) / "run" / "metrics.jsonl").exists()  # nothing trained


def test_a_rank_with_another_seq_len_is_refused_on_every_rank(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    run_distributed(_ranks_differ, 2, str(tmp_path), corpus, {"train": {"seq_len": 8}}, "train.seq_len", timeout=90)


def _mesh_checked_first() -> None:
    """Rank 1 owns one mesh dimension more than rank 0: building the mesh, it would create other groups than rank 0
    and both would wait in ``new_group`` until the timeout; ``check`` runs before any group is created."""
    dims = ["dp_replicate"] if dist.get_rank() == 0 else ["dp_replicate", "dp_shard"]

    def same_dims(device: torch.device) -> None:
        counts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(counts, len(dims))
        if len(set(counts)) > 1:
            raise ConfigError(f"ranks own {counts} mesh dimensions")

    with pytest.raises(ConfigError, match=r"^ranks own \[1, 2\] mesh dimensions$"):
        build_mesh(dims, {"dp_shard": 1}, fill="dp_replicate", device_type="cpu", timeout_s=20.0, check=same_dims)


def test_build_mesh_runs_its_check_before_creating_groups() -> None:
    run_distributed(_mesh_checked_first, 2, timeout=60)


def test_a_rank_with_another_out_dir_is_refused_on_every_rank(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    rank1 = {"train": {"out_dir": str(tmp_path / "other")}, "model": {"hidden_size": 16}}
    run_distributed(_ranks_differ, 2, str(tmp_path), corpus, rank1, "model, train.out_dir", timeout=90)
