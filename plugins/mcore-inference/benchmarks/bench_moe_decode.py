"""Decode speed of a MoE model through the engine's MoE inference path against its training-path MoE layer.

Why it exists: issue 21. Under an inference cache (``BlockContext.kv_cache`` set: every engine call) the
mcore-moe block runs ``mcore_moe.inference``: dropless routing, the ``allgatherv`` dispatcher with a fixed
buffer, static-shape grouped GEMMs, no host sync, so the decode step can be a CUDA graph. This measures what
that buys over the training path (the routing-sized dispatch, host-side group sizes) on the same weights.

The model: ``moe-bench`` (mcore-moe's preset: 16 layers, each MoE of 64 experts top-8 plus a shared expert;
about 6.9B parameters) with random weights in bf16, ``--prompt`` random tokens per request, ``--output``
tokens generated (greedy, no stop), at each batch size of ``--batches``. Candidates:

* ``engine+graphs``: ``LLM(model, cuda_graphs=True)``: the inference path, one graph at the batch size (CUDA);
* ``engine+graphs-unpacked``: the same on a copy of the model whose experts' gate and up are separate tensors the
  engine does not pack (each call concatenates every expert's gate and up weights: what ran before
  ``GroupedSwiGLU`` kept them packed; CUDA);
* ``engine``: the same engine decoding eagerly (``cuda_graphs=False``): the inference path without graphs;
* ``engine-training-moe``: the eager engine with every MoE block handed its context without the cache (and with
  an aux-loss collector), so it takes the training path; attention still reads the engine's paged cache. There
  is no switch for this in the engine: the benchmark sets an instance ``forward`` on the blocks for the calls
  of this candidate only, and removes it after.

A row gives decode milliseconds per step (the prefill step excluded), decode tokens/s and the ratio of its
tokens/s to ``engine-training-moe``'s at the same batch. Candidates run in rounds rotated each round
(``mcore_testing.bench``'s method); median/min/max over rounds. Output: a header line, JSON lines (stdout and
``--out``) with card, torch version and date, then Markdown rows. A failing candidate prints its error (a JSON
line with ``error``) and the others go on. ``--quick``: a CPU smoke run on a tiny ``moe-bench`` (2 layers of 16
experts), fp32, no graphs.

    python plugins/mcore-inference/benchmarks/bench_moe_decode.py --out moe_decode.jsonl
    python plugins/mcore-inference/benchmarks/bench_moe_decode.py --quick
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import statistics
from collections.abc import Callable
from typing import Any, NoReturn

import torch
from bench_decode import EngineDecode  # this script's folder is on sys.path when it runs
from torch import nn

from mcore.config import resolve_model
from mcore.plugins import load_plugins
from mcore.presets import deep_merge
from mcore.protocols.block import AuxLosses, BlockContext
from mcore_testing.bench import emit, rotated_rounds, run_header, timing_row, write_lines

#: ``--quick``'s overrides of ``moe-bench`` (merged key by key).
QUICK = dict(
    vocab_size=96,
    hidden_size=64,
    num_layers=2,
    attention=dict(num_heads=4, num_kv_heads=2),
    moe=dict(num_experts=16, moe_ffn_hidden_size=32),
)


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def build_model(preset: str, overrides: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``preset`` with ``overrides``, resolved and built through the core with the installed plugins (random)."""
    host = load_plugins()
    selection = resolve_model({"preset": preset, **overrides}, host)
    factory = selection.implementation.load()
    model = factory.build(selection.config, seed=0, device=device, block_lookup=lambda b: host.load("block", b))
    return model.to(dtype).eval()


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's MoE blocks (the modules whose class is mcore-moe's ``MoE``)."""
    return [m for m in model.modules() if type(m).__name__ == "MoE" and type(m).__module__.startswith("mcore_moe")]


def unpack_experts(model: nn.Module) -> None:
    """Give each MoE block's experts' ``gate`` and ``up`` storage of their own: mcore-moe builds them packed in one
    ``(E, 2, F, H)`` buffer, so this is the layout before packing (each call concatenates them)."""
    for block in moe_blocks(model):
        experts = block.experts
        with torch.no_grad():
            experts.gate.data, experts.up.data = experts.gate.detach().clone(), experts.up.detach().clone()


class TrainingPath:
    """While active, each MoE block's forward gets its context without the cache (and with an aux-loss collector
    when it has none): the block's training path inside the engine's calls."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        self.blocks = blocks

    def __enter__(self) -> TrainingPath:
        for block in self.blocks:
            forward = type(block).forward

            def training(
                hidden: torch.Tensor, ctx: BlockContext | None = None, _b: nn.Module = block, _f: Any = forward
            ) -> torch.Tensor:
                if ctx is not None and ctx.kv_cache is not None:
                    ctx = dataclasses.replace(ctx, kv_cache=None, aux_losses=ctx.aux_losses or AuxLosses())
                return _f(_b, hidden, ctx)

            block.forward = training  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        for block in self.blocks:
            del block.forward  # the class's forward again


