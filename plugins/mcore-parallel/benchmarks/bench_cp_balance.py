"""Static against dynamic CP on a long-tailed mix of document lengths: balance and what is exchanged.

No GPU and no timing: both plans are pure functions of a micro-batch (``cp_split.plan_split``, the zig-zag
split of every document over all ``cp`` ranks; ``cp_split.plan_dynamic``, each document over as few ranks as
its length needs), so this measures them exactly. Micro-batches are rows of ``--seq-len`` tokens packed with
documents whose lengths follow a log-normal distribution (median ``--median``, sigma ``--sigma``: a long
tail, as in web text with a few books), cut at row ends as the ``thd`` packing does. Per ``cp`` and plan, the
mean over ``--batches`` micro-batches of ``cp_split.split_balance``: max/mean real tokens per rank, max/mean
attention work per rank (causal pairs), max/mean of the two weighed together (``document_cost`` with
``6 * --hidden``: a token's attention at that position costs as much as the rest of its layer), padding share of
the ranks' rows, share of tokens whose keys another rank needs, and token slots the all-gather kind sends per
real token. Plans: ``static``, ``dynamic`` (balancing tokens), ``dynamic-work`` (balancing the weighed cost).

    python plugins/mcore-parallel/benchmarks/bench_cp_balance.py
    python plugins/mcore-parallel/benchmarks/bench_cp_balance.py --quick   # small, for tests
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from typing import Any

import torch

from mcore_parallel.cp_split import plan_dynamic, plan_split, split_balance
from mcore_testing.bench import emit, write_lines

PLANS = ("static", "dynamic", "dynamic-work")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small rows and few batches (tests)")
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--rows", type=int, default=1, help="rows per micro-batch")
    parser.add_argument("--cps", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--median", type=float, default=600.0, help="median document length (tokens)")
    parser.add_argument("--sigma", type=float, default=1.6, help="log-normal sigma of the lengths")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size: attention weighs 1/(6*hidden) per pair")
    parser.add_argument("--out", default=None, help="also write the JSON lines here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_len, args.batches, args.median, args.cps = 2048, 3, 100.0, [2, 4]
    return args


def packed_batch(rng: random.Random, rows: int, seq_len: int, median: float, sigma: float) -> torch.Tensor:
    """``cu_seqlens`` of ``rows`` rows of ``seq_len`` tokens filled with log-normal document lengths."""
    bounds, total = [0], rows * seq_len
    while bounds[-1] < total:
        length = max(1, round(rng.lognormvariate(math.log(median), sigma)))
        bounds.append(min(total, bounds[-1] + length))
    return torch.tensor(bounds, dtype=torch.int32)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lines: list[dict[str, Any]] = []
    settings = {"seq_len": args.seq_len, "rows": args.rows, "median": args.median, "sigma": args.sigma}
    settings["hidden"] = args.hidden
    emit(lines, {"config": True, "torch": torch.__version__, "batches": args.batches, "seed": args.seed, **settings})
    rng = random.Random(args.seed)
    batches = [packed_batch(rng, args.rows, args.seq_len, args.median, args.sigma) for _ in range(args.batches)]
    attention_tokens = 6 * args.hidden  # where a token's attention costs as much as the rest of its layer
    cpu = torch.device("cpu")

    def plan(name: str, cu: torch.Tensor, cp: int) -> Any:
        if name == "static":
            return plan_split(cu, args.rows, args.seq_len, cp, cpu)
        weigh = attention_tokens if name == "dynamic-work" else None
        return plan_dynamic(cu, args.rows, args.seq_len, cp, cpu, attention_tokens=weigh)

    for cp in args.cps:
        for name in PLANS:
            stats = [
                split_balance(plan(name, cu, cp), cu, args.rows, args.seq_len, attention_tokens=attention_tokens)
                for cu in batches
            ]
            row: dict[str, Any] = {"cp": cp, "plan": name}
            row |= {key: round(statistics.mean(s[key] for s in stats), 4) for key in stats[0]}
            row["worst_max_over_mean_tokens"] = max(s["max_over_mean_tokens"] for s in stats)
            emit(lines, row)
    write_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
