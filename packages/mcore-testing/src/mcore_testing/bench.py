"""What the packages' GPU benchmarks share: interleaved timing, peak memory, relative error, JSON lines.

Every ``benchmarks/bench*.py`` times its candidates the same way (the method the device notes ask for):
warm-up first (compiles), then ``repeats`` rounds, each running every candidate ``iters`` times in an
order rotated each round, so drift in clocks or temperature spreads over all of them; the row of a
candidate gives the median, min and max milliseconds over rounds. On several ranks a time is the slowest
rank's. Output: a header line describing the run, then one JSON object per row, on stdout (rank 0) and
in ``--out``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "Step",
    "Timer",
    "emit",
    "interleaved",
    "peak_mib",
    "rel_error",
    "rotated_rounds",
    "run_header",
    "timing_row",
    "write_lines",
]

K = TypeVar("K")
T = TypeVar("T")

#: One benchmarked call (forward + backward of a candidate, say).
Step = Callable[[], Any]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _slowest(value: float, device: torch.device) -> float:
    """The largest ``value`` over the ranks (itself on one process)."""
    if not _distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class Timer:
    """Milliseconds per call of ``iters`` calls: CUDA events on CUDA, the host clock on CPU; on several
    ranks a barrier first and the slowest rank's time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, step: Step, iters: int) -> float:
        if _distributed():
            dist.barrier()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                step()
            end.record()
            end.synchronize()
            return _slowest(float(start.elapsed_time(end)) / iters, self.device)
        begin = time.perf_counter()
        for _ in range(iters):
            step()
        return _slowest((time.perf_counter() - begin) * 1e3 / iters, self.device)


def peak_mib(step: Step, device: torch.device) -> float | None:
    """Peak memory of one call above what was allocated before it, MiB (CUDA only; the largest rank's)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return round(_slowest((torch.cuda.max_memory_allocated() - before) / 2**20, device), 1)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp64, over every rank's share when distributed (NaN stays NaN)."""
    out, ref = out.detach().double(), ref.detach().double()
    sums = torch.stack([(out - ref).square().sum(), ref.square().sum()])
    if _distributed():
        dist.all_reduce(sums)
    return float(f"{float((sums[0] / sums[1]).sqrt()):.3e}")


def interleaved(
    steps: dict[str, Step], *, repeats: int, iters: int, warmup: int, device: torch.device
) -> dict[str, Any]:
    """``{name: {"times": [ms per round], "peak_mib": ..., "output": first call's result}}``: ``warmup`` calls
    each (the first one's result kept), the peak memory of one call, then ``repeats`` rotated rounds."""
    names = list(steps)
    out: dict[str, Any] = {name: {"output": steps[name](), "times": []} for name in names}
    for name in names:
        for _ in range(warmup - 1):
            steps[name]()
        out[name]["peak_mib"] = peak_mib(steps[name], device)
    timer = Timer(device)
    for round_index in range(repeats):
        shift = round_index % max(len(names), 1)
        for name in names[shift:] + names[:shift]:  # rotated order each round
            out[name]["times"].append(timer(steps[name], iters))
    return out


def rotated_rounds(candidates: Mapping[K, Callable[[], T]], repeats: int) -> tuple[dict[K, list[T]], dict[K, str]]:
    """Whole-run candidates (each call does its own timing and returns its result): one warm-up call each, then
    ``repeats`` rounds in an order rotated each round. Returns each candidate's results per round and the errors of
    those that raised (``repr``); a candidate that raises drops out, its results with it, and the others go on."""
    errors: dict[K, str] = {}
    for key, run in candidates.items():
        try:
            run()
        except Exception as err:
            errors[key] = repr(err)
    names = [key for key in candidates if key not in errors]
    results: dict[K, list[T]] = {key: [] for key in names}
    for round_index in range(repeats):
        shift = round_index % max(len(names), 1)
        for key in names[shift:] + names[:shift]:
            if key in errors:
                continue
            try:
                results[key].append(candidates[key]())
            except Exception as err:
                errors[key] = repr(err)
                del results[key]
    return results, errors


def timing_row(times: Sequence[float], digits: int = 4) -> dict[str, float]:
    """``median_ms``, ``min_ms``, ``max_ms`` of the rounds' times."""
    return {
        "median_ms": round(statistics.median(times), digits),
        "min_ms": round(min(times), digits),
        "max_ms": round(max(times), digits),
    }


def run_header(device: torch.device, dtype: torch.dtype, **settings: Any) -> dict[str, Any]:
    """The first JSON line: torch version, device name, dtype, world size, and the run's ``settings``."""
    return {
        "config": True,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world": dist.get_world_size() if _distributed() else 1,
        "dtype": str(dtype),
        **settings,
    }


def emit(lines: list[dict[str, Any]], row: dict[str, Any], *, show: bool = True) -> None:
    """Append ``row`` to ``lines`` and print it as one JSON line (when ``show``: rank 0)."""
    lines.append(row)
    if show:
        print(json.dumps(row), flush=True)


def write_lines(path: str | None, lines: list[dict[str, Any]]) -> None:
    """The run's JSON lines into ``path`` (``--out``; nothing when ``None``)."""
    if path:
        with open(path, "w") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in lines)
