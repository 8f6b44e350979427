"""``pp``: the stage split and its one-line refusals, the schedules and their simulator, the deferred
weight gradients, the message headers, the harness's conformance suite (1F1B, interleaved and ZB-H1
on 2 gloo ranks, driven as the run loop drives a ``ScheduledLayout``), and auxiliary losses of a
stage other than the last (backpropagated there, and in the reported loss).

The real ``gpt`` model under pp2/pp4, with tp and fsdp, and the run loop are checked in
``integration_tests/test_pp_gpt.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from parallel_run_helpers import host, run_config
from torch import nn

from mcore.errors import ConfigError, UserError
from mcore_parallel.pp import PPLayout
from mcore_parallel.pp_comm import empty_from, header_of
from mcore_parallel.pp_grad import WeightGradStore, defer_linears
from mcore_parallel.pp_schedule import (
    Action,
    ScheduleError,
    bubble_theory,
    build,
    channel_orders,
    forwards_only,
    interleaved,
    one_f_one_b,
    simulate,
    unit_costs,
    with_comms,
    zero_bubble_h1,
)
from mcore_parallel.pp_split import check_micro_batches, rank_stages, stage_counts, stage_ranges
from mcore_testing.conformance import LayoutConformance
from mcore_testing.conformance.layout import _check_matches_single_process
from mcore_testing.dist import run_distributed
from mcore_testing.reference import TinyConfig


# -- the split --------------------------------------------------------------------------------------------------
def test_even_split_puts_the_extra_layers_first() -> None:
    assert stage_counts(8, 2) == [4, 4]
    assert stage_counts(7, 3) == [3, 2, 2]
    assert stage_counts(8, 2, 2) == [2, 2, 2, 2]
    assert stage_ranges([3, 2, 2]) == [range(0, 3), range(3, 5), range(5, 7)]
    assert rank_stages(1, 4, 2) == [1, 5]  # looped placement


def test_first_and_last_stage_layers_leave_the_rest_even() -> None:
    assert stage_counts(8, 4, first_stage_layers=1) == [1, 3, 2, 2]
    assert stage_counts(8, 4, first_stage_layers=1, last_stage_layers=1) == [1, 3, 3, 1]
    assert stage_counts(3, 2, last_stage_layers=0) == [3, 0]
    assert stage_counts(6, 2, split=[0, 6]) == [0, 6]  # an embedding-only first stage


@pytest.mark.parametrize(
    ("args", "kwargs", "pattern"),
    [
        (
            (2, 2, 2),
            {},
            r"^the model's 2 layers cannot fill parallel\.sizes\.pp = 2 x parallel\.pp\.virtual_stages = 2 = 4 stages"
            r" \(each needs one\); allowed: virtual_stages <= 1 with pp = 2, or an explicit parallel\.pp\.split$",
        ),
        (
            (3, 4),
            {},
            r"^the model's 3 layers cannot fill parallel\.sizes\.pp = 4 stages .*allowed: pp <= 3 \(e\.g\. pp = 3,",
        ),
        (
            (8, 2),
            {"split": [3, 3]},
            r"^parallel\.pp\.split = \[3, 3\] sums to 6, but the model has 8 layers; allowed: 2 counts summing to 8, "
            r"e\.g\. \[4, 4\]$",
        ),
        ((8, 4), {"split": [2, 0, 3, 3]}, r"^parallel\.pp\.split = \[2, 0, 3, 3\] .*>= 1 except the first and last"),
        ((8, 2), {"split": [8]}, r"^parallel\.pp\.split = \[8\] for parallel\.sizes\.pp = 2 stages; allowed: 2 "),
        (
            (4, 4),
            {"first_stage_layers": 2, "last_stage_layers": 1},
            r"^parallel\.pp\.first_stage_layers = 2, last_stage_layers = 1 leave 1 of the model's 4 layers for 2 other "
            r"stages .*\(e\.g\. first_stage_layers = 1, last_stage_layers = 1\)$",
        ),
    ],
)
def test_impossible_cuts_are_refused_in_one_line_with_one_that_works(
    args: tuple[int, ...], kwargs: dict[str, Any], pattern: str
) -> None:
    with pytest.raises(UserError, match=pattern) as info:
        stage_counts(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_interleaved_needs_micro_batches_in_groups_of_pp() -> None:
    with pytest.raises(UserError, match=r"^parallel\.pp\.schedule = 'interleaved' .*pp = 4, but a step has 6 .*"):
        check_micro_batches(6, 4, "interleaved")
    check_micro_batches(8, 4, "interleaved")
    check_micro_batches(6, 4, "1f1b")


def _run(layers: int, pp: int, *, layouts: tuple[str, ...] = ("pp",), gbs: int = 8, mbs: int = 2, **sizes: int) -> Any:
    return SimpleNamespace(
        parallel=SimpleNamespace(sizes={"pp": pp, **sizes}),
        layouts=[SimpleNamespace(name=n) for n in layouts],
        model=SimpleNamespace(config=SimpleNamespace(num_layers=layers)),
        train=SimpleNamespace(global_batch_size=gbs, micro_batch_size=mbs),
    )


def test_check_run_refuses_before_launch() -> None:
    with pytest.raises(UserError, match=r"cannot fill parallel\.sizes\.pp = 4 x parallel\.pp\.virtual_stages = 2"):
        PPLayout.check_run(PPLayout.Config(schedule="interleaved", virtual_stages=2), _run(6, 4))
    with pytest.raises(UserError, match=r"but a step has 2 per pipeline"):  # 8 rows / dp 2 / 2 rows = 2 micro-batches
        PPLayout.check_run(PPLayout.Config(schedule="interleaved", virtual_stages=2), _run(8, 4, dp_shard=2))
    with pytest.raises(UserError, match=r"^parallel\.pp\.schedule = 'zb-h1' with layout 'fsdp'"):
        PPLayout.check_run(PPLayout.Config(schedule="zb-h1"), _run(8, 2, layouts=("pp", "fsdp")))
    with pytest.raises(UserError, match=r"^parallel\.pp\.schedule = 'interleaved' with layout 'ddp'"):
        PPLayout.check_run(PPLayout.Config(schedule="interleaved", virtual_stages=2), _run(8, 2, layouts=("pp", "ddp")))
    PPLayout.check_run(PPLayout.Config(schedule="interleaved", virtual_stages=2), _run(8, 2))
    PPLayout.check_run(PPLayout.Config(), _run(8, 2, dp_shard=-1))  # filled at launch: not known yet


def test_config_errors_are_one_line() -> None:
    with pytest.raises(
        ValueError, match=r"^parallel\.pp\.schedule = 'gpipe'; allowed: '1f1b', 'interleaved', 'zb-h1'$"
    ):
        PPLayout.Config(schedule="gpipe")
    with pytest.raises(ValueError, match=r"^parallel\.pp\.virtual_stages = 2 with schedule = '1f1b'; allowed: 1"):
        PPLayout.Config(virtual_stages=2)
    with pytest.raises(ValueError, match=r"^parallel\.pp\.virtual_stages = 1 with schedule = 'interleaved'"):
        PPLayout.Config(schedule="interleaved")


# -- schedules and the simulator --------------------------------------------------------------------------------
def _names(acts: list[Action]) -> str:
    return " ".join(str(a) for a in acts)


def test_1f1b_warms_up_p_minus_r_minus_1_forwards() -> None:
    lists = one_f_one_b(2, 3)
    assert _names(lists[0]) == "F0s0 F1s0 B0s0 F2s0 B1s0 B2s0"
    assert _names(lists[1]) == "F0s1 B0s1 F1s1 B1s1 F2s1 B2s1"
    full = with_comms(lists, 2, 2)
    assert _names(full[1][:4]) == "RECV_F0s1@0 F0s1 B0s1 SEND_B0s1@0"


def test_interleaved_sends_micro_batches_through_the_chunks_in_groups_of_pp() -> None:
    """Rank 0 holds stages 0 and 2: (p - r - 1) * 2 + (v - 1) * p = 4 warm-up forwards, chunk 1's backwards first."""
    lists = interleaved(2, 4, 2)
    assert _names(lists[0]) == ("F0s0 F1s0 F0s2 F1s2 F2s0 B0s2 F3s0 B1s2 F2s2 B0s0 F3s2 B1s0 B2s2 B3s2 B2s0 B3s0")
    assert _names(lists[1][:6]) == "F0s1 F1s1 F0s3 B0s3 F1s3 B1s3"


