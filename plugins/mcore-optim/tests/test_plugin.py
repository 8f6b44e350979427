"""Registration: every name resolves through the core's registry, lazily, and builds by name."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mcore_optim.plugin
from mcore.plugins import load_plugins

OPTIMIZERS = ["adamw", "distributed-adamw", "layerwise-distributed", "muon"]


def host():
    return load_plugins(entry_points=False, env=False, unpackaged=False, extra=[mcore_optim.plugin])


def test_registers_optimizers() -> None:
    registry = host().registry
    assert registry.names("optimizer") == OPTIMIZERS
    assert registry.names("lr_schedule") == []  # schedules are the core's (mcore.train.schedules)
    for name in OPTIMIZERS:
        factory = registry.load("optimizer", name)
        assert hasattr(factory, "Config") and hasattr(factory, "build")
        fields = factory.Config.__dataclass_fields__
        assert "lr" in fields and "weight_decay" in fields, name


def test_plugin_module_imports_no_torch() -> None:
    code = "import sys, mcore_optim.plugin; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_built_by_name(name: str) -> None:
    from helpers import SINGLE, tiny_model

    factory_cls = host().registry.load("optimizer", name)
    optimizer = factory_cls(factory_cls.Config(lr=1e-3)).build(tiny_model(), mesh=SINGLE, layouts=[])
    assert {g["role"] for g in optimizer.param_groups} == {"embedding", "matrix", "head", "norm"}
