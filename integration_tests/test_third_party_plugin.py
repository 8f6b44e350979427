"""A throwaway plugin, built and pip-installed as a real distribution, is usable by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import run_mcore


def test_entry_point_plugin_listed_and_used_by_name(installed_example_plugin):
    listing = json.loads(run_mcore("plugins", "--json").stdout)
    rows = [r for r in listing["implementations"] if r["distribution"] == "my-fp64"]
    assert rows == [
        {
            "distribution": "my-fp64",
            "version": "0.1.0",
            "plugin": "fp64",
            "kind": "precision",
            "name": "fp64",
            "ref": "my_fp64.recipe:FP64",
            "summary": "float64 everything",
        }
    ]
    result = run_mcore(
        "config",
        "--precision.recipe=fp64",
        "--model.name=reference-tiny",
        "--optimizer.name=reference-adamw",
        env={"MCORE_PLUGINS": "mcore_testing.plugin"},
    )
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["precision"] == {"recipe": "fp64"}


def test_entry_point_plugin_trains_in_process(installed_example_plugin):
    code = (
        "import torch\n"
        "from mcore.plugins import load_plugins\n"
        "from mcore_testing.reference import TinyTransformer, tiny_batches\n"
        "host = load_plugins()\n"
        "recipe = host.load('precision', 'fp64')()\n"
        "model = recipe.prepare(TinyTransformer(seed=0))\n"
        "tokens, labels = tiny_batches(1)[0]\n"
        "loss = model(tokens, labels=labels)\n"
        "loss.backward()\n"
        "print(model.lm_head.weight.grad.dtype, bool(recipe.unscale_grads(model)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["torch.float64", "True"], out.stderr


def test_mcore_plugins_env_module_used_by_name(tmp_path: Path):
    (tmp_path / "lab_plugin.py").write_text(
        "from mcore.plugins import hookimpl\n"
        "MCORE_PLUGIN_API = 1\n"
        "@hookimpl\n"
        "def mcore_register(registry):\n"
        "    registry.add('precision', 'bf16-autocast', 'mcore.precision.basic:BF16', summary='lab alias')\n"
    )
    env = {
        "MCORE_PLUGINS": "mcore_testing.plugin,lab_plugin",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    result = run_mcore(
        "config",
        "--precision.recipe=bf16-autocast",
        "--precision.params=fp32",
        "--model.name=reference-tiny",
        "--optimizer.name=reference-adamw",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert tomllib.loads(result.stdout)["precision"] == {"recipe": "bf16-autocast", "params": "fp32"}


def test_listing_all_installed_plugins_imports_no_torch():
    code = (
        "import sys, io, contextlib\n"
        "from mcore.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    main(['plugins'])\n"
        "print('torch' in sys.modules, 'triton' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr
