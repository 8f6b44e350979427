"""``mcore train [run.toml] [--section.key=value ...]``: load plugins, resolve the config, train.

With no arguments it runs the demo: the defaults of every section (a small ``gpt`` on the
standard library's text). ``python -m mcore train`` and ``torchrun ... -m mcore train`` run
the same code; under ``torchrun`` only rank 0 prints.
"""

from __future__ import annotations

import sys

from mcore.cli import run_with_user_errors
from mcore.errors import UserError

USAGE = "usage: mcore train [RUN.toml] [--section.key=value ...]  (no arguments: the demo on stdlib text)"

#: What ``mcore train`` without a config file trains unless overridden: the demo's small GPT,
#: on one CPU thread (a model this small gains nothing from more, and loses much on a busy machine).
DEMO_MODEL = {"name": "gpt", "preset": "tiny"}
DEMO_TRAIN = {"cpu_threads": 1, "eval_every": 250}
DEMO_DATA = {"max_tokens": 2_000_000}  # the first ~2 MB of the standard library's text

#: Distributions that provide the demo's implementations, for the error when one is missing.
DEMO_PROVIDERS = {("model", "gpt"): "mcore-models", ("optimizer", "adamw"): "mcore-optim"}


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        raise SystemExit(0)
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
    path, overrides = split_args(argv)
    config, host = resolve(path, overrides)
    from mcore.train import run

    result = run(config, host)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        first, last = result.losses.get(result.start_step + 1), result.losses.get(result.steps_done)
        if first is not None and last is not None:
            print(
                f"trained steps {result.start_step + 1}..{result.steps_done} in {result.wall_s:.1f} s: "
                f"loss {first:.3f} -> {last:.3f}, {result.tokens_per_s:,.0f} tokens/s"
            )
        print(f"metrics: {result.out_dir / 'metrics.jsonl'}")
        if result.last_checkpoint:
            print(f"checkpoint: {result.last_checkpoint}")
        if result.plot:
            print(f"plot: {result.plot}")
        if result.last_checkpoint:
            print(f"try: mcore generate {result.last_checkpoint} --prompt 'def ' --max-new-tokens 200")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_with_user_errors(_train, list(sys.argv[1:] if argv is None else argv))
