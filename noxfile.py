"""Sessions: per-package tests (each in an env with only core, testing and that package), integration, lint, demo,
wheels, bench.

The third-party packages every session needs -- torch, mcore-core's dependencies and its ``test`` extra, hatchling
-- are installed once per machine into ``.nox/_shared_deps`` (``pip install --target``) and seen by every session's
env through a ``.pth`` file (``use_shared_deps``); each session then installs only our packages (editable, no build
isolation) and its plugin's own extras. Every env holds the same third-party layer it held before (core[test] was
in each), our packages stay isolated per session, and CI no longer spends ~70 s per session reinstalling ~1.5 GB
(2 cores: 75 s -> 7 s for a session whose tests take 4 s).

Torch is in that layer, so the packages' own ``torch>=2.11`` requirement is already met. ``MCORE_TORCH`` (a pip requirement, with pip options if needed) chooses it; when
it is unset the choice is made here (``torch_install_args``):

* a machine with an NVIDIA GPU (``nvidia-smi`` runs): ``torch>=2.11``, pip's normal CUDA build;
* otherwise the CPU build: the torch wheel of a local folder named by ``PIP_FIND_LINKS`` (pinned
  to that exact version, so pip takes it), else ``torch>=2.11`` from PyTorch's CPU index
  (``--index-url https://download.pytorch.org/whl/cpu``, for the torch install only) instead of
  a CUDA build of several GB.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path

import nox
from packaging.requirements import Requirement
from packaging.tags import Tag, sys_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion

ROOT = Path(__file__).parent
DEFAULT_TORCH = "torch>=2.11"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CORE = "packages/mcore-core"
TESTING = "packages/mcore-testing"
PLUGINS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "plugins").glob("*/pyproject.toml") for p in [p.parent])

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint"]
nox.options.error_on_missing_interpreters = False


# -- which torch ----------------------------------------------------------------------------------
def has_nvidia_gpu(
    which: Callable[[str], str | None] = shutil.which,
    run: Callable[..., subprocess.CompletedProcess[bytes]] = subprocess.run,
) -> bool:
    """True when ``nvidia-smi`` is on PATH and lists a GPU."""
    exe = which("nvidia-smi")
    if exe is None:
        return False
    try:
        result = run([exe, "-L"], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and b"GPU" in result.stdout


def local_torch_version(find_links: str, supported: frozenset[Tag] | None = None) -> str | None:
    """The newest torch version among the wheels this interpreter can install (``supported`` tags) in
    the local folders of ``find_links`` (``PIP_FIND_LINKS``: folders or URLs separated by spaces)."""
    supported = supported if supported is not None else frozenset(sys_tags())
    versions = []
    for entry in find_links.split():
        folder = Path(entry.removeprefix("file://"))
        if not folder.is_dir():
            continue
        for wheel in folder.glob("torch-*.whl"):
            try:
                _, version, _, tags = parse_wheel_filename(wheel.name)
            except (InvalidVersion, InvalidWheelFilename):
                continue
            if tags & supported:
                versions.append(version)
    return str(max(versions)) if versions else None


def torch_install_args(env: Mapping[str, str], gpu: Callable[[], bool] = has_nvidia_gpu) -> tuple[list[str], str]:
    """``(pip install arguments for torch, why)``: ``MCORE_TORCH`` when set, else by the machine (see the top)."""
    chosen = env.get("MCORE_TORCH", "").strip()
    if chosen:
        return shlex.split(chosen), "MCORE_TORCH"
    if gpu():
        return [DEFAULT_TORCH], "an NVIDIA GPU is present (nvidia-smi): the default CUDA build"
    version = local_torch_version(env.get("PIP_FIND_LINKS", ""))
    if version is not None:
        return [f"torch=={version}"], f"no NVIDIA GPU: the local wheel of PIP_FIND_LINKS ({version})"
    return [DEFAULT_TORCH, "--index-url", CPU_INDEX], "no NVIDIA GPU: the CPU build from PyTorch's index"


@functools.cache
def _torch_choice() -> tuple[tuple[str, ...], str]:
    args, why = torch_install_args(os.environ)
    return tuple(args), why


SHARED_DEPS = ROOT / ".nox" / "_shared_deps"
#: Written into ``SHARED_DEPS`` last: what it holds (requirements, interpreter); a folder without it is not ours.
SHARED_STAMP = ".mcore-shared-deps.json"


#: Triton where it has wheels: on a CPU machine its interpreter runs every kernel's CPU tests (each checked against
#: its reference, every load and store bounds-checked: ``mcore_testing.interpreter_bounds``); without it they skip.
KERNEL_TEST_REQUIREMENTS = ["triton; platform_system == 'Linux' and platform_machine == 'x86_64'"]


def shared_requirements(core_pyproject: Path = ROOT / CORE / "pyproject.toml") -> list[str]:
    """mcore-core's third-party dependencies and ``test`` extra (every session installs them), hatchling and
    editables (our editable builds, without build isolation), Triton for the kernels' interpreter tests
    (``KERNEL_TEST_REQUIREMENTS``); not torch (``torch_install_args``' choice), not ours."""
    project = tomllib.loads(core_pyproject.read_text())["project"]
    wanted = [*project["dependencies"], *project.get("optional-dependencies", {}).get("test", [])]
    names = [canonicalize_name(Requirement(r).name) for r in wanted]
    keep = [r for r, n in zip(wanted, names, strict=True) if n != "torch" and not n.startswith("mcore-")]
    return [*dict.fromkeys([*keep, "hatchling", "editables", *KERNEL_TEST_REQUIREMENTS])]


def _stamp(torch_args: tuple[str, ...], requirements: list[str], python: str) -> dict[str, object]:
    return {"torch": list(torch_args), "requirements": requirements, "python": python}


def build_shared_deps(session: nox.Session) -> Path:
    """``SHARED_DEPS`` holding torch and ``shared_requirements()`` for this session's interpreter, built now unless
    a build with the same stamp is there (a stale one of ours is replaced; a folder without our stamp is refused)."""
    torch_args, why = _torch_choice()
    python = session.run("python", "-c", "import sys; print(sys.version)", silent=True)
    requirements = shared_requirements()
    wanted = _stamp(torch_args, requirements, str(python).strip())
    stamp = SHARED_DEPS / SHARED_STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return SHARED_DEPS
    if SHARED_DEPS.exists():
        if not stamp.is_file():
            session.error(f"{SHARED_DEPS} exists without {SHARED_STAMP}: not built here; move it away")
        shutil.rmtree(SHARED_DEPS)  # our own earlier build (its stamp says so), for other requirements
    building = SHARED_DEPS.with_name(f"{SHARED_DEPS.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)  # ours: this process's name
    session.log(
        f"shared third-party packages into {SHARED_DEPS}: torch {' '.join(torch_args)} ({why}; set MCORE_TORCH to choose)"
    )
    pip = ["python", "-m", "pip", "install", "--quiet", "--target", str(building)]
    if any(arg.startswith("-") for arg in torch_args):  # its own index: torch alone, then the rest
        session.run(*pip, *torch_args)
        session.run(*pip, *requirements)
    else:
        session.run(*pip, *torch_args, *requirements)
    (building / SHARED_STAMP).write_text(json.dumps(wanted))
    try:
        building.rename(SHARED_DEPS)
    except OSError:  # another nox process finished first: use its build
        shutil.rmtree(building, ignore_errors=True)
    return SHARED_DEPS


def use_shared_deps(session: nox.Session) -> None:
    """Make this session's env see ``SHARED_DEPS`` (a ``.pth`` file in its site-packages, processed like a site
    directory so the packages' own ``.pth`` files apply), building it first when needed."""
    shared = build_shared_deps(session)
    purelib = session.run("python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True)
    pth = Path(str(purelib).strip()) / "mcore_shared_deps.pth"
    pth.write_text(f"import site; site.addsitedir({str(shared)!r})\n")


def install(session: nox.Session, *packages: str, extras: str = "test") -> None:
    """The shared third-party layer (``use_shared_deps``: torch first among it), then the packages editable with
    their extras, built without isolation (hatchling is in the shared layer)."""
    use_shared_deps(session)
    args: list[str] = ["--no-build-isolation"]
    for package in packages:
        args += ["-e", f"{package}[{extras}]" if extras and package not in (TESTING,) else package]
    session.install(*args)


INTEGRATION = "integration_tests"
#: What ``nox -s tests`` runs unless ``-- -m ...`` replaces it: the CPU tests CI keeps under 30 minutes.
DEFAULT_MARKERS = "not gpu and not slow"
#: pytest's report of the slowest tests, in every session's log: where CI's time goes (keep it under 30 minutes)
DURATIONS = "--durations=12"


@nox.session
@nox.parametrize("package", [CORE, TESTING, *PLUGINS, INTEGRATION])
def tests(session: nox.Session, package: str) -> None:
    """Each package's tests in an env holding only mcore-core, mcore-testing and that package; then integration.

    The integration tests (last) get every package, and hatchling to build the throwaway
    third-party plugin without network. By default neither GPU nor ``slow`` tests run (CI: the
    representative cases); ``-- -m slow`` runs the full cross-products, ``-- -m gpu`` the GPU tests.
    """
    if package == INTEGRATION:
        install(session, CORE, TESTING, *PLUGINS)
        session.install("nox>=2024.10")
        session.run("python", "-m", "pytest", "-q", DURATIONS, "-m", DEFAULT_MARKERS, INTEGRATION, *session.posargs)
        return
    install(session, *dict.fromkeys([CORE, TESTING, package]))
    session.run("python", "-m", "pytest", "-q", DURATIONS, "-m", DEFAULT_MARKERS, f"{package}/tests", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (check + format check); mypy on every package's sources and its ``typecheck/`` protocol-conformance files."""
    use_shared_deps(session)
    editables = [a for p in [CORE, TESTING, *PLUGINS] for a in ("-e", p)]
    session.install("--no-build-isolation", "ruff>=0.6", "mypy>=1.11", *editables)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    sources = sorted(
        str(p.relative_to(ROOT)) for p in ROOT.glob("*/*/src/*") if p.is_dir() and not p.name.endswith("-info")
    )
    typing_checks = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("*/*/typecheck/*.py"))
    session.run("mypy", *sources, *typing_checks)


@nox.session
def demo(session: nox.Session) -> None:
    """Train the demo GPT on the text of this Python's standard library, then sample from it.

    The run goes to ``runs/default`` of this repository (``mcore train`` prints the absolute paths);
    arguments after ``--`` go to ``mcore train`` (e.g. ``nox -s demo -- --train.steps=2000``).
    """
    install(session, CORE, *PLUGINS, extras="")
    session.chdir(ROOT)
    session.run("mcore", "train", *session.posargs)
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
def wheels(session: nox.Session) -> None:
    """Wheels of every package into ``dist/`` (they are not on PyPI yet): ``pip install dist/*.whl``."""
    session.install("hatchling")
    session.run(
        "python",
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(ROOT / "dist"),
        CORE,
        TESTING,
        *PLUGINS,
    )


@nox.session
def bench(session: nox.Session) -> None:
    """GPU benchmarks of every package (results go to each package's benchmarks/RESULTS.md)."""
    install(session, CORE, TESTING, *PLUGINS)
    for script in sorted(ROOT.glob("*/*/benchmarks/bench*.py")):
        session.run("python", str(script), *session.posargs)
