"""The hash router's balanced table against round robin on Zipf-like token frequencies: expected load per expert.

No GPU and no timing: ``hash_router.balanced_table`` bin-packs token frequencies (the counts ``mcore data
prepare`` shards give) so each expert expects a near-equal share of the tokens; ``round_robin_table`` sends
token ``t`` to experts ``t * K .. t * K + K - 1`` (mod E) whatever its frequency. Frequencies follow Zipf's
law ``count(rank) ~ rank ** -s`` over a vocabulary of ``--vocab`` ids (shuffled, so id order says nothing).
Per (experts, top-k, s): max/mean and min/mean expected load of each table (``expected_load``), and the best
max/mean any table can reach (the most frequent token's count lands whole on each of its K experts).

    python plugins/mcore-moe/benchmarks/bench_hash_balance.py
    python plugins/mcore-moe/benchmarks/bench_hash_balance.py --quick   # small, for tests
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from mcore_moe.hash_router import balanced_table, expected_load, round_robin_table
from mcore_testing.bench import emit, write_lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a small vocabulary (tests)")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--zipf", type=float, nargs="+", default=[1.0, 1.2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the JSON lines here")
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.experts = 2048, [16, 64]
    return args


def zipf_counts(vocab: int, exponent: float, seed: int) -> torch.Tensor:
    """``(V,)`` token counts ``~ rank ** -exponent`` (scaled to 1e9 tokens), ids shuffled."""
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    counts = ranks.pow(-exponent)
    counts = counts / counts.sum() * 1e9
    return counts[torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lines: list[dict[str, Any]] = []
    emit(lines, {"config": True, "torch": torch.__version__, "vocab": args.vocab, "top_k": args.top_k})
    for exponent in args.zipf:
        counts = zipf_counts(args.vocab, exponent, args.seed)
        for experts in args.experts:
            k = min(args.top_k, experts)
            tables = {
                "round_robin": round_robin_table(args.vocab, experts, k),
                "balanced": balanced_table(counts, experts, k),
            }
            for name, table in tables.items():
                load = expected_load(table, counts, experts)
                mean = float(load.mean())
                row = {"zipf": exponent, "experts": experts, "top_k": k, "table": name}
                row |= {
                    "max_over_mean": round(float(load.max()) / mean, 4),
                    "min_over_mean": round(float(load.min()) / mean, 4),
                    # no table does better: the most frequent token's count lands whole on each of its experts
                    "best_possible_max_over_mean": round(max(1.0, float(counts.max()) / mean), 4),
                }
                emit(lines, row)
    write_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
