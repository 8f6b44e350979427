"""``mcore plan [run.toml] [--section.key=value ...] [--world-size N] [--device-memory-gb G] [--json]``.

Prints the per-rank memory plan of a run (see ``mcore.plan.estimate``) and whether it fits
the device memory (given, or the first GPU's); exits 1 when it does not fit.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from mcore.cli import run_with_user_errors
from mcore.errors import UserError

FLAGS = ("--world-size", "--device-memory-gb", "--json")


def _plan(argv: list[str]) -> int:
    opts: dict[str, str] = {}
    rest = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if key in FLAGS:
            opts[key] = arg.split("=", 1)[1] if "=" in arg else "1"
        else:
            rest.append(arg)
    from mcore.train.cli import resolve, split_args

    path, overrides = split_args(rest)
    config, host = resolve(path, overrides)
    from mcore.plan.estimate import format_plan, plan_memory

    try:
        world = int(opts["--world-size"]) if "--world-size" in opts else None
        memory = float(opts["--device-memory-gb"]) if "--device-memory-gb" in opts else None
    except ValueError:
        raise UserError("--world-size=N takes an int and --device-memory-gb=G a number") from None
    if memory is None:
        import torch

        if torch.cuda.is_available():
            memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    plan = plan_memory(config, host, world_size=world, device_memory_gb=memory)
    if "--json" in opts:
        print(json.dumps({**dataclasses.asdict(plan), "fits": plan.fits}, indent=2))
    else:
        print(format_plan(plan))
    return 1 if plan.fits is False else 0


def main(argv: list[str] | None = None) -> int:
    return run_with_user_errors(_plan, list(sys.argv[1:] if argv is None else argv))