@pytest.mark.parametrize(("schedule", "p", "m", "v"), [("1f1b", 2, 4, 1), ("1f1b", 4, 8, 1), ("1f1b", 4, 3, 1),
                                                       ("interleaved", 2, 4, 2), ("interleaved", 4, 8, 2),
                                                       ("interleaved", 4, 8, 4), ("interleaved", 1, 2, 3)])  # fmt: skip
def test_bubble_equals_theory_with_unit_costs(schedule: str, p: int, m: int, v: int) -> None:
    lists = with_comms(build(schedule, p, m, v), p, p * v)
    timeline = simulate(lists, unit_costs(schedule, v), stages=p * v, micro_batches=m)
    assert timeline.bubble == pytest.approx(bubble_theory(schedule, p, m, v), abs=1e-9)
    if schedule == "1f1b":  # 1F1B keeps up to p micro-batches on the first stage, one on the last
        assert timeline.peak_activations == tuple(min(p - r, m) for r in range(p))


@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 8), (4, 16), (8, 32)])
def test_zero_bubble_h1_has_a_third_of_1f1b_bubble(p: int, m: int) -> None:
    lists = with_comms(zero_bubble_h1(p, m), p, p)
    zb = simulate(lists, unit_costs("zb-h1"), stages=p, micro_batches=m)
    plain = simulate(with_comms(one_f_one_b(p, m), p, p), unit_costs("1f1b"), stages=p, micro_batches=m)
    assert zb.bubble == pytest.approx(bubble_theory("zb-h1", p, m), abs=1e-9)
    idle_zb = zb.makespan - zb.busy[0]
    idle_1f1b = plain.makespan - plain.busy[0]
    assert idle_zb == pytest.approx(idle_1f1b / 3)  # (p - 1) units instead of 3 (p - 1)
    for r in range(p):  # at most p - 1 weight gradients wait, on top of 1F1B's p - r activations
        assert zb.peak_activations[r] <= p - r + p - 1


