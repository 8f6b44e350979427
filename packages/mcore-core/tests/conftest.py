"""Fixtures for the core's tests: a clean plugin environment per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path where tests install throwaway distributions."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv("MCORE_PLUGINS", raising=False)
    monkeypatch.delenv("MCORE_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("MCORE_PREFER", raising=False)
    yield folder
    for name in [m for m in sys.modules if m.startswith("fake_")]:
        del sys.modules[name]
