"""Sessions: per-package tests (each in an env with only core, testing and that package), integration, lint, demo, bench.

Torch: set ``MCORE_TORCH`` to the torch requirement the environments get. It defaults to
``torch>=2.11`` (a GPU machine gets its normal CUDA build). On a CPU-only machine with a
local CPU wheel (``PIP_FIND_LINKS``), pin it so pip takes that wheel instead of downloading a
CUDA build of several GB:  ``MCORE_TORCH="torch==2.13.0" nox -s tests lint``.
Torch is installed first, so the packages' own ``torch>=2.11`` requirement is already met.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
TORCH = os.environ.get("MCORE_TORCH", "torch>=2.11")
CORE = "packages/mcore-core"
TESTING = "packages/mcore-testing"
PLUGINS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "plugins").glob("*/pyproject.toml") for p in [p.parent])

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint"]
nox.options.error_on_missing_interpreters = False


def install(session: nox.Session, *packages: str, extras: str = "test") -> None:
    """Torch first (pinned by MCORE_TORCH), then the packages editable with their test extras."""
    session.install(TORCH)
    args: list[str] = []
    for package in packages:
        args += ["-e", f"{package}[{extras}]" if extras and package not in (TESTING,) else package]
    session.install(*args)


INTEGRATION = "integration_tests"


@nox.session
@nox.parametrize("package", [CORE, TESTING, *PLUGINS, INTEGRATION])
def tests(session: nox.Session, package: str) -> None:
    """Each package's tests in an env holding only mcore-core, mcore-testing and that package; then integration.

    The integration tests (last) get every package, and hatchling to build the throwaway
    third-party plugin without network.
    """
    if package == INTEGRATION:
        install(session, CORE, TESTING, *PLUGINS)
        session.install("hatchling")
        session.run("pytest", "-q", "-m", "not gpu", INTEGRATION, *session.posargs)
        return
    install(session, *dict.fromkeys([CORE, TESTING, package]))
    session.run("pytest", "-q", "-m", "not gpu", f"{package}/tests", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (check + format check); mypy on every package's sources and its ``typecheck/`` protocol-conformance files."""
    session.install(TORCH)
    session.install("ruff>=0.6", "mypy>=1.11", "-e", CORE, "-e", TESTING, *[a for p in PLUGINS for a in ("-e", p)])
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    sources = sorted(
        str(p.relative_to(ROOT)) for p in ROOT.glob("*/*/src/*") if p.is_dir() and not p.name.endswith("-info")
    )
    typing_checks = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("*/*/typecheck/*.py"))
    session.run("mypy", *sources, *typing_checks)


@nox.session
def demo(session: nox.Session) -> None:
    """Train the demo GPT on the text of this Python's standard library, then sample from it."""
    install(session, CORE, *PLUGINS, extras="")
    session.chdir(session.create_tmp())  # the run writes runs/default here
    session.run("mcore", "train")
    session.run(
        "mcore",
        "generate",
        "runs/default",
        "--prompt",
        "def ",
        "--max-new-tokens",
        "200",
        "--temperature",
        "0.7",
        "--top-k",
        "40",
    )


@nox.session
def bench(session: nox.Session) -> None:
    """GPU benchmarks of every package (results go to each package's benchmarks/RESULTS.md)."""
    install(session, CORE, TESTING, *PLUGINS)
    for script in sorted(ROOT.glob("plugins/*/benchmarks/bench*.py")):
        session.run("python", str(script), *session.posargs)
