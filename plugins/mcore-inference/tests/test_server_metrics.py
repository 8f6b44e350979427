"""``/metrics``: valid Prometheus text (checked by a small parser of the format), and every number moves as requests
run: load gauges while requests run and wait, token counters, the prefix cache's hits, the latency histograms and
the finish reasons; with the engine in a thread and in its own process."""

from __future__ import annotations

import itertools
import math
import re
import time
from typing import Any

import httpx
import openai
import pytest
from mcore_inference.server.metrics import Histogram, render
from server_helpers import GREEDY, MODEL, MODES, all_free, live_server, make_app

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(name, labels): value}`` of Prometheus text; asserts the format (a TYPE before each family's samples,
    labels well formed, histograms cumulative with ``+Inf`` equal to ``_count``)."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"counter", "gauge", "histogram"} and name not in types, line
            types[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels_text, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"{name}: no TYPE line before it"
        labels = []
        rest = labels_text or ""
        while rest:
            label = _LABEL.match(rest)
            assert label, f"bad labels in {line!r}"
            labels.append((label.group(1), label.group(2)))
            rest = rest[label.end() :]
        key = (name, frozenset(labels))
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(value)
    for family in (f for f, kind in types.items() if kind == "histogram"):
        buckets = sorted(
            ((float(dict(k[1])["le"]), v) for k, v in samples.items() if k[0] == family + "_bucket"),
        )
        assert buckets and buckets[-1][0] == math.inf
        assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets)), f"{family}: buckets not cumulative"
        assert buckets[-1][1] == value_of(samples, family + "_count")
    return samples


