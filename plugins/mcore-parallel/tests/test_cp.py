"""``cp``: the zig-zag split, the harness's conformance suite (ring, all-gather and all-to-all on 2 ranks,
``a2a+ring`` on 4, with gradient accumulation), the core's run loop on 2 processes against one, MTP's
labels ahead, and the errors.

The gpt model under cp2/cp4 (GQA, MLA, sliding window, packed documents) is checked in
``integration_tests/test_cp_gpt.py``; the log-sum-exp merge in ``test_cp_lse.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from parallel_run_helpers import corpus as make_corpus
from parallel_run_helpers import metrics, run_config

from mcore.errors import ConfigError, UserError
from mcore.mesh import ParallelMesh
from mcore.protocols.block import BlockContext
from mcore.train import run
from mcore_parallel import plugin
from mcore_parallel.cp import CPLayout
from mcore_parallel.cp_split import (
    document_cost,
    document_positions,
    labels_ahead,
    plan_dynamic,
    plan_split,
    ranks_per_document,
    split_balance,
)
from mcore_testing import run_distributed
from mcore_testing.conformance import LayoutConformance
from mcore_testing.hosts import isolated_host


def _host() -> Any:
    return isolated_host("mcore_testing.plugin", plugin)


# -- the split ------------------------------------------------------------------------------------------------
def test_zigzag_keeps_chunks_r_and_mirror() -> None:
    plan = plan_split(None, 2, 8, 2, torch.device("cpu"))
    assert plan.index[0].tolist() == [[0, 1, 6, 7]] * 2
    assert plan.index[1].tolist() == [[2, 3, 4, 5]] * 2
    plan = plan_split(None, 1, 16, 4, torch.device("cpu"))
    assert [plan.index[r].tolist()[0] for r in range(4)] == [
        [0, 1, 14, 15],
        [2, 3, 12, 13],
        [4, 5, 10, 11],
        [6, 7, 8, 9],
    ]
    tokens = torch.arange(100, 116)[None]
    assert plan.take(1, tokens, -1).tolist() == [[102, 103, 112, 113]]


def test_packed_documents_split_each_on_their_own_and_padded() -> None:
    """Documents of 3 and 6 tokens in a row of 9, cp2: each padded to a multiple of 4, split zig-zag."""
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)
    plan = plan_split(cu, 1, 9, 2, torch.device("cpu"))
    # doc 0 (3 -> 4 tokens, chunks of 1): rank 0 keeps 0 and pad, rank 1 keeps 1, 2
    # doc 1 (6 -> 8 tokens, chunks of 2, starting at 3): rank 0 keeps 3, 4 and pads, rank 1 keeps 5, 6, 7, 8
    assert plan.index[0].tolist() == [[0, -1, 3, 4, -1, -1]]
    assert plan.index[1].tolist() == [[1, 2, 5, 6, 7, 8]]
    assert plan.docs[0].tolist() == [[0, -1, 1, 1, -1, -1]]
    assert document_positions(cu, 1, 9, torch.device("cpu")).tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5]]
    labels = torch.arange(9)[None]
    assert plan.take(0, labels, -100).tolist() == [[0, -100, 3, 4, -100, -100]]


def test_dynamic_ranks_per_document_fit_the_mean_share() -> None:
    # 64 tokens over cp4: 16 per rank; a document fits on s ranks when length <= 16 * s (s dividing 4)
    assert ranks_per_document([40, 17, 4, 2, 1], 4) == [4, 2, 1, 1, 1]
    assert ranks_per_document([100], 4) == [4]  # longer than the whole group's share: every rank
    # 10 tokens over cp3: 4 per rank; only 1 and 3 divide 3
    assert ranks_per_document([5, 5], 3) == [3, 3] and ranks_per_document([4, 4, 2], 3) == [1, 1, 1]


def test_dynamic_plan_keeps_short_documents_whole_and_splits_long_ones() -> None:
    """Documents of 40, 12, 6, 4 and 2 tokens in a row of 64 under cp4 (16 tokens per rank): the 40 zig-zag over
    all 4 ranks (chunks of 5), the 12 over the pair that fits it (chunks of 3), the rest whole; every rank 16."""
    cu = torch.tensor([0, 40, 52, 58, 62, 64], dtype=torch.int32)
    plan = plan_dynamic(cu, 1, 64, 4, torch.device("cpu"))
    rows = [i[0].tolist() for i in plan.index]
    assert rows == [
        [*range(0, 5), *range(35, 40), 40, 41, 42, 49, 50, 51],
        [*range(5, 10), *range(30, 35), *range(43, 49)],
        [*range(10, 15), *range(25, 30), *range(52, 58)],  # the 6-token document whole
        [*range(15, 20), *range(20, 25), *range(58, 64)],  # the 4- and 2-token documents whole
    ]
    assert plan.flat and plan.shared == 16  # ranks 0 and 1 hold only split tokens
    # two rows: a document across the row end is two spans (as in one process); every token exactly once
    two_rows = plan_dynamic(torch.tensor([0, 3, 4, 27, 32]), 2, 16, 4, torch.device("cpu"))
    assert sorted(t for i in two_rows.index for t in i.reshape(-1).tolist() if t >= 0) == list(range(32))
    tokens = torch.arange(100, 132).view(2, 16)
    flat = two_rows.index[1].clamp(min=0)
    assert two_rows.take(1, tokens, -1).tolist() == torch.where(two_rows.index[1] >= 0, flat + 100, -1).tolist()


def _balance(lengths: list[int], planner: Any) -> dict[str, float]:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    seq = int(cu[-1])
    return split_balance(planner(cu, 1, seq, 4, torch.device("cpu")), cu, 1, seq)


def test_dynamic_plan_balances_and_exchanges_less_than_static() -> None:
    long_tail = [900, 300, 120, 60, 40, 30, 20, 12, 8, 6, 4, 2, 2]  # 1504 tokens, one long document
    static, dynamic = _balance(long_tail, plan_split), _balance(long_tail, plan_dynamic)
    assert static["needed_fraction"] == 1.0 and dynamic["needed_fraction"] < 0.85  # the short ones stay local
    assert dynamic["padding_fraction"] < static["padding_fraction"] and dynamic["max_over_mean_tokens"] < 1.01
    short = [200] + [30] * 40 + [10] * 60  # nothing longer than a rank's share: nothing exchanged
    static, dynamic = _balance(short, plan_split), _balance(short, plan_dynamic)
    assert dynamic["sent_fraction"] == 0.0 and static["sent_fraction"] > 1.0
    assert dynamic["max_over_mean_tokens"] == 1.0 < static["max_over_mean_tokens"]


def test_dynamic_work_balance_weighs_long_documents_by_their_pairs() -> None:
    """Documents of 30 and 17 x 2 tokens under cp2: by tokens (32 a rank) the 30 stays whole; weighed with its
    causal pairs (attention_tokens = 8: 30 + 465 / 8 = 88.1 of 128.5 in all) it is split over both ranks."""
    lengths = [30] + [2] * 17
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    by_tokens = plan_dynamic(cu, 1, 64, 2, torch.device("cpu"))
    by_work = plan_dynamic(cu, 1, 64, 2, torch.device("cpu"), attention_tokens=8)
    assert by_tokens.shared == 0 and by_work.shared > 0  # only the work plan splits the long document
    tokens, work = (split_balance(p, cu, 1, 64, attention_tokens=8) for p in (by_tokens, by_work))
    assert work["max_over_mean_cost"] < tokens["max_over_mean_cost"]
    assert document_cost(30, 8) == 30 + 30 * 31 / 16 and document_cost(30, None) == 30.0
    with pytest.raises(ValueError, match=r"parallel\.cp\.dynamic_balance = 'flops'; allowed: 'tokens', 'work'"):
        CPLayout.Config(dynamic=True, dynamic_balance="flops")


def test_rows_of_one_document_must_split_into_2cp_chunks() -> None:
    with pytest.raises(UserError, match=r"train\.seq_len = 10 does not split into 2 \* cp = 4 .* a multiple of 4"):
        plan_split(None, 1, 10, 2, torch.device("cpu"))


# -- errors without a process group ---------------------------------------------------------------------------
def test_unknown_kind_is_refused_in_one_line() -> None:
    with pytest.raises(
        ValueError, match=r"^parallel\.cp\.kind = 'ulysses'; allowed: 'ring', 'allgather', 'a2a', 'a2a\+ring'$"
    ):
        CPLayout.Config(kind="ulysses")


def _run_with_cp(cp: int, seq_len: int = 16, packing: str = "concat") -> Any:
    return SimpleNamespace(
        parallel=SimpleNamespace(sizes={"cp": cp}),
        train=SimpleNamespace(seq_len=seq_len),
        data=SimpleNamespace(packing=packing),
    )


def test_a2a_ring_needs_an_a2a_size_dividing_cp_between_1_and_cp() -> None:
    with pytest.raises(
        ValueError, match=r"^parallel\.cp\.a2a_size = None with parallel\.cp\.kind = 'a2a\+ring'; allowed"
    ):
        CPLayout.Config(kind="a2a+ring")
    with pytest.raises(ValueError, match=r"^parallel\.cp\.a2a_size = 1 with .*an int above 1 dividing"):
        CPLayout.Config(kind="a2a+ring", a2a_size=1)
    for a2a, cp, fits in ((4, 4, r"\(2\)"), (3, 8, r"\(2, 4\)"), (2, 2, r"\(none: use kind 'a2a' or 'ring'\)")):
        config = CPLayout.Config(kind="a2a+ring", a2a_size=a2a)
        with pytest.raises(UserError) as info:
            CPLayout.check_run(config, _run_with_cp(cp))
        message = str(info.value)
        assert "\n" not in message and re.search(
            rf"^parallel\.cp\.a2a_size = {a2a} with parallel\.cp\.kind = 'a2a\+ring' and parallel\.sizes\.cp = {cp}; "
            rf"allowed: a divisor of {cp} above 1 and below it {fits}$",
            message,
        ), message
    CPLayout.check_run(CPLayout.Config(kind="a2a+ring", a2a_size=2), _run_with_cp(4))
    with pytest.warns(UserWarning, match=r"parallel\.cp\.a2a_size = 2 is not used by parallel\.cp\.kind = 'ring'"):
        CPLayout.Config(kind="ring", a2a_size=2)


def test_check_run_refuses_seq_len_not_divisible_by_2cp() -> None:
    with pytest.raises(UserError, match=r"train\.seq_len = 12 .* parallel\.sizes\.cp = 4; allowed: a multiple of 8"):
        CPLayout.check_run(CPLayout.Config(), _run_with_cp(4, 12, "concat"))
    CPLayout.check_run(CPLayout.Config(), _run_with_cp(4, 16, "concat"))
    CPLayout.check_run(CPLayout.Config(), _run_with_cp(4, 12, "thd"))  # packed: documents are padded


def test_resolve_config_refuses_seq_len_in_one_line(tmp_path: Path) -> None:
    host = _host()
    update = {"parallel": {"layouts": ["cp"], "sizes": {"cp": 4}}, "train": {"seq_len": 12}}
    with pytest.raises(ConfigError) as info:
        run_config(host, tmp_path / "out", str(tmp_path / "corpus"), update)
    assert "\n" not in str(info.value) and re.search(r"train\.seq_len = 12 .*a multiple of 8", str(info.value))


def test_resolve_config_refuses_a2a_size_in_one_line(tmp_path: Path) -> None:
    host = _host()
    parallel = {"layouts": ["cp"], "sizes": {"cp": 4}, "cp": {"kind": "a2a+ring", "a2a_size": 4}}
    with pytest.raises(ConfigError) as info:
        run_config(host, tmp_path / "out", str(tmp_path / "corpus"), {"parallel": parallel})
    assert "\n" not in str(info.value) and re.search(
        r"parallel\.cp\.a2a_size = 4 with .*allowed: a divisor of 4 above 1 and below it \(2\)", str(info.value)
    ), str(info.value)


def test_mtp_is_accepted_under_cp() -> None:
    """Multi-token prediction used to be refused; the layout now hands it the row ahead (``MTP_AHEAD``)."""
    model = torch.nn.Linear(2, 2)
    model.config = SimpleNamespace(mtp_num_layers=2)  # type: ignore[assignment]
    mesh = ParallelMesh(dim_names=("cp",), dim_sizes=(2,), device_type="cpu")
    assert CPLayout().apply(model, mesh) is model


def test_cp1_is_the_plain_step() -> None:
    """At ``cp`` size 1 the layout changes nothing (issue 16's 32k-token step at cp 1 is the plain step by
    construction): the model, the batch and the context come back as the same objects, no loss group, no sync."""
    model = torch.nn.Linear(2, 2)
    mesh = ParallelMesh(dim_names=("cp",), dim_sizes=(1,), device_type="cpu")
    layout = CPLayout(CPLayout.Config(kind="ring"))
    assert layout.apply(model, mesh) is model
    tokens, labels = torch.randint(0, 9, (2, 8)), torch.randint(0, 9, (2, 8))
    ctx = BlockContext(positions=torch.arange(8)[None], cu_seqlens=torch.tensor([0, 5, 16], dtype=torch.int32))
    out = layout.shard_batch(tokens, labels, ctx)
    assert out[0] is tokens and out[1] is labels and out[2] is ctx
    assert layout.loss_group() is None and layout.data_parallel().size == 1


def test_mtp_labels_ahead_stop_at_document_ends() -> None:
    """Depth d's labels from the whole row: ``labels[i + d]`` inside token i's document, else ignored."""
    labels = torch.arange(10, 19)[None]  # (1, 9)
    positions = document_positions(torch.tensor([0, 3, 9]), 1, 9, torch.device("cpu"))  # documents of 3 and 6
    assert labels_ahead(labels, positions, 1).tolist() == [[11, 12, -100, 14, 15, 16, 17, 18, -100]]
    assert labels_ahead(labels, positions, 2).tolist() == [[12, -100, -100, 15, 16, 17, 18, -100, -100]]


# -- the harness's suite ---------------------------------------------------------------------------------------
class TestCPRingConformance(LayoutConformance):
    world_size = 2
    fill_dim = "cp"

    def make_layout(self) -> CPLayout:
        return CPLayout(CPLayout.Config(kind="ring"))


class TestCPAllGatherConformance(TestCPRingConformance):
    def make_layout(self) -> CPLayout:
        return CPLayout(CPLayout.Config(kind="allgather"))


class TestCPAllToAllConformance(TestCPRingConformance):
    def make_layout(self) -> CPLayout:
        return CPLayout(CPLayout.Config(kind="a2a"))

    @pytest.mark.slow  # accumulation is the layout's deferred sum, the same for every kind: one spawn in CI
    def test_gradient_accumulation_matches_single_process(self) -> None:
        super().test_gradient_accumulation_matches_single_process()


class TestCPHybridConformance(TestCPRingConformance):
    """``a2a+ring`` on 4 ranks: all-to-all inside pairs, a ring of 2 across them."""

    world_size = 4

    def make_layout(self) -> CPLayout:
        return CPLayout(CPLayout.Config(kind="a2a+ring", a2a_size=2))

    @pytest.mark.slow  # the deferred sum is the same for every kind: one spawn in CI
    def test_gradient_accumulation_matches_single_process(self) -> None:
        super().test_gradient_accumulation_matches_single_process()


# -- the run loop: cp2 equals one process ----------------------------------------------------------------------
STEPS = 3


def _config(host: Any, out_dir: Path, corpus: str, layouts: list[str], kind: str = "ring") -> Any:
    parallel: dict[str, Any] = {"layouts": layouts}
    if layouts == ["cp"]:
        parallel["cp"] = {"kind": kind}
    update = {"parallel": parallel, "train": {"steps": STEPS, "global_batch_size": 4, "eval_every": 3}}
    return run_config(host, out_dir, corpus, update)


def _cp2_runs(root: str, corpus: str) -> None:
    host = _host()
    for kind in ("ring", "allgather"):
        run(_config(host, Path(root) / kind, corpus, ["cp"], kind), host)
    dist.barrier()


def test_run_on_cp2_equals_one_process(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path)
    run_distributed(_cp2_runs, 2, str(tmp_path), corpus, timeout=300)
    host = _host()
    run(_config(host, tmp_path / "one", corpus, ["single"]), host)
    ref = metrics(tmp_path / "one")
    for kind in ("ring", "allgather"):
        got = metrics(tmp_path / kind)
        assert sorted(got) == sorted(ref), kind
        for step in range(1, STEPS + 1):
            for key in ("loss", "grad_norm", "eval_loss"):
                if key in ref[step] or key in got[step]:
                    assert got[step][key] == pytest.approx(ref[step][key], rel=1e-5), (kind, step, key)


def test_registered_as_layout_cp() -> None:
    host = isolated_host(plugin)
    assert host.registry.load("layout", "cp") is CPLayout
    assert CPLayout.mesh_dims == ("cp",)
