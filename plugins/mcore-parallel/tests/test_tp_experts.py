"""``tp`` on a model with an expert block (parameters of role ``expert``), without a process group: the plan
leaves the stacked expert weights to an expert-parallel layout instead of refusing them, finds the block, its
shared-expert region and the router whose gradient is summed, takes the block out of sequence parallelism's
gathered regions, and refuses in one line what it cannot run. The runs that equal one process are in
``integration_tests/test_ep_tp_gpt.py`` (with mcore-moe's ``moe`` block and ``ep`` layout)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mcore.mesh import ParallelMesh
from mcore.params import ParamSpec
from mcore_parallel.sequence_parallel import plan_sequence_parallel
from mcore_parallel.tp import TPLayout
from mcore_parallel.tp_experts import plan_expert_tokens, sequence_plan
from mcore_parallel.tp_plan import plan_tp

H, E, F = 8, 4, 6


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.down = nn.Linear(H, F, bias=False), nn.Linear(F, H, bias=False)


class Stacked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(E, F, H))


class ToyExperts(nn.Module):
    """Declares a router, stacked experts (role ``expert``) and a shared expert split over tp."""

    def __init__(self, *, shared: bool = True, stray: bool = False) -> None:
        super().__init__()
        self.router = nn.Parameter(torch.zeros(E, H))
        self.experts = Stacked()
        self.shared = Shared() if shared else None
        self.stray = nn.Linear(H, F, bias=False) if stray else None

    def param_specs(self) -> dict[str, ParamSpec]:
        specs = {"router": ParamSpec("router", tp="replicate"), "experts.weight": ParamSpec("expert", tp="column")}
        if self.shared is not None:
            specs |= {
                "shared.gate.weight": ParamSpec("matrix", tp="column"),
                "shared.down.weight": ParamSpec("matrix", tp="row"),
            }
        if self.stray is not None:
            specs["stray.weight"] = ParamSpec("matrix", tp="column")
        return specs


class Layer(nn.Module):
    def __init__(self, **kwargs: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(H, bias=False)
        self.mlp = ToyExperts(**kwargs)

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"norm.weight": ParamSpec("norm")}


class Toy(nn.Module):
    def __init__(self, **kwargs: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(**kwargs)])


def test_plan_leaves_experts_whole_and_finds_the_block() -> None:
    model = Toy()
    plan = plan_tp(model, 2, vocab_parallel_loss=False)  # before: refused ('experts' is no nn.Linear weight)
    assert plan.experts == ["layers.0.mlp.experts.weight"]
    assert plan.expert_blocks == ["layers.0.mlp"]
    assert plan.colwise == ["layers.0.mlp.shared.gate"] and plan.rowwise == ["layers.0.mlp.shared.down"]
    experts = plan_expert_tokens(model, plan)
    assert experts.regions == ["layers.0.mlp.shared"]
    assert experts.row_outputs == {"layers.0.mlp.shared.down"}
    assert experts.summed == ["layers.0.mlp.router"]  # sees a rank's tokens; the experts are decided per sync


def test_sequence_parallel_runs_the_block_on_the_ranks_tokens() -> None:
    """The block is not gathered (it routes its rank's tokens); its shared expert is, with or without one."""
    for shared, regions in ((True, ["layers.0.mlp.shared"]), (False, [])):
        model = Toy(shared=shared)
        plan = plan_tp(model, 2, vocab_parallel_loss=False)
        sp = sequence_plan(
            plan_sequence_parallel(model, plan, token_wise=plan.expert_blocks), plan_expert_tokens(model, plan)
        )
        assert sp.regions == regions
        assert sp.row_outputs == ({"layers.0.mlp.shared.down"} if shared else set())
        assert sp.summed == ["layers.0.norm.weight"]


def test_refusals_are_one_line() -> None:
    with pytest.raises(ValueError, match=r"^tp: 'layers.0.mlp' holds expert parameters .*allowed: with layout 'ep'"):
        TPLayout().apply(Toy(), ParallelMesh(("tp",), (2,), "cpu", None))
    model = Toy(stray=True)
    with pytest.raises(ValueError, match=r"^tp: 'layers.0.mlp.stray' in expert block 'layers.0.mlp' splits") as err:
        plan_expert_tokens(model, plan_tp(model, 2, vocab_parallel_loss=False))
    assert "\n" not in str(err.value)


def test_tp1_with_expert_blocks_needs_no_ep() -> None:
    model = Toy()
    assert TPLayout().apply(model, ParallelMesh(("tp",), (1,), "cpu", None)) is model


def test_expert_tp_splits_the_ffn_and_keeps_the_block_a_region() -> None:
    model = Toy()
    plan = plan_tp(model, 2, vocab_parallel_loss=False, expert_tp=True)
    assert plan.expert_splits == {"layers.0.mlp.experts.weight": 1}  # declared column: (E, F, H) split along F
    experts = plan_expert_tokens(model, plan)
    assert experts.split == ["layers.0.mlp.experts"] and experts.regions == [] and experts.summed == []
    sp = sequence_plan(plan_sequence_parallel(model, plan, token_wise=experts.blocks), experts)
    assert sp.regions == ["layers.0.mlp"]  # gathered as attention is; its row outputs all-reduce
    assert sp.row_outputs == set()
    alone = Toy(shared=False)
    with pytest.raises(ValueError, match=r"^tp: 'layers.0.mlp.experts.weight' has 6 rows \(FFN, dim 1\), which do not"):
        plan_tp(alone, 4, vocab_parallel_loss=False, expert_tp=True)
    with pytest.raises(ValueError, match=r"^parallel.tp.expert_tp = 1; allowed: true or false$"):
        TPLayout.Config(expert_tp=1)  # type: ignore[arg-type]
