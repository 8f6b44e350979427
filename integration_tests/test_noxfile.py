"""The noxfile picks the torch build by itself: the CPU build on a machine without an NVIDIA GPU
(a local wheel from ``PIP_FIND_LINKS`` when there is one, else PyTorch's CPU index), pip's normal
build on a GPU machine, and exactly ``MCORE_TORCH`` when it is set.

Here, not in a package's tests: it needs ``nox`` itself, which the integration session installs.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def noxfile() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mcore_noxfile_under_test", ROOT / "noxfile.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _this_interpreter_tag() -> str:
    from packaging.tags import sys_tags

    tag = next(iter(sys_tags()))
    return f"{tag.interpreter}-{tag.abi}-{tag.platform}"


def test_torch_choice_follows_mcore_torch_then_the_machine(noxfile: ModuleType, tmp_path: Path) -> None:
    choose = noxfile.torch_install_args
    assert choose({"MCORE_TORCH": "torch==2.13.0"}, gpu=lambda: False)[0] == ["torch==2.13.0"]
    assert choose({"MCORE_TORCH": "torch --index-url https://x/y"}, gpu=lambda: True)[0] == [
        "torch",
        "--index-url",
        "https://x/y",
    ]
    assert choose({}, gpu=lambda: True)[0] == ["torch>=2.11"]  # a GPU machine: pip's normal (CUDA) build
    assert choose({}, gpu=lambda: False)[0] == ["torch>=2.11", "--index-url", "https://download.pytorch.org/whl/cpu"]

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.99.0-cp27-cp27mu-manylinux1_x86_64.whl").touch()  # not installable here: ignored
    assert choose({"PIP_FIND_LINKS": str(wheels)}, gpu=lambda: False)[0][0].startswith("torch>=")
    (wheels / f"torch-2.13.0+cpu-{_this_interpreter_tag()}.whl").touch()
    (wheels / f"torch-2.12.1+cpu-{_this_interpreter_tag()}.whl").touch()
    find_links = f"https://example.invalid/simple {wheels}"
    assert choose({"PIP_FIND_LINKS": find_links}, gpu=lambda: False)[0] == ["torch==2.13.0+cpu"]
    assert choose({"PIP_FIND_LINKS": find_links}, gpu=lambda: True)[0] == ["torch>=2.11"]


def test_gpu_detection_runs_nvidia_smi(noxfile: ModuleType) -> None:
    def ran(code: int, out: bytes) -> Any:
        return lambda *a, **k: subprocess.CompletedProcess(a, code, out, b"")

    def broken(*a: Any, **k: Any) -> Any:
        raise OSError("no driver")

    detect = noxfile.has_nvidia_gpu
    assert detect(which=lambda name: None) is False
    assert detect(which=lambda name: "/usr/bin/nvidia-smi", run=broken) is False
    assert detect(which=lambda name: "/usr/bin/nvidia-smi", run=ran(9, b"")) is False
    assert detect(which=lambda name: "/usr/bin/nvidia-smi", run=ran(0, b"GPU 0: NVIDIA H200 (UUID: x)\n")) is True


def test_shared_layer_is_cores_third_party_requirements(noxfile: ModuleType, tmp_path: Path) -> None:
    """The layer every session shares holds what each session installed anyway: mcore-core's third-party
    dependencies and ``test`` extra (never torch, chosen apart, nor one of our packages), plus the build backend
    our editable installs use without isolation, and Triton where it has wheels (the kernels' interpreter tests)."""
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "mcore-core"\ndependencies = ["torch>=2.11", "pluggy>=1.5", "torchao>=0.1", "numpy"]\n'
        '[project.optional-dependencies]\ntest = ["pytest>=8", "mcore-testing", "numpy", "Mcore_Other>=1"]\n'
    )
    got = noxfile.shared_requirements(pyproject)
    triton = "triton; platform_system == 'Linux' and platform_machine == 'x86_64'"
    assert got == ["pluggy>=1.5", "torchao>=0.1", "numpy", "pytest>=8", "hatchling", "editables", triton]
    real = noxfile.shared_requirements()
    assert "hatchling" in real and triton in real and not any(r.startswith(("torch", "mcore")) for r in real)
