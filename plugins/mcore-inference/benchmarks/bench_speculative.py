"""MTP speculative decoding speed: ``LLM(speculative_tokens=k)`` against plain decoding (k = 0) on real text.

Why it exists: issue 21. Speculation only pays if the drafts are accepted often enough to cover the extra work
of a step, so this reports both the measured speedup and the speedup the acceptance allows, in the same run.

The model: a checkpoint trained with MTP depths (``--checkpoint DIR``, an ``mcore train`` run directory; the
recipe is ``mtp_recipe.md``), served in bf16. Prompts: held-out real text, the tail of the ``stdlib`` corpus
``mcore train`` reads by default (``data.source = "stdlib"``: this Python's standard library ``.py`` files in
sorted order; ``data.eval_fraction = 0.02`` of the rows at its end are held out, so the files making up the
last 1% of its bytes are never trained on), ``--prompt`` tokens each through the run's tokenizer. Decoding:
``--output`` tokens per request (no stop), greedy and temperature 1 (seeded per request), at each batch size
of ``--batches``, for k = 0 and each k of ``--k``; CUDA graphs on (``cuda_graphs=True``: plain decode graphs
at k = 0, verification and draft graphs at k >= 1); a configuration whose graphs fail is rerun eagerly
(``graphs: false`` and the error in its row).

Per k >= 1 row:

* ``tok_s``: decode tokens/s (the prefill step excluded), median over rounds;
* ``acceptance``: per draft position, accepted over proposed drafts (the engine's ``spec_stats()``);
  ``mean_accepted``: E[accepted], the mean accepted drafts per verification (``mean_emitted - 1``);
* ``step_cost``: the median time of a step in which every sequence verified ``k`` drafts (one model call over
  ``k + 1`` tokens per sequence, the rejection sampling, then the ``k`` draft forwards of the MTP depths) over
  the median time of a plain decode step of the k = 0 engine at the same batch and temperature, both timed
  step by step in the same run (``verify_ms`` / ``draft_ms`` split it: a diagnostic pass times the draft
  call alone);
* ``allowed_speedup = (1 + mean_accepted) / step_cost``: the speedup the acceptance allows at that step cost;
* ``speedup``: the measured one, ``tok_s`` over the k = 0 ``tok_s``;
* ``efficiency = speedup / allowed_speedup`` (goal >= 85%). It falls short of 1 by what full verification steps
  do not see: steps where a sequence drafts fewer than ``k`` (near ``max_tokens``) or fewer sequences run
  (the batch's tail), host work between steps, and timing noise.

Candidates run in rounds, rotated each round (as ``mcore_testing.bench`` does); a row gives median/min/max
over rounds. Output: a header line, one JSON line per result (stdout and ``--out``), then Markdown rows for
RESULTS.md. A failing candidate prints its error (a JSON line with ``error``) and the others go on.
``--quick``: a CPU smoke run that trains nothing: the ``tiny`` preset with 2 MTP depths, random weights,
fp32, no graphs, a few tokens.

    python plugins/mcore-inference/benchmarks/bench_speculative.py --checkpoint runs/mtp-125m --out spec.jsonl
    python plugins/mcore-inference/benchmarks/bench_speculative.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
from mcore_inference.llm import LLM, load_model
from mcore_inference.sampling import SamplingParams

from mcore.data.sources import source_files
from mcore.data.tokenizer import ByteTokenizer
from mcore_testing.bench import emit, rotated_rounds, run_header, timing_row, write_lines

#: Fraction of the stdlib corpus's bytes, at its end, prompts come from (inside the 2% ``mcore train`` holds out).
HELD_OUT_FRACTION = 0.01


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def held_out_prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens from the last files of the stdlib corpus (one window per file, from
    its start, files taken from the end backwards), inside its held-out tail."""
    files = source_files("stdlib")
    total = sum(f.stat().st_size for f in files)
    tail: list[Path] = []
    size = 0
    for f in reversed(files):
        if size >= HELD_OUT_FRACTION * total and len(tail) >= count:
            break
        tail.append(f)
        size += f.stat().st_size
    prompts: list[list[int]] = []
    for f in tail:
        ids = [int(i) for i in tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"))]
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            return prompts
    raise ValueError(f"--prompt = {length}: the held-out stdlib tail has fewer than {count} files that long")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def snapshot(llm: LLM) -> tuple[int, int, list[int], list[int]]:
    """``(verify_steps, emitted, proposed, accepted)`` of the engine's counters (zeros without speculation)."""
    stats = llm.engine.spec_stats()
    if stats is None:
        return 0, 0, [], []
    return stats.verify_steps, stats.emitted, list(stats.proposed), list(stats.accepted)


class Decode:
    """One engine (``k`` drafts, ``graphs`` or eager) decoding ``prompts`` at a temperature; a call runs them all
    and returns ``{"ms": decode ms, "tokens": decode tokens, "full_ms": [ms of each full step]}``: a full step
    is one where every sequence of the batch verified ``k`` drafts (k = 0: every decode step of the batch)."""

    def __init__(
        self, model: Any, prompts: list[list[int]], k: int, output: int, temperature: float, graphs: bool
    ) -> None:
        batch, total = len(prompts), len(prompts[0]) + output
        self.llm = LLM(
            model,
            num_blocks=batch * math.ceil((total + k + 1) / 16) + 2,
            max_num_seqs=batch,
            max_num_batched_tokens=max(batch * len(prompts[0]), 256),
            max_model_len=total,
            enable_prefix_caching=False,
            seed=0,
            cuda_graphs=graphs,
            graph_batch_sizes=(batch,),
            speculative_tokens=k,
        )
        self.prompts, self.k, self.output = prompts, k, output
        self.params = [
            SamplingParams(
                max_tokens=output, temperature=temperature, seed=None if temperature == 0 else 1000 + i, ignore_eos=True
            )
            for i in range(batch)
        ]
        self.device = next(model.parameters()).device
        self.graph_error: str | None = None  # why CUDA graphs failed (this engine then decodes eagerly)

    def __call__(self) -> dict[str, Any]:
        engine, batch = self.llm.engine, len(self.prompts)
        for p, params in zip(self.prompts, self.params):
            engine.add_request(p, params)
        engine.step()  # the prefill of every prompt: each request's first token (and its first drafts)
        sync(self.device)
        full_ms: list[float] = []
        begin = time.perf_counter()
        while engine.has_unfinished():
            verified, _, proposed, _ = snapshot(self.llm)
            running = len(engine.scheduler.running)
            start = time.perf_counter()
            engine.step()
            sync(self.device)
            ms = (time.perf_counter() - start) * 1e3
            after, _, proposed_after, _ = snapshot(self.llm)
            if self.k == 0:
                full = running == batch
            else:
                full = after - verified == batch and proposed_after[self.k - 1] - proposed[self.k - 1] == batch
            if full:
                full_ms.append(ms)
        return {"ms": (time.perf_counter() - begin) * 1e3, "tokens": batch * (self.output - 1), "full_ms": full_ms}

    def time_drafts(self) -> float | None:
        """A diagnostic pass with the draft call timed alone (synchronised around it): its median ms per step."""
        spec = self.llm.engine.speculator
        if spec is None:
            return None
        inner = spec.draft
        times: list[float] = []

        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            sync(self.device)
            times.append((time.perf_counter() - start) * 1e3)
            return out

        spec.draft = timed  # type: ignore[method-assign]
        try:
            self()
        finally:
            del spec.draft  # the class's method again
        return statistics.median(times[1:]) if len(times) > 1 else None  # the prefill's drafts left out


def build(model: Any, prompts: list[list[int]], k: int, args: argparse.Namespace, temperature: float) -> Decode:
    """The engine, with CUDA graphs where they capture (else eager, the error kept on the result)."""
    graphs = args.device.type == "cuda"
    if graphs:
        try:
            return Decode(model, prompts, k, args.output, temperature, graphs=True)
        except Exception as err:
            error = str(err).splitlines()[0] if str(err) else repr(err)
            print(f"k={k} batch={len(prompts)}: CUDA graphs failed ({error}); decoding eagerly", flush=True)
            sync(args.device)
            run = Decode(model, prompts, k, args.output, temperature, graphs=False)
            run.graph_error = error
            return run
    return Decode(model, prompts, k, args.output, temperature, graphs=False)


def rounds(candidates: dict[int, Decode], repeats: int) -> dict[int, list[dict[str, Any]]]:
    """``rotated_rounds`` over the candidates; a failing one is printed and has no results."""
    results, errors = rotated_rounds(candidates, repeats)
    for k, err in errors.items():
        print(f"k={k}: failed: {err}", flush=True)
    return {k: results.get(k, []) for k in candidates}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="bench_speculative", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="an `mcore train` run (or checkpoint) directory")
    parser.add_argument("--k", nargs="+", type=int, default=[1, 2, 3], help="speculative_tokens to compare with 0")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes (default 1; --quick: 1 2)")
    parser.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny random model with 2 MTP depths")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt, args.output, args.repeats = 16, 10, 1
    if args.batches is None:
        args.batches = [1, 2] if args.quick else [1]
    for name, values, low in (("k", args.k, 1), ("batches", args.batches, 1)):
        bad = [v for v in values if v < low]
        if bad:
            parser.error(f"--{name} = {bad[0]}: must be >= {low}")
    for name, value, low in (("prompt", args.prompt, 1), ("output", args.output, 2), ("repeats", args.repeats, 1)):
        if value < low:
            parser.error(f"--{name} = {value}: must be >= {low}")
    bad_t = [t for t in args.temperatures if not (t >= 0 and math.isfinite(t))]
    if bad_t:
        parser.error(f"--temperatures = {bad_t[0]}: must be finite and >= 0")
    if not args.quick and args.checkpoint is None:
        parser.error("--checkpoint is required (an `mcore train` run directory; see mtp_recipe.md), or give --quick")
    if args.checkpoint is not None and not args.quick and not Path(args.checkpoint).is_dir():
        parser.error(f"--checkpoint = {args.checkpoint!r}: no such directory")
    args.device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    return args