@pytest.mark.parametrize(("p", "m", "v"), [(2, 3, 2), (4, 5, 2), (3, 1, 3)])
def test_evaluation_runs_forwards_of_any_micro_batch_count(p: int, m: int, v: int) -> None:
    lists = with_comms(forwards_only(p, m, v), p, p * v)
    timeline = simulate(lists, unit_costs("1f1b"), stages=p * v, micro_batches=m)
    assert sum(timeline.busy) == m * v * p  # every stage's forward of every micro-batch, once


def test_simulator_refuses_deadlocks_missing_inputs_and_repeats() -> None:
    lists = with_comms(one_f_one_b(2, 2), 2, 2)
    assert str(lists[0][4]) == "RECV_B0s0@1"
    swapped = [[lists[0][4], *lists[0][:4], *lists[0][5:]], lists[1]]  # rank 0 waits for B0 before sending F0
    with pytest.raises(ScheduleError, match=r"^deadlock: rank 0: RECV_B0s0@1, rank 1: RECV_F0s1@0$"):
        simulate(swapped, unit_costs("1f1b"), stages=2, micro_batches=2)
    early = [[Action("B", 0, 0), Action("F", 0, 0)], []]
    with pytest.raises(ScheduleError, match=r"B0s0 runs before its forward"):
        simulate(early, unit_costs("1f1b"), stages=1, micro_batches=1)
    twice = [[Action("F", 0, 0), Action("F", 0, 0)]]
    with pytest.raises(ScheduleError, match="runs twice"):
        simulate(twice, unit_costs("1f1b"), stages=1, micro_batches=1)
    short = [[Action("F", 0, 0), Action("B", 0, 0)]]
    with pytest.raises(ScheduleError, match=r"never run: F1s0, B1s0$"):
        simulate(short, unit_costs("1f1b"), stages=1, micro_batches=2)


