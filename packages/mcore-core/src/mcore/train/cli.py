"""``mcore train [run.toml] [--section.key=value ...]``: load plugins, resolve the config, train.

``--help`` lists every config key with its default and doc (``mcore.helptext``), for the
implementations the other arguments choose. With no config file it runs the demo: the
defaults of every section (a small ``gpt`` on the standard library's text). ``python -m mcore train`` and ``torchrun ... -m mcore train`` run
the same code; under ``torchrun`` only rank 0 prints.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mcore.cli import run_with_user_errors
from mcore.errors import UserError

USAGE = "usage: mcore train [RUN.toml] [--section.key=value ...]  (no config file: the built-in demo)"

#: What ``mcore train`` without a config file trains unless overridden: the demo's small GPT,
#: on one CPU thread (a model this small gains nothing from more, and loses much on a busy machine).
DEMO_MODEL = {"name": "gpt", "preset": "tiny"}
DEMO_TRAIN = {"cpu_threads": 1, "eval_every": 250}
DEMO_DATA = {"max_tokens": 2_000_000}  # the first ~2 MB of the standard library's text

#: Distributions that provide the demo's implementations, for the error when one is missing.
DEMO_PROVIDERS = {("model", "gpt"): "mcore-models", ("optimizer", "adamw"): "mcore-optim"}

HELP_FLAGS = ("-h", "--help")

RUN_DIRECTORY_HELP = """Train a model. RUN.toml holds the sections listed below (every key is optional); each
--section.key=value overrides one key. Without a config file this is the built-in demo, a small
GPT on this Python's standard library:
  {demo}

The run directory (train.out_dir, default runs/default) holds one run: its metrics.jsonl,
checkpoints/, loss plot, tokenizer and prepared data; the paths are printed at the end, and the
first line a run prints says what it does (starting fresh, resuming from which checkpoint, or
nothing to do). With train.resume = "auto" (the default) running the same command again
continues the run from its newest complete checkpoint when that was made by the same model
config, up to train.steps. A directory holding a run of another model config is refused, naming
the keys that differ: give another --train.out_dir=..., --train.overwrite=true (start at step 1;
the old checkpoints, metrics and logs are moved to out_dir/previous/<time>/, never deleted), or
--train.allow_model_change=true (resume with the changed model; shapes must still fit).
--train.resume=latest takes the newest checkpoint; --train.resume=none always starts at step 1
and is refused where a run already is; a checkpoint directory resumes from it (going back within
a run moves its later checkpoints to previous/). The checkpoint a run resumed from is never
pruned. SIGTERM stops after the current step with a checkpoint (exit 0); a second one ends at
once. A rank stopped or behind ends every rank waiting for it within parallel.timeout_s, with
one line naming the phase and the late ranks."""


def _demo_text() -> str:
    parts = [f"--{section}.{key}={value}" for section, values in (("model", DEMO_MODEL), ("train", DEMO_TRAIN),
             ("data", DEMO_DATA)) for key, value in values.items()]  # fmt: skip
    return " ".join(parts)


def help_text(argv: list[str]) -> str:
    """``mcore train --help``: usage, the run directory, overrides and every config key.

    The other arguments choose which implementations' keys are listed (``--model.name=NAME``,
    ``--optimizer.name=NAME``, ``--precision.recipe=NAME``, ``--parallel.layouts=A,B``, or a
    config file naming them).
    """
    from mcore.config import load_raw
    from mcore.helptext import OVERRIDES_HELP, config_reference
    from mcore.plugins import load_plugins

    path, overrides = split_args([a for a in argv if a not in HELP_FLAGS])
    raw = load_raw(path, overrides)
    return "\n\n".join(
        [
            USAGE,
            RUN_DIRECTORY_HELP.format(demo=_demo_text()),
            OVERRIDES_HELP,
            "config keys (key = default, then what it does; `mcore config RUN.toml` shows a run's values):",
            config_reference(raw, load_plugins()),
        ]
    )


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """``(config file or None, overrides)``; a second file is an error."""
    files = [a for a in argv if not a.startswith("--")]
    if len(files) > 1:
        raise UserError(f"give at most one config file, got {files}; {USAGE}")
    return (files[0] if files else None), [a for a in argv if a.startswith("--")]


def resolve(path: str | None, overrides: list[str]):
    from mcore.config import load_raw, resolve_config
    from mcore.errors import UnknownNameError
    from mcore.plugins import load_plugins

    host = load_plugins()
    raw = load_raw(path, overrides)
    if path is None and "name" not in raw.get("model", {}):
        raw["model"] = {**DEMO_MODEL, **raw.get("model", {})}
        raw["train"] = {**DEMO_TRAIN, **raw.get("train", {})}
        raw["data"] = {**DEMO_DATA, **raw.get("data", {})}
    try:
        return resolve_config(raw, host), host
    except UnknownNameError as exc:
        for (kind, name), dist in DEMO_PROVIDERS.items():
            if f"unknown {kind} {name!r}" in str(exc):
                raise UserError(
                    f"{exc}\n{kind} {name!r} comes from the {dist} distribution: pip install {dist}"
                ) from None
        raise


def _train(argv: list[str]) -> int:
    if any(a in HELP_FLAGS for a in argv):
        print(help_text(argv))
        return 0
    path, overrides = split_args(argv)
    config, host = resolve(path, overrides)
    from mcore.train import run

    result = run(config, host)
    import torch.distributed as dist

    # a run with nothing to do returns before any process group exists: under torchrun use the env's rank
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank == 0:
        first, last = result.losses.get(result.start_step + 1), result.losses.get(result.steps_done)
        if first is not None and last is not None:
            print(
                f"trained steps {result.start_step + 1}..{result.steps_done} in {result.wall_s:.1f} s: "
                f"loss {first:.3f} -> {last:.3f}, {result.tokens_per_s:,.0f} tokens/s"
            )
        print(f"metrics: {Path(result.out_dir, 'metrics.jsonl').absolute()}")
        if result.last_checkpoint:
            print(f"checkpoint: {Path(result.last_checkpoint).absolute()}")
        if result.plot:
            print(f"plot: {Path(result.plot).absolute()}")
        if result.last_checkpoint:
            print(f"try: mcore generate {Path(result.out_dir).absolute()} --prompt 'def ' --max-new-tokens 200")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_with_user_errors(_train, list(sys.argv[1:] if argv is None else argv))
