"""Serving benchmarks of the inference engine: a long-tailed workload, prefix caching, and the server's overhead.

Why it exists: issues 20/21 (serving speed). Every section runs on a preset with random weights (bf16 on CUDA,
CUDA graphs on; ``--quick``: the ``tiny`` preset in fp32 on the CPU, short). Sections (``--sections``):

* ``workload``: ``--requests`` seeded requests, prompt and output lengths lognormal (clipped to ``--prompt-range``,
  ``--output-range`` and the context), arriving all at once or Poisson at ``--rate`` requests/s, through
  ``LLMEngine`` (continuous batching, prefix caching on). Output tokens/s, mean/p99 time to first token (arrival to
  the step that produced it) and inter-token latency (the gaps between the step timestamps of a request's tokens).
  Against it, when ``transformers`` imports, Hugging Face ``generate`` (``LlamaForCausalLM`` on the same weights, as
  in ``bench_decode.py``) in fixed batches of ``--hf-batch`` (all requests there from the start, padded left, greedy,
  ``max_new_tokens`` the batch's longest): HF's time to first token is not observable from ``generate``, so its row
  gives output tokens/s (the tokens each request asked for) and the mean/p99 wall time of a batch instead.
* ``prefix``: a ``--prefix``-token shared prefix plus distinct ``--suffix``-token suffixes, one output token: the
  time to first token of the first request (a miss: a new prefix each repeat) and of the next (a hit), medians over
  ``--repeats``, and their ratio (goal: hit >= 5x faster). Then the cost of prefix caching at a 0% hit rate:
  output tokens/s of a workload of all-distinct prompts (new ones each round) with ``enable_prefix_caching`` on and
  off, in rounds rotated each round (``mcore_testing.bench``'s method).
* ``server``: the ``mcore serve`` app (``build_app`` + uvicorn on 127.0.0.1 at a free port; the engine in its own
  process, ``--server-mode process``, the default and what ``mcore serve`` runs, or in a thread, ``thread``) with ``--clients`` concurrent streaming clients (HTTP/1.1,
  SSE, token-id prompts, ``--server-requests`` of them; in a process of their own, as real clients are, reading the
  raw chunked stream) against the engine driven directly on the same requests, at most ``--clients`` live at once
  (thread mode: the served engine itself, in its thread between its steps; process mode: an engine of the same
  build in this process, with as many intra-op threads as the served one): output tokens/s of each and the ratio
  (goal: within 5%), in rotated rounds, and the SSE events per token the clients received (below 1: the server
  merged the deltas of a stream that fell behind). Prefix caching is off here so that both see the same work; the
  engine carries a cheap id tokenizer so that the server streams a delta per token. ``--quick``'s settings are
  defaults: flags given win (``--quick --clients 32 --max-seqs 32``).

Output: a header line (the settings), then one JSON object per result, each with the card, torch version and date
(stdout and ``--out``), then Markdown rows. A section that fails prints its error (a JSON line with ``error``) and
the others go on (exit code 1); bad arguments: one line and exit code 2.

    python plugins/mcore-inference/benchmarks/bench_serving.py --sections workload --out workload.jsonl
    python plugins/mcore-inference/benchmarks/bench_serving.py --sections prefix server --out prefix_server.jsonl
    python plugins/mcore-inference/benchmarks/bench_serving.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import functools
import gc
import importlib.util
import itertools
import json
import math
import multiprocessing
import socket
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from mcore_inference.engine import LLMEngine
from mcore_inference.sampling import SamplingParams

from mcore_models.gpt import GPT
from mcore_models.presets import preset_config
from mcore_testing.bench import emit, rotated_rounds, run_header, write_lines

SECTIONS = ("workload", "prefix", "server")
BLOCK = 16
#: ``--quick``'s settings (a CPU smoke run); they are defaults, so ``--quick --clients 32`` runs 32 clients.
QUICK: dict[str, Any] = {
    "preset": "tiny", "context": 256, "max_seqs": 8, "batched_tokens": 256,
    "requests": 8, "prompt_range": (8, 96), "output_range": (2, 8), "hf_batch": 4,
    "prefix": 128, "suffix": 8, "distinct": 4, "distinct_prompt": 32, "distinct_output": 4,
    "clients": 4, "server_requests": 8, "server_prompt": 16, "server_output": 8,
    "repeats": 2,
}  # fmt: skip


# ----- shared -----


class IdTokenizer:
    """A stand-in tokenizer for random-weight models: token ``i`` is the text ``" <i>"`` (decoding is cheap)."""

    name = "ids"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eos_id = -1  # never sampled: requests end by length

    def encode(self, text: str) -> np.ndarray:
        return np.array([int(t.strip("<>")) for t in text.split()], dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(f" <{int(i)}>" for i in ids)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size}


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    arrival: float = 0.0  # seconds after the start


@dataclass
class Trace:
    """What a run of the engine measured: per request, the arrival and the timestamps of its tokens."""

    start: float
    end: float = 0.0
    arrivals: dict[int, float] = field(default_factory=dict)
    stamps: dict[int, list[float]] = field(default_factory=dict)

    def tokens(self) -> int:
        return sum(len(s) for s in self.stamps.values())

    def summary(self) -> dict[str, Any]:
        ttft = [s[0] - self.arrivals[r] for r, s in self.stamps.items() if s]
        itl = [b - a for s in self.stamps.values() for a, b in itertools.pairwise(s)]
        wall = self.end - self.start
        return {
            "wall_s": round(wall, 3),
            "output_tokens": self.tokens(),
            "output_tok_s": round(self.tokens() / wall, 1),
            "ttft_mean_ms": round(1e3 * statistics.fmean(ttft), 2) if ttft else None,
            "ttft_p99_ms": round(1e3 * percentile(ttft, 99), 2) if ttft else None,
            "itl_mean_ms": round(1e3 * statistics.fmean(itl), 3) if itl else None,
            "itl_p99_ms": round(1e3 * percentile(itl, 99), 3) if itl else None,
        }


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lognormal_lengths(gen: np.random.Generator, n: int, low: int, high: int) -> np.ndarray:
    """``n`` long-tailed lengths in ``[low, high]``: lognormal with its median at the range's geometric mean."""
    median = math.sqrt(low * high)
    sigma = math.log(high / low) / 4  # +-2 sigma spans the range; the rest is clipped
    return np.clip(np.round(gen.lognormal(math.log(median), sigma, n)), low, high).astype(int)