@pytest.mark.parametrize(
    ("schedule", "p", "m", "v"),
    [("1f1b", 4, 6, 1), ("interleaved", 2, 4, 2), ("interleaved", 4, 8, 4), ("zb-h1", 4, 8, 1)],
)
def test_every_channel_is_received_in_the_order_it_is_sent(schedule: str, p: int, m: int, v: int) -> None:
    """First-in-first-out backends (NCCL ignores tags) then match every message without buffering."""
    full = with_comms(build(schedule, p, m, v), p, p * v)
    for (src, dst), sent in channel_orders(full).items():
        recvs = [a for a in full[dst] if a.kind.startswith("RECV_") and a.peer == src]
        assert [(a.kind[-1], a.mb, a.stage - 1 if a.kind == "RECV_F" else a.stage + 1) for a in recvs] == sent


# -- deferred weight gradients and headers ----------------------------------------------------------------------
def test_weight_gradient_deferred_until_w_then_equal() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3, bias=False))
    split = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3, bias=False))
    split.load_state_dict(plain.state_dict())
    store = WeightGradStore()
    assert defer_linears(split, store) == 2
    x = torch.randn(2, 5, 4, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    plain(x).square().sum().backward()
    with store.recording((0, 0)):
        split(x2).square().sum().backward()
    assert split[0].weight.grad is None and split[2].weight.grad is None  # B: input and bias gradients only
    assert x2.grad is not None and torch.allclose(x2.grad, x.grad)  # type: ignore[arg-type]
    assert split[0].bias.grad is not None and torch.allclose(split[0].bias.grad, plain[0].bias.grad)  # type: ignore[arg-type]
    store.apply((0, 0))  # W
    for a, b in ((split[0], plain[0]), (split[2], plain[2])):
        assert torch.allclose(a.weight.grad, b.weight.grad, rtol=1e-6)  # type: ignore[arg-type]
    assert len(store) == 0
    split(x2).sum().backward()  # outside recording: computed at once
    assert not torch.allclose(split[0].weight.grad, plain[0].weight.grad)  # type: ignore[arg-type]


def test_header_round_trip() -> None:
    t = torch.zeros(3, 5, 7, dtype=torch.bfloat16)
    back = empty_from(header_of(t), torch.device("cpu"))
    assert back.shape == t.shape and back.dtype == t.dtype
    with pytest.raises(ValueError, match="cannot send"):
        header_of(torch.zeros(1, dtype=torch.bool))


def test_model_without_stages_is_refused() -> None:
    from mcore.mesh import ParallelMesh

    mesh = ParallelMesh(dim_names=("pp",), dim_sizes=(1,), device_type="cpu")
    with pytest.raises(UserError, match=r"^layout 'pp': model Linear cannot be cut into stages") as info:
        PPLayout().apply(nn.Linear(2, 2), mesh)
    assert re.search("allowed: a StagedModel", str(info.value))


# -- the harness's suite -------------------------------------------------------------------------------------------
class TestPP1F1BConformance(LayoutConformance):
    world_size = 2
    fill_dim = "pp"

    def make_layout(self) -> PPLayout:
        return PPLayout()


@pytest.mark.slow  # interleaved and ZB-H1 are in CI through integration_tests/test_pp_gpt.py
class TestPPInterleavedConformance(TestPP1F1BConformance):
    def model_config(self) -> TinyConfig:
        return TinyConfig(num_layers=4)

    def make_layout(self) -> PPLayout:
        return PPLayout(PPLayout.Config(schedule="interleaved", virtual_stages=2))

    # interleaved sends micro-batches in groups of pp = 2: the suite's checks with 2 and 4 of them
    def test_matches_single_process(self) -> None:
        run_distributed(_check_matches_single_process, self.world_size, type(self), 2, timeout=self.timeout)

    def test_gradient_accumulation_matches_single_process(self) -> None:
        run_distributed(_check_matches_single_process, self.world_size, type(self), 4, timeout=self.timeout)


@pytest.mark.slow
class TestPPZeroBubbleConformance(TestPP1F1BConformance):
    def make_layout(self) -> PPLayout:
        return PPLayout(PPLayout.Config(schedule="zb-h1"))


def test_resolve_config_refuses_a_cut_before_launch_in_one_line(tmp_path: Path) -> None:
    update = {"parallel": {"layouts": ["pp"], "sizes": {"pp": 4}}}  # the reference model has 2 layers
    with pytest.raises(ConfigError) as info:
        run_config(host(), tmp_path / "out", str(tmp_path / "corpus"), update)
    message = str(info.value)
    assert "\n" not in message and re.search(r"the model's 2 layers cannot fill parallel\.sizes\.pp = 4", message)


# -- auxiliary losses of a stage other than the last -------------------------------------------------------------
class _AuxLayer(nn.Module):
    """A layer that adds an auxiliary loss (as an MoE router would)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, hidden: torch.Tensor, aux: Any, index: int) -> torch.Tensor:
        hidden = torch.tanh(self.lin(hidden))
        aux.add(index, "l2", 0.1 * hidden.square().mean())
        return hidden


class _AuxStage(nn.Module):
    def __init__(self, model: _AuxModel, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        if first:
            self.embed = model.embed
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        if last:
            self.head = model.head

    def forward(self, inputs: torch.Tensor, *, tokens: torch.Tensor, labels: Any = None, ctx: Any = None) -> Any:
        hidden = self.embed(inputs) if self.first else inputs
        for index, layer in self.layers.items():
            hidden = layer(hidden, ctx.aux_losses, int(index))
        if not self.last:
            return hidden
        loss = nn.functional.cross_entropy(self.head(hidden).flatten(0, 1), labels.flatten())
        return loss + sum(ctx.aux_losses.values())  # this stage's own entries (its collector holds no others)


class _AuxModel(nn.Module):
    """A ``StagedModel`` of 4 layers that each add an auxiliary loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(_AuxLayer() for _ in range(4))
        self.head = nn.Linear(8, 16)

    def stage_layers(self) -> int:
        return len(self.layers)

    def pipeline_stage(self, layers: range, *, first: bool, last: bool) -> nn.Module:
        return _AuxStage(self, layers, first, last)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from mcore.protocols import AuxLosses

        aux = AuxLosses()
        hidden = self.embed(tokens)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, aux, index)
        return nn.functional.cross_entropy(self.head(hidden).flatten(0, 1), labels.flatten()) + sum(aux.values())


