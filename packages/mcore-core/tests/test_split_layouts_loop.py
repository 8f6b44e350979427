"""The run loop drives layouts that split the sequence (``shard_batch``/``loss_group``) and the
stages (``forward_backward``/``forward_only``): two gloo processes equal one, and checkpoints move
between two pipeline stages and one process, both ways.

The stand-ins (``mcore_testing.split_layouts``: ``test-seq``, ``test-pp``) run the simplest correct
algorithm; what is tested is the loop's side of the contract: each micro-batch sharded, the loss
split over the loss group and summed back, the schedule called instead of the loop's own, the
gradient norm counting each element once (clipping is active at these sizes), evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from test_train_loop import make_config, make_corpus, merge

from mcore.train import run
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host
from mcore_testing.split_layouts import SplitLayoutsPlugin

COMMON: dict[str, Any] = {
    "train": {"steps": 4, "eval_every": 2, "grad_clip": 0.5},
    "data": {"packing": "concat"},
    "checkpoint": {"save_final": True},
}
SEQ = merge(COMMON, {"parallel": {"layouts": ["test-seq"]}})
PP = merge(COMMON, {"parallel": {"layouts": ["test-pp"]}, "model": {"num_layers": 3}})


def _host() -> Any:
    return isolated_host("mcore_testing.plugin", SplitLayoutsPlugin())


def _metrics(out_dir: Path) -> dict[int, dict[str, Any]]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "step" in r}


def _two_ranks(root: str, corpus: str) -> None:
    root_path, host = Path(root), _host()
    run(make_config(host, root_path / "seq", corpus, SEQ), host)
    run(make_config(host, root_path / "pp", corpus, PP), host)
    # a one-process checkpoint (written by the test before) resumes on two stages
    ckpt = root_path / "one_first" / "checkpoints" / "step_00000004"
    cfg = merge(PP, {"train": {"steps": 6, "resume": str(ckpt)}})
    grown = run(make_config(host, root_path / "grown", corpus, cfg), host)
    if dist.get_rank() == 0:
        (root_path / "grown.json").write_text(json.dumps(grown.losses))
    dist.barrier()


def _same(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], keys: tuple[str, ...]) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        for key in keys:
            if key in a[step] or key in b[step]:
                assert a[step][key] == pytest.approx(b[step][key], rel=1e-5), (step, key)


def test_sequence_split_and_pipeline_stages_match_one_process(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    host = _host()
    run(make_config(host, tmp_path / "one_first", corpus, merge(COMMON, {"model": {"num_layers": 3}})), host)
    run_distributed(_two_ranks, 2, str(tmp_path), corpus, timeout=300)
    one_seq = tmp_path / "one_seq"
    run(make_config(host, one_seq, corpus, merge(COMMON, {})), host)
    _same(_metrics(tmp_path / "seq"), _metrics(one_seq), ("loss", "grad_norm", "eval_loss"))
    one_pp = tmp_path / "one_pp"
    run(make_config(host, one_pp, corpus, merge(COMMON, {"model": {"num_layers": 3}})), host)
    _same(_metrics(tmp_path / "pp"), _metrics(one_pp), ("loss", "grad_norm", "eval_loss"))
    # the two stages' checkpoint holds the whole model under its own names: it resumes on one
    # process exactly as the one-process checkpoint of the same step does
    longer = merge(COMMON, {"model": {"num_layers": 3}, "train": {"steps": 6}})
    conts = []
    for name, source in (("from_pp", tmp_path / "pp"), ("from_one", one_pp)):
        ckpt = source / "checkpoints" / "step_00000004"
        cfg = merge(longer, {"train": {"resume": str(ckpt)}})
        conts.append(run(make_config(host, tmp_path / name, corpus, cfg), host))
    assert conts[0].start_step == conts[1].start_step == 4
    grown = json.loads((tmp_path / "grown.json").read_text())
    for step in (5, 6):
        assert conts[0].losses[step] == pytest.approx(conts[1].losses[step], rel=1e-5)
        assert grown[str(step)] == pytest.approx(conts[1].losses[step], rel=1e-5)  # one process -> two stages
