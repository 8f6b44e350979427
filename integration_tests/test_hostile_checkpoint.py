"""A checkpoint whose ``meta.json`` was edited to claim sizes its tensors do not have (its manifest rewritten to
match, as anyone can) is refused by ``mcore generate`` and ``mcore export`` with one line, before the model is
allocated: the claim is checked on the meta device against the stored tensor shapes.

Found by trying: ``hidden_size = 40000`` in ``meta.json`` allocated 8 GB before the shape check ran, and sizes past
the machine's memory were an allocator traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mcore.checkpoint.manifest import checksum_files, read_manifest, write_manifest
from mcore.checkpoint.store import latest_checkpoint
from mcore.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    (root / "text.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    out = root / "run"
    argv = ["train", "--model.preset=tiny", "--train.steps=1", "--train.seq_len=32", "--train.global_batch_size=2"]
    argv += [f"--data.source={root / 'text.txt'}", "--data.workers=0", "--train.cpu_threads=1", "--log.progress=none"]
    argv += ["--log.plot=false", "--log.tensorboard=false", "--checkpoint.async_save=false", f"--train.out_dir={out}"]
    assert main(argv) == 0
    return out


def test_sizes_claimed_by_an_edited_meta_json_are_refused_before_allocating(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    checkpoint = latest_checkpoint(copy / "checkpoints")
    assert checkpoint is not None
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["config"]["model"].update(hidden_size=10**6, vocab_size=10**6)  # 4 TB of fp32 embedding, head, layers
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    manifest = read_manifest(checkpoint)
    assert manifest is not None
    write_manifest(checkpoint, {**manifest.files, **checksum_files(checkpoint, ["meta.json"])})
    capsys.readouterr()

    for argv in (["generate", str(checkpoint)], ["export", str(checkpoint), "--out", str(tmp_path / "hf")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err
        assert err.startswith(f"mcore: error: checkpoint {checkpoint} (model 'gpt') does not fit this model: ")
        assert "(1000000, 1000000) in the model" in err
    assert not (tmp_path / "hf").exists()


def test_serving_a_model_directory_never_reads_a_tokenizer_linked_from_outside(run_dir: Path, tmp_path: Path) -> None:
    """``mcore serve HF_DIR`` read ``tokenizer.json`` through any symbolic link; now through ``mcore.hf.model_file``."""
    import torch
    from mcore_inference.llm import load_model

    from mcore.errors import UserError

    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    outside = tmp_path / "outside.json"
    (out / "tokenizer.json").rename(outside)
    (out / "tokenizer.json").symlink_to(outside)
    with pytest.raises(UserError, match="'tokenizer.json' resolves to .*outside the model directory"):
        load_model(out, torch.device("cpu"))
