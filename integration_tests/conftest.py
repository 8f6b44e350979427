"""Integration tests: every package installed, composed in one run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def run_mcore(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``python -m mcore ARGS`` in a subprocess with a clean MCORE_* environment."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MCORE_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mcore", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout
    )


@pytest.fixture(scope="session")
def installed_example_plugin():
    """pip-install the README's example plugin into this environment; uninstall afterwards."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", str(HERE / "example_plugin")], check=True)
    yield "my-fp64"
    subprocess.run([*pip, "uninstall", "-y", "my-fp64"], check=True)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is as fast, and spinning threads on a shared CPU are 20x slower. Files of
    tiny-model tests use it for every test (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