def value_of(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = {("model_name", MODEL), *labels.items()}
    return samples[(name, frozenset(want))]


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    reply = httpx.get(url + "/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(reply.text)


def test_histogram_buckets_and_render_escape_labels() -> None:
    h = Histogram([0.1, 1.0])
    for value in (0.05, 0.1, 0.5, 3.0):
        h.observe(value)
    h.observe(0.5, count=2)
    assert h.counts == [2, 3, 1] and h.sum == pytest.approx(0.05 + 0.1 + 0.5 + 3.0 + 1.0)
    hist = h.snapshot()
    stats: dict[str, Any] = {"running": 1, "waiting": 2, "blocks_used": 3, "blocks_total": 4, "preemptions": 0,
                             "num_steps": 5, "prefix_cache_queried_tokens": 8, "prefix_cache_hit_tokens": 4}  # fmt: skip
    stats["metrics"] = {"prompt_tokens": 7, "generation_tokens": 9, "prompt_tokens_per_second": 0.7,
                        "generation_tokens_per_second": 0.9, "finished": {"stop": 1}, "rejected": {"queue_full": 0},
                        "ttft": hist, "itl": hist, "e2e": hist}  # fmt: skip
    text = render(stats, 'we"ird\\name\n')
    assert 'model_name="we\\"ird\\\\name\\n"' in text
    samples = parse(text.replace('we\\"ird\\\\name\\n', MODEL))
    assert value_of(samples, "mcore:time_to_first_token_seconds_bucket", le="0.1") == 2
    assert value_of(samples, "mcore:time_to_first_token_seconds_bucket", le="1") == 5
    assert value_of(samples, "mcore:time_to_first_token_seconds_count") == 6
    assert value_of(samples, "mcore:prefix_cache_hit_rate") == 0.5
    assert value_of(samples, "mcore:kv_cache_usage_perc") == 0.75


@pytest.mark.parametrize("mode", MODES)
def test_metrics_move_with_requests(mode: str) -> None:
    app = make_app(mode, "slow", max_num_seqs=1)  # one request at a time: the others wait
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        start = time.monotonic()
        before = scrape(url)
        for name in ("mcore:prompt_tokens_total", "mcore:generation_tokens_total", "mcore:kv_cache_blocks_used",
                     "mcore:num_requests_running", "mcore:num_requests_waiting",
                     "mcore:time_to_first_token_seconds_count"):  # fmt: skip
            assert value_of(before, name) == 0, name
        assert value_of(before, "mcore:kv_cache_blocks_total") == 256
        assert value_of(before, "mcore:request_success_total", finished_reason="length") == 0

        # load: two streams, one running and one waiting, holding blocks
        body = {"model": MODEL, "prompt": "load", "max_tokens": 30, "stream": True, "ignore_eos": True}
        with (
            httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as one,
            httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as two,
        ):
            deadline = time.monotonic() + 10
            while True:
                now = scrape(url)
                running, waiting = (value_of(now, f"mcore:num_requests_{k}") for k in ("running", "waiting"))
                if (running, waiting) == (1, 1) or time.monotonic() > deadline:
                    break
            assert (running, waiting) == (1, 1)
            assert value_of(now, "mcore:kv_cache_blocks_used") >= 2  # "load" + generated tokens, 4 per block
            assert 0 < value_of(now, "mcore:kv_cache_usage_perc") < 1
            streamed = [sum(1 for line in r.iter_lines() if line.startswith("data: {")) for r in (one, two)]
        assert streamed == [30, 30]

        prompt = "the same prompt, twice over"  # 27 bytes: 6 full blocks of 4
        usage = []
        for _ in range(2):
            out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, n=2, **GREEDY)
            assert out.usage is not None
            usage.append((out.usage.prompt_tokens, out.usage.completion_tokens))
        assert all_free(app)
        after = scrape(url)
        elapsed = time.monotonic() - start
        requests = 2 + 2 * 2
        prompt_tokens = 2 * len("load") + 2 * 2 * len(prompt)
        generated = 2 * 30 + sum(c for _, c in usage)
        assert value_of(after, "mcore:prompt_tokens_total") == prompt_tokens
        assert value_of(after, "mcore:generation_tokens_total") == generated
        assert value_of(after, "mcore:request_success_total", finished_reason="length") == requests
        assert value_of(after, "mcore:request_success_total", finished_reason="abort") == 0
        assert value_of(after, "mcore:time_to_first_token_seconds_count") == requests
        assert value_of(after, "mcore:e2e_request_latency_seconds_count") == requests
        assert value_of(after, "mcore:inter_token_latency_seconds_count") == generated - requests
        # each inter-token gap is at least one 20 ms model call
        assert value_of(after, "mcore:inter_token_latency_seconds_sum") >= 0.02 * (generated - requests) * 0.9
        assert value_of(after, "mcore:time_to_first_token_seconds_sum") > 0
        if elapsed < 10:  # every token inside the rate window
            assert value_of(after, "mcore:generation_tokens_per_second") == pytest.approx(generated / 10)
        queried = value_of(after, "mcore:prefix_cache_queries_total")
        hits = value_of(after, "mcore:prefix_cache_hits_total")
        assert hits >= 6 * 4 * 3  # every request after the first found the prompt's 6 full blocks
        assert queried % 4 == 0 and hits % 4 == 0
        assert value_of(after, "mcore:prefix_cache_hit_rate") == pytest.approx(hits / queried)
        assert value_of(after, "mcore:kv_cache_blocks_used") == 0
        assert value_of(after, "mcore:engine_steps_total") >= 30


def test_speculation_counters_per_draft_position() -> None:
    from types import SimpleNamespace

    from mcore_inference.server.engine_core import EngineCore
    from server_helpers import make_engine

    engine = make_engine()
    core = EngineCore(engine)
    assert core.stats()["spec"] is None and "spec_decode" not in render(core.stats(), MODEL)  # speculation off
    counters = SimpleNamespace(proposed=[8, 6], accepted=[6, 3], verify_steps=8, emitted=17)
    engine.spec_stats = lambda: counters  # type: ignore[method-assign]  # what LLMEngine(speculative_tokens=2) gives
    samples = parse(render(core.stats(), MODEL))
    for position, proposed, accepted in (("1", 8, 6), ("2", 6, 3)):
        assert value_of(samples, "mcore:spec_decode_num_draft_tokens_total", position=position) == proposed
        assert value_of(samples, "mcore:spec_decode_num_accepted_tokens_total", position=position) == accepted
        assert value_of(samples, "mcore:spec_decode_acceptance_rate", position=position) == accepted / proposed
    assert value_of(samples, "mcore:spec_decode_num_verifications_total") == 8
    assert value_of(samples, "mcore:spec_decode_num_emitted_tokens_total") == 17


def test_fp8_kv_cache_saturations_per_layer() -> None:
    from mcore_inference.server.engine_core import EngineCore
    from server_helpers import make_engine

    plain = EngineCore(make_engine())
    assert plain.stats()["kv_fp8_clipped"] is None and "fp8_clipped" not in render(plain.stats(), MODEL)
    engine = make_engine(kv_cache_dtype="fp8_e4m3")
    core = EngineCore(engine)
    assert core.stats()["kv_fp8_clipped"] == {str(i): 0 for i in engine.cache.layers}
    engine.cache.layers[1].clipped.fill_(7)  # type: ignore[union-attr]  # what saturating appends leave
    samples = parse(render(core.stats(), MODEL))
    for layer in engine.cache.layers:
        assert value_of(samples, "mcore:kv_cache_fp8_clipped_total", layer=str(layer)) == (7 if layer == 1 else 0)
