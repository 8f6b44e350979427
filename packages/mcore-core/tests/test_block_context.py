"""``BlockContext`` is what a call sees, and it is its own: frozen views, read-only ``extra``,
a per-call ``AuxLosses`` collector keyed by (layer, name), and activation recompute that re-runs
a layer with exactly the view it first saw (issue 13)."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from typing import Any

import pytest
import torch
from torch import nn

from mcore.protocols import AuxLosses, BlockContext
from mcore.train.recompute import apply_recompute


def test_a_block_cannot_change_the_context() -> None:
    ctx = BlockContext(positions=torch.arange(4)[None], extra={"plugin.key": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.layer_index = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.cu_seqlens = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        ctx.extra["plugin.key"] = 2  # type: ignore[index]
    with pytest.raises(TypeError):
        del ctx.extra["plugin.key"]  # type: ignore[attr-defined]


def test_extra_is_a_copy_of_what_the_caller_gave() -> None:
    given = {"plugin.key": 1}
    ctx = BlockContext(extra=given)
    given["plugin.key"] = 2
    given["plugin.other"] = 3
    assert dict(ctx.extra) == {"plugin.key": 1}


def test_a_context_copies_and_pickles() -> None:
    ctx = BlockContext(positions=torch.arange(4)[None], layer_index=2, extra={"plugin.key": torch.ones(2)})
    for copied in (copy.deepcopy(ctx), pickle.loads(pickle.dumps(ctx))):
        assert copied.layer_index == 2 and torch.equal(copied.positions, ctx.positions)
        assert torch.equal(copied.extra["plugin.key"], ctx.extra["plugin.key"])
        with pytest.raises(TypeError):
            copied.extra["plugin.key"] = 0  # type: ignore[index]


def test_for_layer_makes_a_new_view_and_leaves_the_call_context_alone() -> None:
    aux = AuxLosses()
    call = BlockContext(positions=torch.zeros(1, 4, dtype=torch.long), aux_losses=aux, extra={"a": 1})
    view = call.for_layer(3, extra={"b": 2})
    assert view is not call and view.layer_index == 3 and dict(view.extra) == {"a": 1, "b": 2}
    assert view.positions is call.positions and view.aux_losses is aux  # one call: one batch, one collector
    assert call.layer_index == 0 and dict(call.extra) == {"a": 1}
    assert call.for_layer(1).layer_index == 1 and view.layer_index == 3


def test_aux_losses_keep_one_entry_per_layer_and_name() -> None:
    aux = AuxLosses()
    ctx = BlockContext(aux_losses=aux)
    ctx.for_layer(0).add_aux_loss("balance", torch.tensor(1.0))
    ctx.for_layer(1).add_aux_loss("balance", torch.tensor(2.0))
    ctx.for_layer(1).add_aux_loss("z", torch.tensor(3.0))
    ctx.for_layer(0).add_aux_loss("balance", torch.tensor(4.0))  # the same layer re-run: replaces
    assert list(aux) == [(0, "balance"), (1, "balance"), (1, "z")]
    assert [float(v) for v in aux.values()] == [4.0, 2.0, 3.0]


def test_adding_an_aux_loss_without_a_collector_says_how_to_give_one() -> None:
    with pytest.raises(RuntimeError, match=r"BlockContext\(aux_losses=AuxLosses\(\)\)"):
        BlockContext().add_aux_loss("balance", torch.tensor(1.0))


class Probe(nn.Module):
    """Records the layer index of every call; output and aux loss depend on the index and the input."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        self.seen: list[int] = []

    def forward(self, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        self.seen.append(ctx.layer_index)
        out = torch.tanh(self.proj(hidden)) * (1 + ctx.layer_index)  # (B, T, H)
        ctx.add_aux_loss("probe", 0.1 * (1 + ctx.layer_index) * out.float().square().mean())
        return out


class Layer(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.attention = Probe(hidden)
        self.mlp = nn.Linear(hidden, hidden)

    def forward(self, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        hidden = hidden + self.attention(hidden, ctx)
        return hidden + self.mlp(hidden)


class Model(nn.Module):
    """A model as the ``ModelFactory`` contract asks: one view per layer call, aux losses summed once."""

    def __init__(self, num_layers: int = 3, hidden: int = 8, vocab: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Layer(hidden) for _ in range(num_layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor, *, labels: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        aux_losses = ctx.aux_losses if ctx.aux_losses is not None else AuxLosses()
        ctx = dataclasses.replace(ctx, aux_losses=aux_losses)
        hidden = self.embed(tokens)  # (B, T, H)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, ctx.for_layer(index))
        loss = nn.functional.cross_entropy(self.head(hidden).flatten(0, 1), labels.flatten())
        for aux in aux_losses.values():
            loss = loss + aux
        return loss


def run_step(mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], Model, AuxLosses]:
    torch.manual_seed(0)
    model = Model()
    apply_recompute(model, mode)  # as the run loop does, from outside the model
    tokens = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(1))
    aux = AuxLosses()
    loss = model(tokens, labels=tokens.roll(-1, 1), ctx=BlockContext(aux_losses=aux))
    loss.backward()
    grads: dict[str, Any] = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, model, aux


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_re_runs_each_layer_with_its_own_view(mode: str) -> None:
    loss, grads, model, aux = run_step("none")
    loss_rc, grads_rc, model_rc, aux_rc = run_step(mode)
    assert torch.equal(loss_rc, loss)
    for name, grad in grads.items():
        assert torch.equal(grads_rc[name], grad), f"grad of {name} changed under recompute {mode!r}"
    for index, layer in enumerate(model_rc.layers):
        assert layer.attention.seen == [index, index]  # forward, then the recompute in backward
    assert [layer.attention.seen for layer in model.layers] == [[0], [1], [2]]
    assert list(aux_rc) == list(aux) == [(0, "probe"), (1, "probe"), (2, "probe")]  # counted once


def test_sequence_state_blocks_lists_the_modules_whose_class_declares_it() -> None:
    from mcore.protocols.block import sequence_state_blocks

    class Recurrent(nn.Module):
        carries_sequence_state = True

    class Plain(nn.Module):
        pass

    model = nn.Sequential(Plain(), nn.Sequential(Recurrent(), Plain()), Recurrent())
    assert sequence_state_blocks(model) == ["1.0", "2"]
    model[2].carries_sequence_state = False  # an instance attribute does not count: the class declares it
    assert sequence_state_blocks(model) == ["1.0", "2"]
    assert sequence_state_blocks(nn.Linear(2, 2)) == []
