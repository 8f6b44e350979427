"""State dicts: keyed by name, checked against the model, refused on mismatch naming it."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import SINGLE, batches, tiny_model, train
from torch import nn

from mcore_optim.adamw import AdamWFactory
from mcore_optim.muon import MuonFactory
from mcore_testing.reference import TinyConfig, TinyTransformer

FACTORIES = {
    "adamw": lambda: AdamWFactory(AdamWFactory.Config(lr=3e-3, impl="foreach")),
    "muon": lambda: MuonFactory(MuonFactory.Config(lr=0.01, ns_dtype="float32")),
}


class Reordered(TinyTransformer):
    """The same parameters under the same names, registered in another order."""

    def __init__(self, cfg: TinyConfig | None = None, *, seed: int = 0) -> None:
        super().__init__(cfg, seed=seed)
        modules = dict(self._modules)
        self._modules.clear()
        for name in reversed(list(modules)):
            self._modules[name] = modules[name]
        for layer in self.layers:
            inner = dict(layer._modules)
            layer._modules.clear()
            for name in reversed(list(inner)):
                layer._modules[name] = inner[name]


def trained(name: str, model: nn.Module) -> tuple[nn.Module, object]:
    optimizer = FACTORIES[name]().build(model, mesh=SINGLE, layouts=[])
    train(model, optimizer, batches(3))
    return model, optimizer


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_is_keyed_by_name_with_shapes(name: str) -> None:
    model, optimizer = trained(name, tiny_model())
    state = optimizer.state_dict()
    assert state["params"]["layers.0.attn.qkv.weight"] == "96x32"
    assert set(state["state"]) == {n for n, _ in model.named_parameters()}
    assert state["algorithm"] == name


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_shuffled_parameter_order_loads_by_name(name: str) -> None:
    """A model whose parameters come in another order resumes exactly: nothing is matched by position."""
    model, optimizer = trained(name, tiny_model())
    model_state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    other = Reordered(seed=5)
    assert [n for n, _ in other.named_parameters()] != [n for n, _ in model.named_parameters()]
    other.load_state_dict(model_state)
    other_opt = FACTORIES[name]().build(other, mesh=SINGLE, layouts=[])
    other_opt.load_state_dict(opt_state)
    step = batches(1, seed=9)
    train(model, optimizer, step)
    train(other, other_opt, step)
    params = dict(other.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_moved_to_other_parameters_is_refused(name: str) -> None:
    """Entries shuffled between parameters (as a positional loader would do) are caught by shape."""
    _, optimizer = trained(name, tiny_model())
    state = copy.deepcopy(optimizer.state_dict())
    entries = state["state"]
    names = list(entries)
    shuffled = dict(zip(names, [entries[n] for n in names[1:] + names[:1]]))
    state["state"] = shuffled
    fresh = FACTORIES[name]().build(tiny_model(), mesh=SINGLE, layouts=[])
    before = copy.deepcopy(fresh.state_dict())
    # (two parameters of one shape swapped would pass: that is corrupt data, not a mismatch to detect)
    with pytest.raises(ValueError, match=r"saved optimizer state '[\w.]+'.'\w+' has shape \w+, expected \w+"):
        fresh.load_state_dict(state)
    after = fresh.state_dict()
    for n in before["state"]:  # a refused load changes nothing
        for k, v in before["state"][n].items():
            assert torch.equal(v, after["state"][n][k])


def test_refusals_name_the_first_mismatch() -> None:
    _, optimizer = trained("adamw", tiny_model())
    state = optimizer.state_dict()
    fresh = FACTORIES["adamw"]().build(tiny_model(), mesh=SINGLE, layouts=[])

    renamed = copy.deepcopy(state)
    renamed["params"]["lm_head.W"] = renamed["params"].pop("lm_head.weight")
    with pytest.raises(
        ValueError, match=r"model parameter 'lm_head.weight' has no saved optimizer state \(the state has 'lm_head.W'"
    ):
        fresh.load_state_dict(renamed)

    reshaped = copy.deepcopy(state)
    reshaped["params"]["embed.weight"] = "65x32"
    with pytest.raises(ValueError, match=r"model parameter 'embed.weight' has shape 64x32, but its saved .* 65x32"):
        fresh.load_state_dict(reshaped)

    extra = copy.deepcopy(state)
    extra["params"]["ghost.weight"] = "3x3"
    with pytest.raises(ValueError, match=r"saved optimizer state has parameter 'ghost.weight', which the model lacks"):
        fresh.load_state_dict(extra)

    with pytest.raises(ValueError, match=r"algorithm = 'adamw', but this optimizer is 'muon'"):
        FACTORIES["muon"]().build(tiny_model(), mesh=SINGLE, layouts=[]).load_state_dict(state)

    with pytest.raises(ValueError, match=r"lacks key 'format'"):
        fresh.load_state_dict({"state": {}})


def test_learning_rates_are_restored_by_role() -> None:
    _, optimizer = trained("muon", tiny_model())
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * 0.25
    state = optimizer.state_dict()
    fresh = FACTORIES["muon"]().build(tiny_model(), mesh=SINGLE, layouts=[])
    fresh.load_state_dict(state)
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in optimizer.param_groups]


def test_state_saved_before_a_role_changed_loads_with_a_warning() -> None:
    """A checkpoint from before the head was declared (gpt's head was a ``matrix`` then): AdamW's state is
    the same tensors, so it loads by name; the new ``head`` group keeps its configured lr."""
    model = tiny_model()
    optimizer = AdamWFactory(
        AdamWFactory.Config(lr=3e-3, impl="foreach", role_overrides={r"^lm_head\.": "matrix"})
    ).build(model, mesh=SINGLE, layouts=[])
    train(model, optimizer, batches(2))
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * 0.5
    state = optimizer.state_dict()
    assert "head" not in state["groups"]
    fresh = AdamWFactory(AdamWFactory.Config(lr=3e-3, impl="foreach")).build(tiny_model(), mesh=SINGLE, layouts=[])
    with pytest.warns(UserWarning, match=r"no param group for role 'head' .* declared role changed"):
        fresh.load_state_dict(state)
    groups = {g["role"]: g for g in fresh.param_groups}
    assert (
        groups["head"]["lr"] == groups["head"]["initial_lr"]
        and groups["matrix"]["lr"] == groups["matrix"]["initial_lr"] * 0.5
    )
    assert torch.equal(fresh.state["lm_head.weight"]["exp_avg"], optimizer.state["lm_head.weight"]["exp_avg"])