class WithTrainingPath:
    """``run`` with the MoE blocks on their training path for the call."""

    def __init__(self, run: EngineDecode, blocks: list[nn.Module]) -> None:
        self.run, self.blocks = run, blocks

    def __call__(self) -> float:
        with TrainingPath(self.blocks):
            return self.run()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="bench_moe_decode", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="moe-bench")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes (default 1 32; --quick: 1 4)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: a tiny moe-bench, fp32, short")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt, args.output, args.repeats = 8, 6, 1
    if args.batches is None:
        args.batches = [1, 4] if args.quick else [1, 32]
    bad = [b for b in args.batches if b < 1]
    if bad:
        parser.error(f"--batches = {bad[0]}: must be >= 1")
    for name, value, low in (("prompt", args.prompt, 1), ("output", args.output, 2), ("repeats", args.repeats, 1)):
        if value < low:
            parser.error(f"--{name} = {value}: must be >= {low}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    graphs = device.type == "cuda"
    torch.manual_seed(0)
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    lines: list[dict[str, Any]] = []
    header = run_header(device, dtype, preset=args.preset, prompt=args.prompt, output=args.output, date=stamp)
    emit(lines, header)
    common = {"card": header["device"], "torch": header["torch"], "date": stamp, "preset": args.preset}
    model = build_model(args.preset, deep_merge(QUICK, {}) if args.quick else {}, device, dtype)
    blocks = moe_blocks(model)
    if not blocks:
        raise SystemExit(f"bench_moe_decode: --preset = {args.preset!r} has no mcore-moe MoE layers")
    unpacked = None
    if graphs:  # a copy whose experts' gate and up are separate tensors, which the engine does not pack
        unpacked = copy.deepcopy(model)
        unpack_experts(unpacked)
        unpacked.pack_for_inference = lambda: 0  # type: ignore[assignment,method-assign]
    table: list[str] = []
    for batch in args.batches:
        candidates: dict[str, Callable[[], float]] = {}
        errors: dict[str, str] = {}
        makers: list[tuple[str, Callable[..., Callable[[], float]]]] = []
        if graphs:
            makers.append(("engine+graphs", lambda b=batch: EngineDecode(model, b, args.prompt, args.output, True)))
            makers.append(
                (
                    "engine+graphs-unpacked",
                    lambda b=batch: EngineDecode(unpacked, b, args.prompt, args.output, True),
                )
            )
        makers.append(("engine", lambda b=batch: EngineDecode(model, b, args.prompt, args.output, False)))
        makers.append(
            (
                "engine-training-moe",
                lambda b=batch: WithTrainingPath(EngineDecode(model, b, args.prompt, args.output, False), blocks),
            )
        )
        for name, make in makers:
            try:
                candidates[name] = make()
            except Exception as err:
                errors[name] = repr(err)
        times, failed = rotated_rounds(candidates, args.repeats)
        errors |= failed
        base = times.get("engine-training-moe")
        base_tok_s = batch * 1e3 / statistics.median(base) if base else None
        for name, error in errors.items():
            emit(lines, {**common, "batch": batch, "candidate": name, "error": error})
            table.append(f"| {args.preset} | {batch} | {name} | failed | - | - |")
        for name, ms in times.items():
            row = timing_row(ms)
            tok_s = batch * 1e3 / row["median_ms"]
            ratio = round(tok_s / base_tok_s, 3) if base_tok_s else None
            result = {**common, "batch": batch, "candidate": name, **row, "decode_tok_s": round(tok_s, 1)}
            emit(lines, result | {"vs_training_moe": ratio})
            table.append(
                f"| {args.preset} | {batch} | {name} | {row['median_ms']:.3f} | {tok_s:,.1f} | "
                + (f"{ratio:.2f}x |" if ratio is not None else "- |")
            )
        del candidates
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_lines(args.out, lines)
    print("| preset | batch | candidate | ms/step | decode tok/s | vs training-path MoE |")
    print("|---|---|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
