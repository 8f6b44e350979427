"""What the scan benchmarks (``bench_gdn.py``, ``bench_mamba2.py``) share: the common command-line flags, the
documents' ``cu_seqlens``, and the timed fwd / fwd+bwd loop over candidates with its JSON rows.

Why: both benchmarks time candidates the same way (``mcore_testing.bench.interleaved``, rotated rounds, rel error
against ``torch_chunked``); only their inputs, candidates and FLOP counts differ. Imported as a sibling module
(the scripts run from this folder).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

import torch

from mcore_testing.bench import emit, interleaved, rel_error, run_header, timing_row, write_lines

Candidate = Callable[..., torch.Tensor]
#: A candidate's inputs changed before timing (e.g. fla's head layout): ``(name, inputs) -> inputs``.
Adapt = Callable[[str, dict[str, Any]], dict[str, Any]]


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags every scan benchmark takes (device, sizes shared by both, timing, output)."""
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few repeats (smoke test)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--docs", type=int, default=1, help="equal documents per row")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--fwd-only", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, help="candidates to run (default: all available)")
    parser.add_argument("--out", default=None, help="also write the JSON lines here")


def check_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` for ``--device cuda`` without a CUDA device."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu --tiny for a smoke test")


def documents(args: argparse.Namespace, device: torch.device) -> torch.Tensor | None:
    """``cu_seqlens`` of ``--docs`` equal documents per row over the flattened ``(batch * seq)`` tokens, or ``None``."""
    if args.docs <= 1:
        return None
    return torch.arange(0, args.batch * args.seq + 1, args.seq // args.docs, dtype=torch.int32, device=device)


def select(args: argparse.Namespace, found: dict[str, Candidate]) -> dict[str, Candidate]:
    """``found`` restricted to ``--only`` when given."""
    return {name: fn for name, fn in found.items() if name in args.only} if args.only else found


def run(
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    inputs: Mapping[str, Any],
    fns: Mapping[str, Candidate],
    *,
    fwd_flops: int,
    probe_like: str,
    adapt: Adapt | None = None,
) -> None:
    """Time every candidate in ``fns`` on ``inputs`` (keyword arguments, ``cu_seqlens`` not differentiated), forward
    and forward + backward (a random probe shaped like ``inputs[probe_like]`` as the output gradient); emit a header
    and one JSON row per candidate and mode (ms, TFLOP/s from ``fwd_flops``, peak MiB, rel error vs
    ``torch_chunked``), and write them to ``--out``."""
    lines: list[dict[str, Any]] = []
    emit(
        lines, run_header(device, dtype, **{k: v for k, v in vars(args).items() if k not in ("out", "only", "device")})
    )

    def call(name: str, grad: bool) -> Callable[[], torch.Tensor]:
        fn = fns[name]
        given = adapt(name, dict(inputs)) if adapt is not None else dict(inputs)
        leaves = {n: t.detach().requires_grad_(grad) for n, t in given.items() if n != "cu_seqlens"}
        probe = torch.randn_like(inputs[probe_like])

        def step() -> torch.Tensor:
            out = fn(**leaves, cu_seqlens=given["cu_seqlens"])
            if grad:
                torch.autograd.backward(out, probe)
                for t in leaves.values():
                    t.grad = None
            return out.detach()

        return step

    for mode, grad, flops in (("fwd", False, fwd_flops), ("fwd+bwd", True, 3 * fwd_flops)):
        if grad and args.fwd_only:
            continue
        steps = {name: call(name, grad) for name in fns}
        with torch.set_grad_enabled(grad):
            results = interleaved(steps, repeats=args.repeats, iters=args.iters, warmup=args.warmup, device=device)
        reference = results["torch_chunked"]["output"] if "torch_chunked" in results else None
        for name, result in results.items():
            row = {"candidate": name, "mode": mode, **timing_row(result["times"]), "peak_mib": result["peak_mib"]}
            row["tflops"] = round(flops / (row["median_ms"] * 1e-3) / 1e12, 3)
            if reference is not None:
                row["rel_error_vs_torch_chunked"] = rel_error(result["output"].float(), reference.float())
            emit(lines, row)
    write_lines(args.out, lines)
