"""``mcore export CHECKPOINT --format hf --out DIR``: a Hugging Face model directory.

The model factory's ``export_hf(model, config, out_dir)`` writes the weights (safetensors)
and ``config.json`` in its architecture's mapping; the tokenizer files of the run are added
so ``transformers``' ``from_pretrained`` loads model and tokenizer from ``DIR``. Written to
``DIR.tmp`` and renamed when complete.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from mcore.cli import run_with_user_errors
from mcore.errors import UserError


def export_checkpoint(checkpoint: Path, out: Path, host: object) -> Path:
    from mcore.train.generate import load_for_inference

    model, tokenizer, config, meta = load_for_inference(checkpoint, host)
    factory = config.model.implementation.load()
    export = getattr(factory, "export_hf", None)
    if not callable(export):
        raise UserError(
            f"model {config.model.name!r} ({config.model.implementation.source}) has no Hugging Face mapping "
            "(export_hf); only models that define one can be exported"
        )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        export(model, config.model.config, tmp)
        tokenizer.save(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mcore export", description="export a checkpoint")
    parser.add_argument("checkpoint")
    parser.add_argument("--format", choices=["hf"], default="hf")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    from mcore.plugins import load_plugins
    from mcore.train.generate import resolve_checkpoint

    out = export_checkpoint(resolve_checkpoint(args.checkpoint), args.out, load_plugins())
    print(f"exported to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_with_user_errors(_export, list(sys.argv[1:] if argv is None else argv))
