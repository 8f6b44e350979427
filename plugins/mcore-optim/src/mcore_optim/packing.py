"""Balanced assignment of whole items (parameters, matrices) to ranks.

Greedy longest-processing-time bin packing: items by decreasing cost, each to the rank with
the least cost so far (ties to the lower rank; equal costs keep model order), so every rank
computes the same assignment without communicating. Never splits an item.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def assign(costs: Sequence[tuple[str, float]], size: int, *, loads: Sequence[float] | None = None) -> dict[str, int]:
    """Owner rank of each named item, from ``(name, cost)`` pairs.

    ``loads``: each rank's cost already fixed before these items (e.g. matrices it alone
    holds), which the packing balances around; default none.
    """
    start = list(loads) if loads is not None else [0.0] * size
    assert len(start) == size, (start, size)
    heap: list[tuple[float, int]] = [(float(load), r) for r, load in enumerate(start)]  # (cost so far, rank)
    heapq.heapify(heap)
    owners = {}
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i][1], i)):
        name, cost = costs[i]
        load, rank = heapq.heappop(heap)
        owners[name] = rank
        heapq.heappush(heap, (load + cost, rank))
    return owners
