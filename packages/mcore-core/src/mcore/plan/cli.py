"""``mcore plan [run.toml] [--section.key=value ...] [--world-size N] [--device-memory-gb G] [--json]``.

Prints the per-rank memory plan of a run (see ``mcore.plan.estimate``) and whether it fits
the device memory (given, or the first GPU's); exits 1 when it does not fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from mcore.cli import run_with_user_errors
from mcore.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are ``UserError`` (one line, exit code 2 through the CLI)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message}; see mcore plan --help")


def build_parser() -> argparse.ArgumentParser:
    from mcore.helptext import OVERRIDES_HELP

    parser = _Parser(
        prog="mcore plan",
        usage="mcore plan [RUN.toml] [--section.key=value ...] [--world-size N] [--device-memory-gb G] [--json]",
        description=(
            "Estimate the per-rank memory of a run before launching it: parameters, gradients, optimizer\n"
            "state and the activations of each layer (measured on storage-less tensors), with the run's\n"
            "layouts, precision and recompute. Exits 1 when the peak does not fit the device memory."
        ),
        epilog=OVERRIDES_HELP + "\nEvery config key, with its default: mcore train --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("config", nargs="?", metavar="RUN.toml", help="run config (no file: the demo's config)")
    parser.add_argument("--world-size", type=int, metavar="N", help="ranks to plan for (default: product of sizes)")
    parser.add_argument(
        "--device-memory-gb", type=float, metavar="G", help="memory of one device in GiB (default: the first GPU's)"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def _plan(argv: list[str]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if stray:
        raise UserError(
            f"unrecognized arguments {stray}: overrides look like --section.key=value; see mcore plan --help"
        )
    if args.world_size is not None and args.world_size < 1:
        raise UserError(f"--world-size {args.world_size}: must be a positive int")
    if args.device_memory_gb is not None and not 0 < args.device_memory_gb < math.inf:
        raise UserError(f"--device-memory-gb {args.device_memory_gb}: must be a finite positive number")
    from mcore.train.cli import resolve

    config, host = resolve(args.config, rest)
    from mcore.plan.estimate import format_plan, plan_memory

    memory = args.device_memory_gb
    if memory is None:
        import torch

        if torch.cuda.is_available():
            memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    plan = plan_memory(config, host, world_size=args.world_size, device_memory_gb=memory)
    if args.json:
        print(json.dumps({**dataclasses.asdict(plan), "fits": plan.fits}, indent=2))
    else:
        print(format_plan(plan))
    return 1 if plan.fits is False else 0


def main(argv: list[str] | None = None) -> int:
    return run_with_user_errors(_plan, list(sys.argv[1:] if argv is None else argv))
