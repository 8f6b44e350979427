"""``fp16``'s dynamic loss scaling: an inf step is skipped and the scale backs off, finite steps grow it
after the interval, min/max bounds, the state round trip through a checkpoint, and training from an
overflowing scale that recovers and learns."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from mcore.errors import ConfigError
from mcore_precision.fp16 import FP16
from mcore_testing.reference import TinyTransformer, tiny_batches


def step(recipe: FP16, model: torch.nn.Module, opt: torch.optim.Optimizer, batch: tuple, poison: bool = False) -> bool:
    """One step as the run loop takes it: backward of the scaled loss, unscale, the optimizer step only
    when the gradients are finite, then ``update``."""
    opt.zero_grad(set_to_none=True)
    tokens, labels = batch
    with recipe.autocast():
        loss = model(tokens, labels=labels)
    recipe.scale_loss(loss).backward()
    if poison:
        next(model.parameters()).grad.view(-1)[0] = float("inf")
    finite = recipe.unscale_grads(model)
    assert isinstance(finite, torch.Tensor) and finite.dim() == 0 and finite.dtype == torch.bool
    if bool(finite):
        opt.step()
    recipe.update()
    return bool(finite)


def test_inf_step_is_skipped_scale_backs_off_then_grows_after_the_interval() -> None:
    recipe = FP16(FP16.Config(initial_scale=2.0**8, growth_interval=3, growth_factor=2.0, backoff_factor=0.25))
    model = recipe.prepare(TinyTransformer(seed=0))
    assert all(p.dtype == torch.float16 for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = tiny_batches(6, seed=1)
    before = copy.deepcopy(model.state_dict())
    assert step(recipe, model, opt, batches[0], poison=True) is False
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # skipped: nothing moved
    assert recipe.scale.item() == 2.0**6 and recipe.good_steps.item() == 0
    for i in range(2):
        assert step(recipe, model, opt, batches[1 + i]) is True
        assert recipe.scale.item() == 2.0**6 and recipe.good_steps.item() == i + 1
    assert step(recipe, model, opt, batches[3]) is True  # the third finite step in a row: growth
    assert recipe.scale.item() == 2.0**7 and recipe.good_steps.item() == 0
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unscaled_gradients_are_the_true_gradients_and_closer_than_without_scaling() -> None:
    recipe = FP16(FP16.Config(params="fp32", initial_scale=2.0**12))
    ref = TinyTransformer(seed=0)
    model = recipe.prepare(copy.deepcopy(ref))
    twin = copy.deepcopy(model)
    tokens, labels = tiny_batches(1, seed=2)[0]
    ref(tokens, labels=labels).backward()
    with recipe.autocast():
        recipe.scale_loss(model(tokens, labels=labels)).backward()
        (twin(tokens, labels=labels) * 1e-3).backward()  # small loss: fp16 gradients underflow without a scale
    assert bool(recipe.unscale_grads(model))

    def error(m: torch.nn.Module, factor: float) -> float:
        num = sum((p.grad.float() / factor - q.grad).pow(2).sum() for p, q in zip(m.parameters(), ref.parameters()))
        return float((num / sum(q.grad.pow(2).sum() for q in ref.parameters())).sqrt())

    scaled, plain = error(model, 1.0), error(twin, 1e-3)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert scaled < 1e-2 and scaled < plain, (scaled, plain)


def test_scale_stays_within_its_bounds() -> None:
    recipe = FP16(FP16.Config(initial_scale=4.0, min_scale=2.0, max_scale=8.0, growth_interval=1))
    recipe.update(finite=torch.tensor(False))
    recipe.update(finite=False)
    assert recipe.scale.item() == 2.0
    for _ in range(4):
        recipe.update(finite=True)
    assert recipe.scale.item() == 8.0
    recipe.update()  # no unscale_grads since the last update: nothing to count
    assert recipe.scale.item() == 8.0


def test_state_round_trip_resumes_the_same_scale() -> None:
    recipe = FP16(FP16.Config(initial_scale=2.0**8, growth_interval=4))
    for finite in (False, True, True):
        recipe.update(finite=finite)
    resumed = FP16(FP16.Config(initial_scale=2.0**8, growth_interval=4))
    resumed.load_state_dict(copy.deepcopy(recipe.state_dict()))
    for r in (recipe, resumed):
        r.update(finite=True)
        r.update(finite=True)
    assert resumed.scale.item() == recipe.scale.item() == 2.0**8  # backed off once, grown once
    assert resumed.good_steps.item() == recipe.good_steps.item() == 0
    with pytest.raises(ValueError, match="state has keys"):
        resumed.load_state_dict({"scale": 1.0})


def test_training_recovers_from_an_overflowing_scale_and_learns() -> None:
    recipe = FP16(FP16.Config(initial_scale=2.0**24, max_scale=2.0**24, growth_interval=1000))
    torch.manual_seed(0)
    model = recipe.prepare(TinyTransformer(seed=0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, eps=1e-4)
    batches = tiny_batches(40, seed=3)
    finite = [step(recipe, model, opt, b) for b in batches[:30]]
    assert finite[0] is False  # loss x 2^24 overflows fp16 gradients
    assert recipe.scale.item() < 2.0**24
    first_good = finite.index(True)  # the scale backed off until the gradients fit
    assert first_good < 10
    # from then on an overflow is an event the scaler absorbs (growing gradients, CPU-dependent rounding), not a
    # state: never two skipped steps in a row, and few of them
    after = finite[first_good:]
    assert not any(not a and not b for a, b in itertools.pairwise(after)), finite
    assert finite[-20:].count(False) <= 2, finite
    tokens, labels = batches[30]
    with torch.no_grad():
        first = TinyTransformer(seed=0).half()(tokens, labels=labels).item()
        last = model(tokens, labels=labels).item()
    assert last < first - 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"params": "bf16"},
        {"growth_factor": 1.0},
        {"backoff_factor": 1.5},
        {"initial_scale": 0.5},
        {"growth_interval": 0},
    ],
)
def test_bad_config_is_a_one_line_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError) as err:
        FP16.Config(**kwargs)
    assert "\n" not in str(err.value) and "allowed" in str(err.value)
