"""Memory numbers for the progress display and the planner's checks.

On CUDA: ``torch.cuda.max_memory_allocated``. On CPU there is no allocator counter, so
``measure_peak`` runs a function under the torch profiler with memory tracking and replays
its allocation events to find the peak of bytes held by tensors (what the planner models).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes a fresh allocation may take on ``device``: free memory on CUDA, the host's physical memory on CPU; None
    where unknown. For refusing an absurd size with a message before allocating, not for fine-grained planning."""
    device = torch.device(device)
    if device.type == "cuda":  # free, plus what torch's caching allocator holds unused (it frees that before failing)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + int(cached)
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            return None
    return None


def current_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def measure_peak_cpu(fn: Callable[[], Any]) -> tuple[int, int]:
    """``(peak, baseline)`` bytes of CPU tensor memory during ``fn()``, from profiler events.

    ``peak`` is the most bytes held at once, counting tensors alive before ``fn`` started as
    ``baseline`` (estimated as the lowest point of the running total below zero).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        trace = Path(d) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    deltas = [
        (e["ts"], int(e["args"]["Bytes"]))
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    ]
    deltas.sort(key=lambda x: x[0])
    running = low = high = 0
    for _, b in deltas:
        running += b
        low, high = min(low, running), max(high, running)
    return high - low, -low