def _aux_losses_equal_one_process(schedule: str) -> None:
    import copy

    from mcore.mesh import build_mesh
    from mcore.precision.basic import FP32
    from mcore.protocols import BlockContext
    from mcore_testing.numerics import assert_rel_close

    mesh = build_mesh(("pp",), {}, fill="pp", device_type="cpu")
    reference = _AuxModel()
    layout = PPLayout(PPLayout.Config(schedule=schedule))
    stage = layout.apply(copy.deepcopy(reference), mesh)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 16, (2, 5), generator=g), torch.randint(0, 16, (2, 5), generator=g)) for _ in range(3)]
    want = sum(reference(t, y) for t, y in batches) / 3
    want.backward()  # type: ignore[union-attr]
    micro = [(t, y, BlockContext()) for t, y in batches]
    got = layout.forward_backward(stage, micro, precision=FP32(), no_grad_sync=layout.no_grad_sync)
    layout.finish_grad_sync()
    assert_rel_close(got, want.detach(), 1e-5, name=f"{schedule}: loss with every stage's auxiliary losses")  # type: ignore[union-attr]
    ref = dict(reference.named_parameters())
    for name, p in stage.named_parameters():
        assert_rel_close(p.grad, ref[name].grad, 1e-5, name=f"{schedule}: grad of {name}")  # type: ignore[arg-type]


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_auxiliary_losses_of_every_stage_are_backpropagated_and_reported(schedule: str) -> None:
    run_distributed(_aux_losses_equal_one_process, 2, schedule, timeout=120)
