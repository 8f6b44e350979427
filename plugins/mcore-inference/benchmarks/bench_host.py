"""Host time of the inference engine's decode steps, split into phases (issue 20).

Why it exists: on a GPU a decode step of the engine costs its captured graph's replay plus the host work around
it (scheduling, cache bookkeeping, the step's inputs, sampling launches, ``tolist``, appending tokens,
detokenisation, prefix-cache naming, outputs), during which the device idles. This script measures that host
work on any device: it builds an ``LLMEngine`` over ``--preset`` (default ``tiny``; random weights, fp32 on the
CPU, bf16 on CUDA), adds ``--batch`` greedy requests of ``--prompt`` random token ids, runs the prefill steps,
then times ``--steps`` decode steps, with the engine's parts wrapped in ``time.perf_counter_ns`` timers:

* ``schedule``: ``Scheduler.schedule``; ``cache.schedule``: ``PagedKVCache.schedule``;
* ``inputs``: the static decoder's host side (``begin_static_decode`` and the buffer fill) or, eager, the
  building of the call's context; ``model``: the model call itself, waited for on CUDA (its device time, a graph
  replay with ``cuda_graphs``; real compute on the CPU), reported apart from the host work;
* ``sample``: ``Sampler.sample``; ``append``: the ``_append`` calls (detokenisation included);
* ``cache_prefix``: ``PagedKVCache.cache_prefix``; ``output``: ``RequestOutput`` building;
* ``other``: the rest of ``step`` (token lists, ``tolist``, loops), the step's total less the phases above.

The headline host time comes from runs that time the model call only (the phase timers cost host time of their
own, about a microsecond a call: they land in ``other``); the phases from runs with every timer on.

``--detok`` gives the engine a byte tokenizer (the model's vocabulary is 257), so every token is detokenised.
``--eager`` turns the static decoder off. ``--profile`` runs the decode steps under ``cProfile`` instead and
prints the top 25 functions by cumulative time, the model's forward excluded (its callees are not listed).

    python plugins/mcore-inference/benchmarks/bench_host.py --batch 1 32
    python plugins/mcore-inference/benchmarks/bench_host.py --batch 32 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from mcore_inference import engine as engine_module
from mcore_inference.engine import LLMEngine
from mcore_inference.sampling import SamplingParams

from mcore_models.gpt import GPT
from mcore_models.presets import preset_config

PHASES = ("schedule", "cache.schedule", "inputs", "model", "sample", "append", "cache_prefix", "output", "other")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Nanoseconds per phase, summed over the timed steps (nested timers are not subtracted: none nest)."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = defaultdict(int)
        self.on = False

    def wrap(self, name: str, fn: Callable[..., Any], device: torch.device | None = None) -> Callable[..., Any]:
        """``fn`` timed into phase ``name`` (with ``device``: waiting for the device's work before the clock stops)."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            begin = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                if device is not None:
                    sync(device)
                self.ns[name] += time.perf_counter_ns() - begin

        return timed


def build(args: argparse.Namespace, batch: int, device: torch.device) -> LLMEngine:
    overrides = {"vocab_size": 257} if args.detok else {}
    model = GPT.build(preset_config(args.preset, **overrides), seed=0, device=device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)  # what serving runs
    tokenizer = None
    if args.detok:
        from mcore.data.tokenizer import ByteTokenizer

        tokenizer = ByteTokenizer()
    total = args.prompt + args.output
    return LLMEngine(
        model,
        tokenizer=tokenizer,
        block_size=16,
        num_blocks=batch * math.ceil(total / 16) + 1,
        max_num_seqs=batch,
        max_num_batched_tokens=max(batch * args.prompt, 256),
        max_model_len=total,
        enable_prefix_caching=not args.no_prefix_caching,
        static_decode=not args.eager,
        cuda_graphs=device.type == "cuda" and not args.eager,
        graph_batch_sizes=(batch,),
    )


def instrument(engine: LLMEngine, timer: PhaseTimer, phases: bool) -> None:
    """Wrap the engine's parts (instance attributes shadow the methods; ``_Request.output`` is the class's);
    without ``phases`` the model call and the inputs only (the wrappers cost host time of their own). The model
    call waits for the device (CUDA): "model" is its device time (a graph replay), the rest is host work. With
    the static decoder it is ``StaticDecoder.run`` less its inputs (``decode`` subtracts them)."""
    decoder, device = engine.decoder, engine.device
    if decoder is not None:
        decoder.run = timer.wrap("run", decoder.run, device)  # type: ignore[method-assign]
        decoder.cache.begin_static_decode = timer.wrap("inputs", decoder.cache.begin_static_decode)  # type: ignore[method-assign]
        decoder.buffers.fill = timer.wrap("inputs", decoder.buffers.fill)  # type: ignore[method-assign]
    else:
        engine.model.forward = timer.wrap("model", engine.model.forward, device)  # type: ignore[method-assign]
        engine._context = timer.wrap("inputs", engine._context)  # type: ignore[method-assign]
    if not phases:
        return
    engine.scheduler.schedule = timer.wrap("schedule", engine.scheduler.schedule)  # type: ignore[method-assign]
    engine.cache.schedule = timer.wrap("cache.schedule", engine.cache.schedule)  # type: ignore[method-assign]
    engine.cache.cache_prefix = timer.wrap("cache_prefix", engine.cache.cache_prefix)  # type: ignore[method-assign]
    engine.sampler.sample = timer.wrap("sample", engine.sampler.sample)  # type: ignore[method-assign]
    engine._append = timer.wrap("append", engine._append)  # type: ignore[method-assign]


def decode(args: argparse.Namespace, batch: int, device: torch.device, mode: str) -> dict[str, float]:
    """Per-step microseconds over ``args.steps`` decode steps: of each phase (``mode`` "phases"), or of the model
    call only ("clean": the rest is host time without the timers' own), or a ``cProfile`` ("profile")."""
    engine = build(args, batch, device)
    timer = PhaseTimer()
    if mode != "profile":
        instrument(engine, timer, phases=mode == "phases")
    output_cls: Any = engine_module._Request
    original_output = output_cls.output
    if mode == "phases":
        output_cls.output = timer.wrap("output", original_output)
    gen = torch.Generator().manual_seed(0)
    vocab = 257 if args.detok else 512
    params = SamplingParams(max_tokens=args.output, temperature=0.0, ignore_eos=True)
    try:
        for _ in range(batch):
            engine.add_request(torch.randint(0, vocab, (args.prompt,), generator=gen).tolist(), params)
        while any(s.num_pending > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()  # prefill
        for _ in range(args.warmup):
            engine.step()
        steps = min(args.steps, args.output - args.warmup - 2)
        sync(device)
        totals: list[int] = []
        profiler = cProfile.Profile() if mode == "profile" else None
        timer.on = profiler is None
        if profiler is not None:
            profiler.enable()
        for _ in range(steps):
            begin = time.perf_counter_ns()
            engine.step()
            sync(device)
            totals.append(time.perf_counter_ns() - begin)
        if profiler is not None:
            profiler.disable()
            print_profile(profiler)
        timer.on = False
    finally:
        output_cls.output = original_output
    if "run" in timer.ns:  # the static decoder's call less its inputs
        timer.ns["model"] = timer.ns.pop("run") - timer.ns["inputs"]
    us = {name: timer.ns.get(name, 0) / steps / 1e3 for name in PHASES if name != "other"}
    total = sum(totals) / steps / 1e3
    us["other"] = total - sum(us.values())
    us["step"] = total
    us["step_median"] = statistics.median(totals) / 1e3
    us["host"] = total - us["model"]
    return us


def print_profile(profiler: cProfile.Profile) -> None:
    """The top 25 functions by cumulative time; the model's forward and everything under it left out."""
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("cumulative")
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    under: set[Any] = {f for f in table if f[2] == "forward"}
    grew = True
    while grew:  # every function called only from the forward's subtree is in it
        grew = False
        for func, (_, _, _, _, callers) in table.items():
            if func not in under and callers and all(c in under for c in callers):
                under.add(func)
                grew = True
    rows = []
    for func in stats.fcn_list:  # type: ignore[attr-defined]
        if func in under:
            continue
        rows.append(func)
        if len(rows) == 25:
            break
    print(f"{'ncalls':>8} {'tottime ms':>11} {'cumtime ms':>11}  function")
    for func in rows:
        _, nc, tt, ct, _ = table[func]
        print(f"{nc:>8} {tt * 1e3:>11.2f} {ct * 1e3:>11.2f}  {func[0].split('/')[-1]}:{func[1]}({func[2]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--preset", default="tiny", help="model preset (random weights; bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="decode steps timed (at most output - warmup - 2)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="runs per batch size; the best run's phases")
    parser.add_argument("--detok", action="store_true", help="a byte tokenizer: every token is detokenised")
    parser.add_argument("--eager", action="store_true", help="no static decoder: the eager decode call")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile the decode steps instead")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    for batch in args.batch:
        if args.profile:
            print(f"batch {batch}: cProfile of {args.steps} decode steps")
            decode(args, batch, device, "profile")
            continue
        clean = min((decode(args, batch, device, "clean") for _ in range(args.repeats)), key=lambda r: r["host"])
        best = min((decode(args, batch, device, "phases") for _ in range(args.repeats)), key=lambda r: r["host"])
        label = f"batch {batch:>3} ({'detok' if args.detok else 'ids'}, {'eager' if args.eager else 'static'})"
        print(
            f"{label}: step {clean['step']:.0f} us (median {clean['step_median']:.0f}), model {clean['model']:.0f} "
            f"us, host {clean['host']:.0f} us (with the phase timers: {best['host']:.0f} us)"
        )
        print("   " + "  ".join(f"{name} {best[name]:.1f}" for name in PHASES if name != "model"))


if __name__ == "__main__":
    main()