def make_workload(
    n: int,
    *,
    vocab: int,
    context: int,
    prompt_range: tuple[int, int],
    output_range: tuple[int, int],
    rate: float | None,
    seed: int,
) -> list[Request]:
    """``n`` seeded requests (random token prompts), prompt + output clipped to ``context``; Poisson arrivals at
    ``rate`` requests/s (``None``: all at 0)."""
    gen = np.random.default_rng(seed)
    prompts = lognormal_lengths(gen, n, *prompt_range)
    outputs = lognormal_lengths(gen, n, *output_range)
    arrivals = np.cumsum(gen.exponential(1.0 / rate, n)) if rate else np.zeros(n)
    out = []
    for p, o, a in zip(prompts, outputs, arrivals):
        p = int(min(p, context - 2))
        o = int(max(1, min(o, context - p)))
        out.append(Request(gen.integers(0, vocab, p).tolist(), o, float(a)))
    return out


def distinct_prompts(n: int, length: int, output: int, vocab: int, seed: int) -> list[Request]:
    gen = np.random.default_rng(seed)
    return [Request(gen.integers(0, vocab, length).tolist(), output) for _ in range(n)]


def build_model(preset: str, device: torch.device, dtype: torch.dtype) -> Any:
    return GPT.build(preset_config(preset), seed=0, device=device).to(dtype).eval()


