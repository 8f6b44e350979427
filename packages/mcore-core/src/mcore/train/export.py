"""``mcore export CHECKPOINT --format hf --out DIR [--overwrite]``: a Hugging Face model directory.

The Hugging Face family the model factory names (``hf_family(config)``, a registered ``"hf"``
implementation, see ``mcore.hf``; a factory of the older protocol may instead define
``export_hf(model, config, out_dir)``) writes the weights (safetensors) and ``config.json``; the tokenizer files of the run are added
so ``transformers``' ``from_pretrained`` loads model and tokenizer from ``DIR``, and
``mcore_export.json`` records where the export came from. It is built in a temporary sibling
of ``DIR`` and renamed into place when complete (``mcore.outputs.publish_dir``): ``DIR`` may
be new or empty, or a previous export (recognised by ``mcore_export.json`` beside its
``config.json``) replaced only with ``--overwrite``; anything else is refused and left as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mcore.__about__ import __version__
from mcore.cli import run_with_user_errors
from mcore.errors import UserError
from mcore.hf import export_family
from mcore.outputs import check_output_dir, publish_dir

#: The file that marks a directory as ``mcore export`` output (prefixed: no model format uses it).
MANIFEST = "mcore_export.json"
WHAT = "mcore export"


def check_export_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse ``out`` before any work unless it is new, empty, or (with ``overwrite``) a previous export."""
    if (out / MANIFEST).is_file() and not (out / "config.json").is_file():
        raise UserError(
            f"--out {out} holds {MANIFEST} but no config.json, so it is not a complete export; "
            "mcore never deletes it: give a new or empty directory"
        )
    check_output_dir(out, manifest=MANIFEST, what=WHAT, overwrite=overwrite)
    if overwrite and (out / MANIFEST).is_file():
        try:
            listed = json.loads((out / MANIFEST).read_text()).get("files")
        except (OSError, ValueError, AttributeError, RecursionError):
            listed = None
        if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
            raise UserError(
                f"--out {out}: its {MANIFEST} is unreadable or has no list of 'files', so mcore cannot tell its "
                "files from yours and deletes nothing: move the directory away, or give another --out"
            )
        # files added after the export (a README, a template) are the user's
        added = sorted(p.name for p in out.iterdir() if p.name != MANIFEST and p.name not in listed)
        if added:
            raise UserError(
                f"--out {out} holds files the previous export did not write ({', '.join(added[:3])}); mcore "
                "never deletes them: move them out first, or give another --out"
            )


def export_checkpoint(checkpoint: Path, out: Path, host: Any, *, overwrite: bool = False) -> Path:
    """Export ``checkpoint`` into ``out`` (see the module docstring for when ``out`` may be replaced)."""
    from mcore.train.generate import load_for_inference

    out = Path(out).absolute()
    check_export_dir(out, overwrite=overwrite)
    model, tokenizer, config, meta = load_for_inference(checkpoint, host)
    factory = config.model.implementation.load()
    legacy = getattr(factory, "export_hf", None)  # the older protocol: the factory writes the files itself
    if not callable(getattr(factory, "hf_family", None)) and callable(legacy):
        write = legacy
    else:
        write = export_family(factory, config.model.name, config.model.config, host).export
    with publish_dir(out, manifest=MANIFEST, what=WHAT, overwrite=overwrite) as tmp:
        try:
            write(model, config.model.config, tmp)
        except UserError:
            raise
        except ValueError as exc:  # what the mapping cannot express: one line, nothing published
            raise UserError(" ".join(str(exc).split())) from None
        except OSError:
            raise  # publish_dir names the path
        except Exception as exc:
            if type(exc).__name__ != "SafetensorError":  # safetensors' I/O errors (a full disk) are not OSErrors
                raise
            cause = " ".join(str(exc).split())
            raise UserError(
                f"--out {out}: writing the {WHAT} into {tmp} failed ({cause}); nothing was published and any "
                "previous export is unchanged: free disk space or give another --out"
            ) from None
        tokenizer.save(tmp)
        manifest = {
            "format": "hf",
            "source_checkpoint": str(Path(checkpoint).absolute()),
            "step": meta.get("step"),
            "model": {"name": config.model.name, "implementation": str(config.model.implementation.source)},
            "mcore_core": __version__,
            "files": sorted(p.name for p in tmp.iterdir()),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mcore export",
        description="Export a checkpoint as a Hugging Face model directory (safetensors, config.json, tokenizer).",
        epilog=(
            f"--out must be a new or empty directory, or a previous export (it holds {MANIFEST}) together "
            "with --overwrite; mcore never deletes anything else."
        ),
    )
    parser.add_argument("checkpoint", help="a checkpoint directory (step_XXXXXXXX) or a run directory (its newest)")
    parser.add_argument("--format", choices=["hf"], default="hf")
    parser.add_argument("--out", required=True, type=Path, help="the directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it holds a previous export")
    args = parser.parse_args(argv)
    from mcore.plugins import load_plugins
    from mcore.train.generate import resolve_checkpoint

    out = export_checkpoint(resolve_checkpoint(args.checkpoint), args.out, load_plugins(), overwrite=args.overwrite)
    print(f"exported to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_with_user_errors(_export, list(sys.argv[1:] if argv is None else argv))
