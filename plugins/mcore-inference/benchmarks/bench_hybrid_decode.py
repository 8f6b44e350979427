"""Decode speed of a hybrid model (recurrent layers beside attention) with static steps and CUDA graphs vs eager.

Why it exists: issue 22's inference engine serves hybrid models (mcore-ssm's ``gdn`` and ``mamba2``); their decode
steps ran eagerly until static-shape steps learned recurrent state slots, and an eager decode step is host-bound
(hundreds of small launches a layer). The model: ``--preset`` (default ``hybrid-bench``, random weights, bf16),
built through the installed plugins, ``--prompt`` random tokens per request, ``--output`` tokens generated
(greedy, no stop), at each batch size of ``--batches``. Candidates: ``engine+graphs`` (``LLM(cuda_graphs=True)``),
``engine+graphs+overlap`` (with ``overlap_decode``) and ``engine`` (eager). Rounds rotated
(``mcore_testing.bench``); median/min/max over rounds; JSON lines then Markdown rows. ``--quick``: a CPU smoke run
(a tiny hybrid, fp32, the eager candidate only).

    python plugins/mcore-inference/benchmarks/bench_hybrid_decode.py --out hybrid_decode.jsonl
"""

from __future__ import annotations

import datetime
import statistics
from typing import Any

import torch
from bench_decode import EngineDecode  # this script's folder is on sys.path when it runs
from bench_moe_decode import OneLineParser, build_model

from mcore_testing.bench import emit, rotated_rounds, run_header, timing_row, write_lines

#: ``--quick``'s overrides: a tiny hybrid of every mixer kind.
QUICK = dict(
    vocab_size=96,
    hidden_size=64,
    num_layers=3,
    layers=["gdn/swiglu", "attention/swiglu", "mamba2/none"],
    attention=dict(num_heads=4, num_kv_heads=2),
    swiglu=dict(ffn_hidden_size=128),
    gdn=dict(num_qk_heads=2, num_v_heads=4, head_k_dim=16, head_v_dim=16),
    mamba2=dict(d_state=16, headdim=16, ngroups=2),
)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="bench_hybrid_decode", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="hybrid-bench")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes (default 1 32; --quick 1 4)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: a tiny hybrid, fp32, short")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt, args.output, args.repeats = 8, 6, 1
    batches = args.batches or ([1, 4] if args.quick else [1, 32])
    if min(batches) < 1 or args.prompt < 1 or args.output < 2 or args.repeats < 1:
        parser.error("--batches and --prompt must be >= 1, --output >= 2, --repeats >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    graphs = device.type == "cuda"
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    lines: list[dict[str, Any]] = []
    header = run_header(device, dtype, preset=args.preset, prompt=args.prompt, output=args.output, date=stamp)
    emit(lines, header)
    model = build_model(args.preset, QUICK if args.quick else {}, device, dtype)
    table: list[str] = []
    for batch in batches:
        candidates = {"engine": EngineDecode(model, batch, args.prompt, args.output, False)}
        if graphs:  # (the CPU smoke run: eager only)
            candidates["engine+graphs"] = EngineDecode(model, batch, args.prompt, args.output, True)
            candidates["engine+graphs+overlap"] = EngineDecode(model, batch, args.prompt, args.output, True, True)
        times, failed = rotated_rounds(candidates, args.repeats)
        for name, error in failed.items():
            emit(lines, {"batch": batch, "candidate": name, "error": error})
        eager = times.get("engine")
        for name, ms in times.items():
            row = timing_row(ms)
            speedup = round(statistics.median(eager) / row["median_ms"], 2) if eager else None
            emit(lines, {"preset": args.preset, "batch": batch, "candidate": name, **row, "vs_eager": speedup})
            table.append(
                f"| {args.preset} | {batch} | {name} | {row['median_ms']:.3f} | {batch * 1e3 / row['median_ms']:,.1f} | {speedup}x |"
            )
        del candidates
    write_lines(args.out, lines)
    print("| preset | batch | candidate | ms/step | decode tok/s | vs eager |")
    print("|---|---|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
