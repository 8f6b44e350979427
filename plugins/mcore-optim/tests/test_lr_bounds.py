"""Rates and eps an update cannot compute in float32 are refused when the config is built.

``--optimizer.lr=1e39`` used to pass (finite as a Python float) and end the first step with
torch's overflow traceback ("value cannot be converted to type float without overflow"); an
eps below float32's smallest normal number rounded to 0 in the update. Now each is a one-line
``ConfigError`` at resolve time, and the largest allowed values still step without a traceback.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import batches, tiny_model, train

from mcore.config import load_raw, resolve_config
from mcore.errors import ConfigError
from mcore_optim.adamw import MAX_RATE, MIN_EPS, AdamWFactory
from mcore_optim.muon import MuonFactory
from mcore_testing.hosts import isolated_host

BASE = ["--model.name=reference-tiny", "--model.vocab_size=257"]


@pytest.fixture
def host() -> Any:
    return isolated_host("mcore_optim.plugin", "mcore_testing.plugin")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--optimizer.lr=1e39"], "optimizer.lr = 1e+39; allowed: a finite number >= 0 and <= 1e+06"),
        (["--optimizer.weight_decay=3e38"], "optimizer.weight_decay = 3e+38; allowed: a finite number >= 0"),
        (["--optimizer.eps=1e-50"], "optimizer.eps = 1e-50; allowed: a finite number > 0, from 1.18e-38"),
        (["--optimizer.eps=1e39"], "optimizer.eps = 1e+39; allowed: a finite number > 0"),
        (["--optimizer.name=muon", "--optimizer.lr=1e39"], "optimizer.lr = 1e+39; allowed"),
        (["--optimizer.name=muon", "--optimizer.adamw_lr=1e39"], "optimizer.adamw_lr = 1e+39; allowed"),
        (["--optimizer.name=muon", "--optimizer.ns_eps=1e-300"], "optimizer.ns_eps = 1e-300; allowed"),
        (["--optimizer.name=distributed-adamw", "--optimizer.lr=1e39"], "optimizer.lr = 1e+39; allowed"),
        (["--optimizer.name=layerwise-distributed", "--optimizer.lr=1e39"], "optimizer.lr = 1e+39; allowed"),
    ],
)
def test_rates_beyond_float32_are_refused_in_one_line(host: Any, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config(load_raw(None, [*BASE, *overrides]), host)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(message), str(info.value)


def test_python_configs_are_held_to_the_same_bounds() -> None:
    for config in (AdamWFactory.Config, MuonFactory.Config):
        with pytest.raises(ValueError, match=r"^lr = 1e\+39; allowed"):
            config(lr=1e39)
        with pytest.raises(ValueError, match="eps = "):
            config(**{"eps" if config is AdamWFactory.Config else "adamw_eps": MIN_EPS / 2})
    AdamWFactory.Config(lr=MAX_RATE, weight_decay=MAX_RATE, eps=MIN_EPS)  # the bounds themselves are allowed


@pytest.mark.parametrize("factory", [AdamWFactory, MuonFactory])
def test_the_largest_allowed_rates_step_without_an_overflow(factory: Any) -> None:
    extra = {"adamw_impl": "foreach", "ns_dtype": "float32"} if factory is MuonFactory else {"impl": "foreach"}
    model = tiny_model()
    optimizer = factory(factory.Config(lr=MAX_RATE, weight_decay=MAX_RATE, **extra)).build(model, mesh=None, layouts=())
    train(model, optimizer, batches(2))  # before the bound, lr=1e39 raised torch's overflow RuntimeError here
