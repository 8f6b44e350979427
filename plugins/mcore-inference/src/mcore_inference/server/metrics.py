"""The server's counters and latency histograms, and ``/metrics`` in Prometheus' text format (version 0.0.4).

Why it exists: an operator scrapes ``/metrics`` to see load (running and waiting requests, KV blocks in use),
the prefix cache's hit rate, throughput and latency (time to first token, inter-token latency, end to end). The
numbers are recorded where the engine runs (``EngineCore``: its thread or its process) and cross to the HTTP
process as plain data (``EngineMetrics.snapshot``); ``render`` writes the text. No ``prometheus_client``: the
format is a few lines of text.

Counters end in ``_total``; histograms have cumulative ``_bucket{le=...}`` lines (the last ``+Inf``), ``_sum``
and ``_count``. Every sample carries ``model_name``. With speculative decoding on, the drafts proposed and accepted
per draft position (``LLMEngine.spec_stats()``) and their acceptance rates are there too; with an FP8 KV cache,
the values each layer saturated (``PagedKVCache.fp8_clipped``). Times are seconds on the monotonic clock (system-wide on
Linux and macOS, so an arrival time taken in the HTTP process compares with one taken in the engine process).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

#: Buckets of the time to first token (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
#: Buckets of the time between two output tokens of a request (seconds).
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
#: Buckets of a request's whole time, arrival to finish (seconds).
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
#: The window over which ``tokens per second`` gauges average (seconds).
RATE_WINDOW = 10.0
#: Finish reasons counted (always present, so a dashboard's series exist from the start).
FINISH_REASONS = ("stop", "length", "abort", "error")


class Histogram:
    """Observations counted per bucket (upper bounds ``buckets``, then +Inf), with their sum."""

    def __init__(self, buckets: Sequence[float]) -> None:
        assert list(buckets) == sorted(buckets) and len(set(buckets)) == len(buckets), "buckets must increase"
        self.buckets = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """Add ``count`` observations of ``value``."""
        self.counts[bisect.bisect_left(self.buckets, value)] += count
        self.sum += value * count

    def snapshot(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum}


class EngineMetrics:
    """What the engine side records: per-request timing, token counters, finish reasons, refusals."""

    def __init__(self) -> None:
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.rejected = {"queue_full": 0}
        self._recent: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, generated tokens)

    def on_add(self, prompt_tokens: int, now: float) -> None:
        self.prompt_tokens += prompt_tokens
        self._note(now, prompt_tokens, 0)

    def on_tokens(self, count: int, now: float, arrival: float, last: float | None) -> None:
        """``count`` new tokens of one request at ``now``; ``last``: when its previous ones came (None: first). The
        rate window counts them through ``on_generated`` (once per step, not per request)."""
        self.generation_tokens += count
        if last is None:
            self.ttft.observe(max(0.0, now - arrival))
            count -= 1  # the first token's wait is the TTFT; the rest of the step's tokens came with it
            last = now
        if count > 0:
            self.itl.observe(max(0.0, now - last) / count, count)

    def on_generated(self, count: int, now: float) -> None:
        """``count`` tokens generated at ``now`` (a step's, over its requests: ``on_tokens`` counted each)."""
        self._note(now, 0, count)

    def on_finish(self, reason: str | None, now: float, arrival: float) -> None:
        key = reason if reason in self.finished else "error"
        self.finished[key] += 1
        self.e2e.observe(max(0.0, now - arrival))

    def _note(self, now: float, prompt: int, generated: int) -> None:
        self._recent.append((now, prompt, generated))
        while self._recent and self._recent[0][0] < now - RATE_WINDOW:
            self._recent.popleft()

    def rates(self, now: float) -> tuple[float, float]:
        """Prompt and generation tokens per second over the last ``RATE_WINDOW`` seconds."""
        while self._recent and self._recent[0][0] < now - RATE_WINDOW:
            self._recent.popleft()
        prompt = sum(p for _, p, _ in self._recent)
        generated = sum(g for _, _, g in self._recent)
        return prompt / RATE_WINDOW, generated / RATE_WINDOW

    def snapshot(self, now: float) -> dict[str, Any]:
        """Plain data (it crosses the process boundary as JSON)."""
        prompt_rate, generation_rate = self.rates(now)
        return {
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "prompt_tokens_per_second": prompt_rate,
            "generation_tokens_per_second": generation_rate,
            "finished": dict(self.finished),
            "rejected": dict(self.rejected),
            "ttft": self.ttft.snapshot(),
            "itl": self.itl.snapshot(),
            "e2e": self.e2e.snapshot(),
        }


# ----- the text format -----


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


class _Writer:
    def __init__(self, model_name: str) -> None:
        self.lines: list[str] = []
        self.base = f'model_name="{_escape(model_name)}"'

    def head(self, name: str, kind: str, text: str) -> None:
        self.lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        extra = "".join(f',{k}="{_escape(v)}"' for k, v in (labels or {}).items())
        self.lines.append(f"{name}{{{self.base}{extra}}} {_number(value)}")

    def one(self, name: str, kind: str, text: str, value: float) -> None:
        self.head(name, kind, text)
        self.sample(name, value)

    def histogram(self, name: str, text: str, data: dict[str, Any]) -> None:
        self.head(name, "histogram", text)
        running = 0
        for bound, count in zip([*data["buckets"], math.inf], data["counts"]):
            running += count
            self.sample(f"{name}_bucket", running, {"le": _number(bound)})
        self.sample(f"{name}_sum", data["sum"])
        self.sample(f"{name}_count", running)


def render(stats: dict[str, Any], model_name: str) -> str:
    """The Prometheus text of an engine's ``stats`` (``EngineCore.stats``)."""
    m = stats["metrics"]
    w = _Writer(model_name)
    w.one("mcore:num_requests_running", "gauge", "Requests in the running batch.", stats["running"])
    w.one("mcore:num_requests_waiting", "gauge", "Requests waiting to be scheduled.", stats["waiting"])
    w.one("mcore:kv_cache_blocks_used", "gauge", "KV cache blocks held by requests.", stats["blocks_used"])
    w.one("mcore:kv_cache_blocks_total", "gauge", "KV cache blocks in all.", stats["blocks_total"])
    usage = stats["blocks_used"] / stats["blocks_total"] if stats["blocks_total"] else 0.0
    w.one("mcore:kv_cache_usage_perc", "gauge", "Fraction of the KV cache blocks in use (0 to 1).", usage)
    queried, hit = stats["prefix_cache_queried_tokens"], stats["prefix_cache_hit_tokens"]
    w.one("mcore:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", queried)
    w.one("mcore:prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", hit)
    w.one("mcore:prefix_cache_hit_rate", "gauge", "Prefix cache hits over queries (0 before any).",
          hit / queried if queried else 0.0)  # fmt: skip
    w.one("mcore:prompt_tokens_total", "counter", "Prompt tokens of requests added.", m["prompt_tokens"])
    w.one("mcore:generation_tokens_total", "counter", "Tokens generated.", m["generation_tokens"])
    w.one("mcore:prompt_tokens_per_second", "gauge", f"Prompt tokens added per second (last {RATE_WINDOW:g} s).",
          m["prompt_tokens_per_second"])  # fmt: skip
    w.one("mcore:generation_tokens_per_second", "gauge", f"Tokens generated per second (last {RATE_WINDOW:g} s).",
          m["generation_tokens_per_second"])  # fmt: skip
    w.one("mcore:num_preemptions_total", "counter", "Requests preempted (recomputed later).", stats["preemptions"])
    w.one("mcore:engine_steps_total", "counter", "Model calls of the engine.", stats["num_steps"])
    w.head("mcore:request_success_total", "counter", "Requests finished, by finish reason.")
    for reason, count in m["finished"].items():
        w.sample("mcore:request_success_total", count, {"finished_reason": reason})
    w.head("mcore:request_rejected_total", "counter", "Requests refused (HTTP 429), by reason.")
    for reason, count in m["rejected"].items():
        w.sample("mcore:request_rejected_total", count, {"reason": reason})
    spec = stats.get("spec")
    if spec is not None:
        _speculation(w, spec)
    clipped = stats.get("kv_fp8_clipped")
    if clipped is not None:  # an FP8 KV cache: values saturated beyond the scales fixed at the first chunk
        w.head("mcore:kv_cache_fp8_clipped_total", "counter", "FP8 KV cache values saturated at +-448, by layer.")
        for layer, count in clipped.items():
            w.sample("mcore:kv_cache_fp8_clipped_total", count, {"layer": layer})
    w.histogram("mcore:time_to_first_token_seconds", "Arrival to first generated token.", m["ttft"])
    w.histogram("mcore:inter_token_latency_seconds", "Time between two generated tokens of a request.", m["itl"])
    w.histogram("mcore:e2e_request_latency_seconds", "Arrival to finish of a request.", m["e2e"])
    return "\n".join(w.lines) + "\n"


def _speculation(w: _Writer, spec: dict[str, Any]) -> None:
    """Speculative decoding: drafts proposed and accepted per draft position (1 = the first draft token)."""
    positions = [str(i + 1) for i in range(len(spec["proposed"]))]
    w.head("mcore:spec_decode_num_draft_tokens_total", "counter", "Draft tokens verified, by draft position.")
    for position, count in zip(positions, spec["proposed"]):
        w.sample("mcore:spec_decode_num_draft_tokens_total", count, {"position": position})
    w.head("mcore:spec_decode_num_accepted_tokens_total", "counter", "Draft tokens accepted, by draft position.")
    for position, count in zip(positions, spec["accepted"]):
        w.sample("mcore:spec_decode_num_accepted_tokens_total", count, {"position": position})
    w.head("mcore:spec_decode_acceptance_rate", "gauge", "Accepted over verified drafts, by draft position.")
    for position, proposed, accepted in zip(positions, spec["proposed"], spec["accepted"]):
        w.sample("mcore:spec_decode_acceptance_rate", accepted / proposed if proposed else 0.0, {"position": position})
    w.one("mcore:spec_decode_num_verifications_total", "counter", "Sequence verifications (one per sequence and step).",
          spec["verify_steps"])  # fmt: skip
    w.one("mcore:spec_decode_num_emitted_tokens_total", "counter", "Tokens emitted by verifications.", spec["emitted"])
