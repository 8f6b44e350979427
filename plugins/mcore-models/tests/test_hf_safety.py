"""Hugging Face files: import reads nothing outside the model directory; export writes normal modes."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mcore.errors import UserError
from mcore_models.blocks.attention import Attention
from mcore_models.blocks.mlp import SwiGLU
from mcore_models.gpt import GPT, GPTConfig
from mcore_models.hf import export_hf, import_hf

SMALL = dict(
    vocab_size=32,
    hidden_size=16,
    num_layers=1,
    max_position_embeddings=16,
    blocks={"attention": Attention.Config(num_heads=2), "swiglu": SwiGLU.Config(ffn_hidden_size=32)},
)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def exported(root: Path) -> Path:
    """A real exported model directory ``root/model`` (config.json + model.safetensors)."""
    cfg = GPTConfig(**SMALL)
    export_hf(GPT.build(cfg, seed=0, device="cpu"), cfg, root / "model")
    return root / "model"


def split_with_index(model_dir: Path, shard_names: list[str]) -> None:
    """Replace ``model.safetensors`` by an index naming ``shard_names`` (tensors spread over them)."""
    from safetensors.torch import load_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {name: shard_names[i % len(shard_names)] for i, name in enumerate(names)}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return None


def test_index_naming_a_parent_file_is_refused(tmp_path: Path) -> None:
    model_dir = exported(tmp_path)
    outside = tmp_path / "outside.safetensors"
    save_file({"secret": torch.ones(3)}, str(outside))
    split_with_index(model_dir, ["model-00001.safetensors", "../outside.safetensors"])
    save_file({"x": torch.zeros(1)}, str(model_dir / "model-00001.safetensors"))
    with pytest.raises(UserError, match=r"'\.\./outside\.safetensors' \(named in model\.safetensors\.index\.json\)"):
        import_hf(model_dir)


def test_index_naming_an_absolute_path_is_refused(tmp_path: Path) -> None:
    model_dir = exported(tmp_path)
    outside = tmp_path / "outside.safetensors"
    save_file({"secret": torch.ones(3)}, str(outside))
    split_with_index(model_dir, [str(outside)])
    with pytest.raises(UserError, match="outside the model directory") as info:
        import_hf(model_dir)
    assert "\n" not in str(info.value)


def test_symlink_leaving_the_directory_is_refused(tmp_path: Path) -> None:
    model_dir = exported(tmp_path)
    real = tmp_path / "elsewhere" / "weights.safetensors"
    real.parent.mkdir()
    (model_dir / "model.safetensors").rename(real)
    (model_dir / "model.safetensors").symlink_to(real)
    with pytest.raises(UserError, match="resolves to .*outside the model directory"):
        import_hf(model_dir)


def test_config_json_linked_outside_the_directory_is_refused(tmp_path: Path) -> None:
    """``config.json`` is read through the core's ``mcore.hf.model_file`` too."""
    model_dir = exported(tmp_path)
    real = tmp_path / "elsewhere" / "config.json"
    real.parent.mkdir()
    (model_dir / "config.json").rename(real)
    (model_dir / "config.json").symlink_to(real)
    with pytest.raises(UserError, match="'config.json' resolves to .*outside the model directory") as info:
        import_hf(model_dir)
    assert "\n" not in str(info.value)


def test_hf_cache_snapshot_links_into_its_blobs_are_allowed(tmp_path: Path) -> None:
    """The Hugging Face cache layout: ``snapshots/<rev>/<file>`` links to ``../../blobs/<hash>``."""
    model_dir = exported(tmp_path)
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (model_dir / name).rename(repo / "blobs" / f"hash-{name}")
        (snapshot / name).symlink_to(Path("../../blobs") / f"hash-{name}")
    config, model = import_hf(snapshot)
    assert config.hidden_size == 16 and sum(p.numel() for p in model.parameters()) > 0


def test_export_writes_normal_permissions(tmp_path: Path, umask_022: None) -> None:
    model_dir = exported(tmp_path)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in model_dir.iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644}
