"""Hostile Hugging Face model directories and configs: each is a one-line ``UserError`` (or a ``ValueError`` that
``mcore.hf.load_hf`` makes one), never an allocation of what a ``config.json`` claims, a traceback, or code run
from the directory.

A model directory is anyone's file: its ``config.json`` may claim sizes its weights do not have (a memory bomb when
the model is allocated from the claim), its safetensors may be truncated or garbage, its JSON nested past the
recursion limit. The same limits hold for a run config's ``[model]`` (``mcore config``/``mcore train``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcore.errors import UserError
from mcore.hf import read_hf_config
from mcore_models.gpt import GPT, MAX_LAYERS
from mcore_models.hf import export_hf, import_hf
from mcore_models.presets import preset_config


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` preset exported as a Llama directory (2 layers, hidden 64)."""
    out = tmp_path_factory.mktemp("hf")
    cfg = preset_config("tiny")
    export_hf(GPT.build(cfg, seed=1, device="cpu"), cfg, out)
    return out


def _copy(src: Path, dst: Path) -> Path:
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def _edit_config(**changes: Any) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        config.update(changes)
        (path / "config.json").write_text(json.dumps(config))

    return edit


def _edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        tensors = load_file(str(path / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(path / "model.safetensors"))

    return apply


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        (path / name).write_bytes(data)

    return write


def _truncate(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


HOSTILE = {
    # sizes the weights do not have: refused before the model is allocated (was: 2 PB asked of the allocator)
    "hidden_size": (_edit_config(hidden_size=10**12), "the weights do not fit config.json"),
    "vocab_size": (_edit_config(vocab_size=10**9), r"embed.weight: \(512, 64\) in the weights, \(1000000000, 64\)"),
    "intermediate_size": (_edit_config(intermediate_size=10**8), "the weights do not fit config.json"),
    # more layers than the weights hold: stops at the first missing one (was: minutes, then MemoryError)
    "num_hidden_layers": (_edit_config(num_hidden_layers=60_000), "missing tensor 'model.layers.2."),
    "num_hidden_layers_absurd": (_edit_config(num_hidden_layers=10**12), f"at most {MAX_LAYERS}"),
    "num_attention_heads_zero": (_edit_config(num_attention_heads=0), "ZeroDivisionError"),
    "config_nested_too_deep": (_write("config.json", b"[" * 100_000 + b"]" * 100_000), "not valid JSON"),
    # wrong types named by their field (were: "could not convert string to float: 'x'", and true taken as 1 layer)
    "rope_theta_string": (_edit_config(rope_theta="x"), 'rope_theta = "x"; allowed: a number'),
    "num_hidden_layers_bool": (_edit_config(num_hidden_layers=True), "num_hidden_layers = true; allowed: an integer"),
    "hidden_size_float": (_edit_config(hidden_size=64.5), "hidden_size = 64.5; allowed: an integer"),
    "safetensors_truncated": (_truncate, "not a readable safetensors file"),
    "safetensors_empty": (_write("model.safetensors", b""), "not a readable safetensors file"),
    "safetensors_header_too_large": (
        _write("model.safetensors", (10**15).to_bytes(8, "little") + b"{}"),
        "not a readable safetensors file",
    ),
    "index_without_files": (
        _write("model.safetensors.index.json", json.dumps({"weight_map": {}}).encode()),
        "hold no tensors",
    ),
    "wrong_shape": (
        _edit_tensors(lambda t: t.__setitem__("model.norm.weight", torch.zeros(3))),
        r"final_norm.weight: \(3,\) in the weights, \(64,\) from config.json",
    ),
    "integer_weights": (
        _edit_tensors(lambda t: t.__setitem__("model.norm.weight", torch.zeros(64, dtype=torch.int64))),
        "weights must be floating point",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_model_directory_is_one_line(case: str, exported: Path, tmp_path: Path) -> None:
    edit, message = HOSTILE[case]
    edit(_copy(exported, tmp_path))
    with pytest.raises(ValueError, match=message) as info:  # UserError, or a ValueError the core makes one
        import_hf(tmp_path)
    assert "\n" not in str(info.value)


def test_remote_code_fields_are_ignored(exported: Path, tmp_path: Path) -> None:
    """``auto_map`` / ``trust_remote_code`` name code to import: never imported, the model loads as its family."""
    marker = tmp_path / "imported"
    _copy(exported, tmp_path)
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    _edit_config(auto_map={"AutoModelForCausalLM": "evil.Model"}, trust_remote_code=True)(tmp_path)
    _, model = import_hf(tmp_path)
    assert not marker.exists()
    assert isinstance(model, GPT)


def test_deep_json_through_the_core_reader(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match="not valid JSON"):
        read_hf_config(tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_layers": 10**12}, f"num_layers = 1000000000000: at most {MAX_LAYERS}"),
        ({"layers": ["1000000000000*attention"]}, f"more than {MAX_LAYERS} layers"),
        ({"hidden_size": 10**10}, "model sizes too large for a tensor"),
        ({"vocab_size": 10**17}, "model sizes too large for a tensor"),
    ],
)
def test_absurd_model_sizes_are_refused_before_building(changes: dict[str, Any], message: str) -> None:
    """Was a MemoryError after building a list of 10**12 layers, or the meta device's overflow traceback."""
    with pytest.raises(ValueError, match=message):
        GPT.check_blocks(preset_config("tiny", **changes))