def load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """``(model, tokenizer, name)``: the checkpoint in bf16, or (``--quick``) a random tiny model with MTP depths."""
    if args.quick:
        from mcore_models.gpt import GPT
        from mcore_models.presets import preset_config

        tiny: Any = GPT.build(preset_config("tiny", mtp_num_layers=2), seed=0).eval()
        return tiny, ByteTokenizer(), "tiny+mtp2 (random)"
    model, tokenizer = load_model(args.checkpoint, args.device)
    if tokenizer is None:
        raise ValueError(f"--checkpoint = {args.checkpoint!r}: the run has no tokenizer to encode the prompts")
    dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    return model.to(dtype).eval(), tokenizer, Path(args.checkpoint).resolve().name


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.manual_seed(0)
    model, tokenizer, name = load(args)
    dtype = next(model.parameters()).dtype
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    header = run_header(args.device, dtype, prompt=args.prompt, output=args.output, model=name, date=stamp)
    lines: list[dict[str, Any]] = []
    emit(lines, header)
    common = {"card": header["device"], "torch": header["torch"], "date": stamp, "model": name}
    table: list[str] = []
    for batch in args.batches:
        prompts = held_out_prompts(tokenizer, batch, args.prompt)
        for temperature in args.temperatures:
            candidates: dict[int, Decode] = {}
            for k in [0, *args.k]:
                try:
                    candidates[k] = build(model, prompts, k, args, temperature)
                except Exception as err:
                    emit(lines, {**common, "batch": batch, "temperature": temperature, "k": k, "error": repr(err)})
            results = rounds(candidates, args.repeats)
            base = results.get(0) or []
            base_tok_s = statistics.median(r["tokens"] * 1e3 / r["ms"] for r in base) if base else None
            base_step = statistics.median(s for r in base for s in r["full_ms"]) if base else None
            for k, runs in results.items():
                run = candidates[k]
                if not runs:
                    emit(lines, {**common, "batch": batch, "temperature": temperature, "k": k, "error": "failed"})
                    continue
                tok_s = [r["tokens"] * 1e3 / r["ms"] for r in runs]
                full = [s for r in runs for s in r["full_ms"]]
                row: dict[str, Any] = {
                    **common,
                    "batch": batch,
                    "temperature": temperature,
                    "k": k,
                    "graphs": run.llm.engine.decoder is not None
                    or getattr(run.llm.engine.speculator, "static", None) is not None,
                    "graph_error": run.graph_error,
                    **timing_row([r["ms"] / r["tokens"] for r in runs]),
                    "tok_s": round(statistics.median(tok_s), 1),
                    "step_ms": round(statistics.median(full), 4) if full else None,
                }
                if k and base_tok_s and base_step and full:
                    verified, emitted, proposed, accepted = snapshot(run.llm)
                    mean_accepted = emitted / verified - 1 if verified else 0.0
                    cost = statistics.median(full) / base_step
                    allowed = (1 + mean_accepted) / cost
                    speedup = row["tok_s"] / base_tok_s
                    draft_ms = run.time_drafts()
                    row |= {
                        "acceptance": [round(a / p, 4) if p else 0.0 for a, p in zip(accepted, proposed)],
                        "mean_accepted": round(mean_accepted, 4),
                        "step_cost": round(cost, 4),
                        "draft_ms": round(draft_ms, 4) if draft_ms is not None else None,
                        "verify_ms": round(statistics.median(full) - draft_ms, 4) if draft_ms is not None else None,
                        "allowed_speedup": round(allowed, 4),
                        "speedup": round(speedup, 4),
                        "efficiency": round(speedup / allowed, 4),
                    }
                emit(lines, row)
                acc = "/".join(f"{a:.2f}" for a in row.get("acceptance", [])) or "-"
                table.append(
                    f"| {name} | {batch} | {temperature:g} | {k} | {row['tok_s']:,.1f} | {acc} | "
                    f"{row.get('mean_accepted', '-')} | {row.get('step_cost', '-')} | "
                    f"{row.get('allowed_speedup', '-')} | {row.get('speedup', '-')} | "
                    + (f"{100 * row['efficiency']:.0f}% |" if "efficiency" in row else "- |")
                )
            del candidates, results
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
    write_lines(args.out, lines)
    print(
        "| model | batch | temp | k | decode tok/s | acceptance per position | E[accepted] | step cost | "
        "allowed speedup | speedup | efficiency |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table))
    sys.stdout.flush()


if __name__ == "__main__":
    try:
        main()
    except ValueError as exc:  # a bad --checkpoint or --prompt (mcore's UserError is one): one line, exit 2
        print(f"bench_speculative.py: {exc}", file=sys.stderr)
        sys.exit(2)