def make_engine(model: Any, args: argparse.Namespace, *, prefix_caching: bool, tokenizer: Any = None) -> LLMEngine:
    """The engine every section uses: ``args.max_seqs`` sequences; a KV cache of ``args.kv_gib`` GiB on CUDA (two
    engines live at once in ``prefix``), else blocks for every sequence at ``args.context``."""
    graphs = next(model.parameters()).device.type == "cuda"
    return LLMEngine(
        model,
        tokenizer=tokenizer,
        block_size=BLOCK,
        num_blocks=None if graphs else args.max_seqs * math.ceil(args.context / BLOCK) + 1,
        memory_bytes=int(args.kv_gib * 2**30) if graphs else None,
        max_num_seqs=args.max_seqs,
        max_num_batched_tokens=max(args.batched_tokens, args.context),
        max_model_len=args.context,
        enable_prefix_caching=prefix_caching,
        cuda_graphs=graphs,
        overlap_decode=graphs and args.overlap_decode,
    )


def free(model: Any) -> None:
    """Let deleted engines' caches and CUDA graphs go (they hold reference cycles) before the next is built."""
    gc.collect()
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.empty_cache()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_engine(
    engine: LLMEngine, requests: Sequence[Request], *, honor_arrivals: bool = True, concurrency: int | None = None
) -> Trace:
    """Drive ``engine`` over ``requests``, each added at its arrival (``honor_arrivals``; else all at the start)
    while fewer than ``concurrency`` are live (``None``: no limit; a request waiting for room arrives when it is
    added, as a client's next request does), stamping every token with the host time after the step that produced
    it (a step ends with its tokens on the host: no sync needed)."""
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival if honor_arrivals else 0.0)
    room = concurrency if concurrency is not None else len(requests)
    trace = Trace(start=time.perf_counter())
    nxt, live = 0, 0
    while nxt < len(order) or engine.has_unfinished():
        now = time.perf_counter()
        while nxt < len(order) and live < room:
            r = requests[order[nxt]]
            due = trace.start + (r.arrival if honor_arrivals else 0.0)
            if due > now:
                break
            rid = engine.add_request(r.prompt, greedy(r.max_tokens))
            trace.arrivals[rid], trace.stamps[rid] = (due if concurrency is None else now), []
            nxt, live = nxt + 1, live + 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, trace.start + requests[order[nxt]].arrival - time.perf_counter()))
            continue
        outs = engine.step()
        stamp = time.perf_counter()
        for out in outs:
            trace.stamps[out.request_id] += [stamp] * len(out.new_token_ids)
            live -= out.finished
    trace.end = time.perf_counter()
    return trace


