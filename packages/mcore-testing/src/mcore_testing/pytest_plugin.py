"""pytest plugin (entry point ``pytest11``): markers ``gpu``/``slow`` and a ``plugin_host`` fixture.

``gpu`` tests are skipped, with that reason, where CUDA is not available.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one; run on the GPU machine)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: no GPU on this machine (run with -m gpu on the GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture
def plugin_host() -> Callable[..., Any]:
    """Factory fixture: ``plugin_host(plugin, ...)`` -> isolated ``PluginHost``."""
    from mcore_testing.hosts import isolated_host

    return isolated_host
