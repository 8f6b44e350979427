"""Balanced assignment of whole items (parameters, matrices) to ranks.

Greedy longest-processing-time bin packing: items by decreasing cost, each to the rank with
the least cost so far (ties to the lower rank; equal costs keep model order), so every rank
computes the same assignment without communicating. Never splits an item.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def assign(costs: Sequence[tuple[str, float]], size: int) -> dict[str, int]:
    """Owner rank of each named item, from ``(name, cost)`` pairs."""
    loads: list[tuple[float, int]] = [(0.0, r) for r in range(size)]  # (cost assigned, rank): a min-heap
    owners = {}
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i][1], i)):
        name, cost = costs[i]
        load, rank = heapq.heappop(loads)
        owners[name] = rank
        heapq.heappush(loads, (load + cost, rank))
    return owners