def rotated(candidates: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """``rotated_rounds`` over the candidates; any failure fails the section (its message names the candidate)."""
    results, errors = rotated_rounds(candidates, repeats)
    if errors:
        name, err = next(iter(errors.items()))
        raise RuntimeError(f"{name}: {err}")
    return results


# ----- section 1: workload -----


def hf_model(model: Any, context: int) -> Any:
    """``transformers``' Llama on ``model``'s weights (``bench_decode.HFDecode``'s conversion)."""
    from bench_decode import HFDecode  # this script's folder is on sys.path when it runs

    return HFDecode(model, 1, 1, context - 1).hf


def run_hf(hf: Any, requests: Sequence[Request], batch: int, device: torch.device) -> dict[str, Any]:
    """``generate`` in fixed batches of ``batch`` (padded left, greedy, the batch's longest output): output tokens/s
    (the tokens the requests asked for) and the batches' wall times."""
    walls, begin = [], time.perf_counter()
    for i in range(0, len(requests), batch):
        chunk = requests[i : i + batch]
        width = max(len(r.prompt) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(chunk):
            ids[row, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[row, width - len(r.prompt) :] = 1
        new = max(r.max_tokens for r in chunk)
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            hf.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        sync(device)
        walls.append(time.perf_counter() - start)
    wall = time.perf_counter() - begin
    tokens = sum(r.max_tokens for r in requests)
    return {
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "output_tok_s": round(tokens / wall, 1),
        "batch_wall_mean_ms": round(1e3 * statistics.fmean(walls), 1),
        "batch_wall_p99_ms": round(1e3 * percentile(walls, 99), 1),
        "note": "HF: no per-request TTFT/ITL from generate; batch wall times instead",
    }


def section_workload(model: Any, args: argparse.Namespace, lines: list[dict[str, Any]], table: list[str]) -> None:
    device = next(model.parameters()).device
    requests = make_workload(
        args.requests,
        vocab=model.config.vocab_size,
        context=args.context,
        prompt_range=args.prompt_range,
        output_range=args.output_range,
        rate=args.rate,
        seed=args.seed,
    )
    arrival = f"poisson {args.rate}/s" if args.rate else "all at once"
    common = {"section": "workload", "preset": args.preset, "requests": len(requests), "arrival": arrival}
    engine = make_engine(model, args, prefix_caching=True)
    warm = make_workload(
        min(8, args.requests),
        vocab=model.config.vocab_size,
        context=args.context,
        prompt_range=args.prompt_range,
        output_range=(2, 4),
        rate=None,
        seed=args.seed + 1,
    )
    run_engine(engine, warm)  # warm-up (kernels, allocator); other prompts: no cache hits on the measured ones
    ours = run_engine(engine, requests).summary()
    emit(lines, {**common, "candidate": "engine", **ours, **args.meta})
    table.append(
        f"| workload | {args.preset} | engine, {arrival} | {ours['output_tok_s']:,.0f} tok/s | TTFT mean/p99 "
        f"{ours['ttft_mean_ms']:.1f} / {ours['ttft_p99_ms']:.1f} ms, ITL mean/p99 {ours['itl_mean_ms']:.2f} / "
        f"{ours['itl_p99_ms']:.2f} ms |"
    )
    del engine
    free(model)
    if args.hf_batch and importlib.util.find_spec("transformers") is not None:
        hf = hf_model(model, args.context)
        run_hf(hf, warm[: min(2, len(warm))], args.hf_batch, device)  # warm-up
        theirs = run_hf(hf, requests, args.hf_batch, device)
        emit(
            lines,
            {**common, "candidate": f"hf-generate-b{args.hf_batch}", "arrival": "all at once", **theirs, **args.meta},
        )
        table.append(
            f"| workload | {args.preset} | hf generate, batch {args.hf_batch}, all at once | "
            f"{theirs['output_tok_s']:,.0f} tok/s | TTFT/ITL n/a; batch wall mean/p99 "
            f"{theirs['batch_wall_mean_ms']:.0f} / {theirs['batch_wall_p99_ms']:.0f} ms |"
        )


# ----- section 2: prefix -----


def first_token_ms(engine: LLMEngine, prompt: list[int]) -> float:
    """Milliseconds from adding ``prompt`` (one output token) to its token."""
    begin = time.perf_counter()
    engine.add_request(prompt, greedy(1))
    while engine.has_unfinished():
        engine.step()
    return (time.perf_counter() - begin) * 1e3


def section_prefix(model: Any, args: argparse.Namespace, lines: list[dict[str, Any]], table: list[str]) -> None:
    vocab = model.config.vocab_size
    prefix_len = min(args.prefix, args.context - args.suffix - 2)
    engine = make_engine(model, args, prefix_caching=True)
    gen = np.random.default_rng(args.seed)
    miss, hit = [], []
    for r in range(args.repeats + 1):  # the first repeat warms up
        prefix = gen.integers(0, vocab, prefix_len).tolist()
        a, b = (prefix + gen.integers(0, vocab, args.suffix).tolist() for _ in range(2))
        t_miss, t_hit = first_token_ms(engine, a), first_token_ms(engine, b)
        if r:
            miss.append(t_miss)
            hit.append(t_hit)
    del engine
    free(model)
    m, h = statistics.median(miss), statistics.median(hit)
    row = {
        "section": "prefix",
        "preset": args.preset,
        "candidate": "ttft",
        "prefix": prefix_len,
        "suffix": args.suffix,
        "miss_ms": round(m, 3),
        "hit_ms": round(h, 3),
        "speedup": round(m / h, 2),
        "goal_speedup": 5.0,
        "repeats": args.repeats,
    }
    emit(lines, {**row, **args.meta})
    table.append(
        f"| prefix | {args.preset} | TTFT miss / hit ({prefix_len}+{args.suffix}) | {m:.2f} / {h:.2f} ms "
        f"| {m / h:.1f}x (goal >= 5x) |"
    )

    engines = {flag: make_engine(model, args, prefix_caching=flag) for flag in (True, False)}
    rounds = {True: 0, False: 0}

    def run(flag: bool) -> float:
        rounds[flag] += 1  # the same new prompts for both in a round: all distinct, never cached before
        reqs = distinct_prompts(args.distinct, args.distinct_prompt, args.distinct_output, vocab, 1000 + rounds[flag])
        return float(run_engine(engines[flag], reqs, honor_arrivals=False).summary()["output_tok_s"])

    results = rotated({"on": lambda: run(True), "off": lambda: run(False)}, args.repeats)
    on, off = statistics.median(results["on"]), statistics.median(results["off"])
    cost = {
        "section": "prefix",
        "preset": args.preset,
        "candidate": "zero-hit-cost",
        "requests": args.distinct,
        "prompt": args.distinct_prompt,
        "output": args.distinct_output,
        "on_tok_s": on,
        "off_tok_s": off,
        "on_over_off": round(on / off, 4),
        "on_rounds": results["on"],
        "off_rounds": results["off"],
    }
    emit(lines, {**cost, **args.meta})
    table.append(
        f"| prefix | {args.preset} | 0% hit: caching on / off (tok/s) | {on:,.0f} / {off:,.0f} | {on / off:.3f} |"
    )


# ----- section 3: server -----


def server_engine(preset: str, device: str, dtype: str, args: argparse.Namespace, threads: int) -> LLMEngine:
    """The server section's engine (module level: an engine process builds it from this by name), with ``threads``
    intra-op threads as the engine it is compared with (a spawned process starts with one per core)."""
    torch.set_num_threads(threads)
    model = build_model(preset, torch.device(device), getattr(torch, dtype))
    return make_engine(model, args, prefix_caching=False, tokenizer=IdTokenizer(model.config.vocab_size))


def server_stack(http: str, loop: str) -> str:
    """What uvicorn runs for ``http``/``loop`` (``auto`` resolved as uvicorn resolves it: httptools and uvloop when
    they import)."""
    if http == "auto":
        http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    if loop == "auto":
        loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"{http}+{loop}"


@contextmanager
def live_server(app: Any, http: str = "auto", loop: str = "auto") -> Iterator[str]:
    """``app`` under uvicorn on 127.0.0.1 at a free port, in a thread, until the block ends; yields its URL. ``http``
    and ``loop``: uvicorn's protocol and event loop (``auto``: httptools and uvloop where installed, as ``mcore
    serve`` runs)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, http=http, loop=loop)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the benchmark's server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
        app.state.engine_loop.stop()


async def stream_all(url: str, requests: Sequence[tuple[list[int], int]], clients: int) -> dict[str, Any]:
    """Every ``(prompt, max_tokens)`` through ``clients`` concurrent streaming clients, each a keep-alive HTTP/1.1
    connection: tokens (from each stream's usage) per second, the clients' median time to the first chunk, and SSE
    events per token. A lean client (asyncio streams, the chunked body read as is; only the usage and error events
    parsed), so that the load generator costs little of the CPU it shares with the server (httpx costs ~150 us of
    Python per event)."""
    host, _, port = url.removeprefix("http://").partition(":")
    queue = list(reversed(requests))
    tokens, events, ttft = [0], [0], []

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while queue:
                prompt, max_tokens = queue.pop()
                body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                                   "ignore_eos": True, "stream": True,
                                   "stream_options": {"include_usage": True}}).encode()  # fmt: skip
                head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                begin, first = time.perf_counter(), None
                status = await reader.readuntil(b"\r\n\r\n")
                if not status.startswith(b"HTTP/1.1 200") or b"chunked" not in status.lower():
                    raise RuntimeError(f"server answered {status[:200]!r}")
                data = []
                while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):  # the last chunk is empty
                    data.append((await reader.readexactly(size + 2))[:-2])
                    if first is None:
                        first = time.perf_counter() - begin
                await reader.readexactly(2)
                done = b"".join(data).split(b"\n\n")
                events[0] += len(done) - 1
                for event in done:
                    if event.startswith(b'data: {"error"'):
                        raise RuntimeError(f"server error: {event[6:].decode()}")
                    if b'"usage"' in event:
                        tokens[0] += int(json.loads(event[6:])["usage"]["completion_tokens"])
                if first is not None:
                    ttft.append(first)
        finally:
            writer.close()

    begin = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - begin
    return {
        "tokens": tokens[0],
        "wall_s": wall,
        "tok_s": tokens[0] / wall,
        "ttft_ms": 1e3 * statistics.median(ttft),
        "events_per_token": events[0] / max(1, tokens[0]),
    }


def client_process(url: str, requests: Sequence[tuple[list[int], int]], clients: int) -> dict[str, Any]:
    """``stream_all`` in a process of its own (a worker of ``section_server``): real clients do not share the
    server's interpreter lock."""
    return asyncio.run(stream_all(url, requests, clients))


def section_server(model: Any, args: argparse.Namespace, lines: list[dict[str, Any]], table: list[str]) -> None:
    from mcore_inference.server.app import build_app

    device, vocab = next(model.parameters()).device, model.config.vocab_size
    requests = distinct_prompts(args.server_requests, args.server_prompt, args.server_output, vocab, args.seed)
    if args.server_mode == "process":
        from mcore_inference.server.engine_process import EngineProcess

        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        factory = functools.partial(server_engine, args.preset, str(device), dtype, args, torch.get_num_threads())
        app = build_app(EngineProcess(factory, start_timeout=600), model_name="bench")
        local: LLMEngine | None = make_engine(model, args, prefix_caching=False, tokenizer=IdTokenizer(vocab))
    else:
        app = build_app(
            make_engine(model, args, prefix_caching=False, tokenizer=IdTokenizer(vocab)), model_name="bench"
        )
        local = None
    work = [(r.prompt, r.max_tokens) for r in requests]
    spawn = multiprocessing.get_context("spawn")
    with (
        live_server(app, args.http, args.loop) as url,
        concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as clients,
    ):
        loop = app.state.engine_loop
        events: list[float] = []

        def direct() -> float:
            if local is not None:  # process mode: an engine of the same build, here (the served one is idle)
                trace = run_engine(local, requests, honor_arrivals=False, concurrency=args.clients)
                return float(trace.summary()["output_tok_s"])
            # thread mode: the served engine itself, in its own thread between its steps, without HTTP
            trace = loop.call(
                lambda eng: run_engine(eng, requests, honor_arrivals=False, concurrency=args.clients)
            ).result()
            return float(trace.summary()["output_tok_s"])

        def served() -> float:
            out = clients.submit(client_process, url, work, args.clients).result()
            events.append(out["events_per_token"])
            return float(out["tok_s"])

        clients.submit(client_process, url, work[:1], 1).result()  # starts the client process (imports)

        results = rotated({"engine": direct, "server": served}, args.repeats)
    ours, http = statistics.median(results["engine"]), statistics.median(results["server"])
    emit(
        lines,
        {
            **args.meta,
            "section": "server",
            "preset": args.preset,
            "mode": args.server_mode,
            "uvicorn": server_stack(args.http, args.loop),
            "clients": args.clients,
            "requests": len(requests),
            "prompt": args.server_prompt,
            "output": args.server_output,
            "engine_tok_s": round(ours, 1),
            "server_tok_s": round(http, 1),
            "server_over_engine": round(http / ours, 4),
            "goal": ">= 0.95",
            "engine_rounds": [round(x, 1) for x in results["engine"]],
            "server_rounds": [round(x, 1) for x in results["server"]],
            "sse_events_per_token": round(statistics.median(events), 3),
        },
    )
    table.append(
        f"| server | {args.preset} | {args.clients} streaming clients ({args.server_mode}) vs engine "
        f"(tok/s) | {http:,.0f} / {ours:,.0f} | {http / ours:.3f} (goal >= 0.95) |"
    )


# ----- main -----


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"bench_serving: {message}", file=sys.stderr)
        raise SystemExit(2)


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("..")
    try:
        lo, hi = int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"range {text!r}: give LOW..HIGH, integers") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"range {text!r}: need 1 <= LOW <= HIGH")
    return lo, hi


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS))
    p.add_argument("--preset", default="bench-0.9b")
    p.add_argument("--context", type=int, default=None, help="max_model_len (default: the preset's, at most 4096)")
    p.add_argument("--max-seqs", type=int, default=128)
    p.add_argument("--kv-gib", type=float, default=16.0, help="KV cache per engine on CUDA, GiB")
    p.add_argument("--batched-tokens", type=int, default=4096, help="max_num_batched_tokens")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt-range", type=_range, default=(32, 2048))
    p.add_argument("--output-range", type=_range, default=(16, 512))
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default: all at once)")
    p.add_argument("--hf-batch", type=int, default=16, help="HF generate's batch (0: no HF)")
    p.add_argument("--prefix", type=int, default=2048)
    p.add_argument("--suffix", type=int, default=32)
    p.add_argument("--distinct", type=int, default=64, help="requests of the 0%%-hit workload")
    p.add_argument("--distinct-prompt", type=int, default=512)
    p.add_argument("--distinct-output", type=int, default=64)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--server-requests", type=int, default=128)
    p.add_argument("--server-prompt", type=int, default=256)
    p.add_argument("--server-output", type=int, default=256)
    p.add_argument("--server-mode", choices=("process", "thread"), default="process", help="where the engine runs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--overlap-decode", action="store_true", help="engines with overlap_decode (CUDA graphs only)")
    p.add_argument("--http", choices=("auto", "h11", "httptools"), default="auto", help="uvicorn's HTTP protocol")
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="uvicorn's event loop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny preset, fp32, short (flags given win)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:  # its values are defaults: a flag given explicitly wins
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
        torch.set_num_threads(1)  # a shared CPU: no intra-op team waiting on busy cores
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"--sections {bad[0]!r}: allowed {', '.join(SECTIONS)}")
    try:
        cfg = preset_config(args.preset)
    except KeyError:
        p.error(f"--preset {args.preset!r}: not a known preset")
    positive = (
        "max_seqs",
        "batched_tokens",
        "requests",
        "prefix",
        "suffix",
        "distinct",
        "distinct_prompt",
        "distinct_output",
        "clients",
        "server_requests",
        "server_prompt",
        "server_output",
        "repeats",
    )
    for key in positive:
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} = {getattr(args, key)}: must be >= 1")
    if not args.kv_gib > 0:
        p.error(f"--kv-gib = {args.kv_gib}: must be > 0")
    if args.hf_batch < 0:
        p.error(f"--hf-batch = {args.hf_batch}: must be >= 0 (0: no HF)")
    if args.rate is not None and not args.rate > 0:
        p.error(f"--rate = {args.rate}: must be > 0 requests/s")
    limit = int(cfg.max_position_embeddings)
    if args.context is None:
        args.context = min(limit, 4096)
    if not 16 <= args.context <= limit:
        p.error(f"--context = {args.context}: allowed 16..{limit} (the preset's max_position_embeddings)")
    if args.server_prompt + args.server_output > args.context or args.distinct_prompt + args.distinct_output > (
        args.context
    ):
        p.error(f"--server/--distinct prompt + output: must fit --context = {args.context}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    lines: list[dict[str, Any]] = []
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "quick")}
    header = run_header(device, dtype, date=date, **settings)
    emit(lines, header)
    args.meta = {"card": header["device"], "torch": header["torch"], "date": date}  # on every result line
    model = build_model(args.preset, device, dtype)
    table: list[str] = []
    run = {"workload": section_workload, "prefix": section_prefix, "server": section_server}
    failed = 0
    for name in args.sections:
        try:
            run[name](model, args, lines, table)
        except Exception as exc:  # one section's failure must not lose the others
            failed += 1
            traceback.print_exc()
            emit(lines, {**args.meta, "section": name, "preset": args.preset, "error": f"{type(exc).__name__}: {exc}"})
            table.append(f"| {name} | {args.preset} | FAILED: {type(exc).__name__}: {exc} | | |")
        gc.collect()  # the section's engines (CUDA graphs, caches) go before the next one's
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_lines(args.out, lines)
    print("| section | preset | what | value | ratio / latency |")
    print("|---|---|---|---|---|")
    print("\n".join(table))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
