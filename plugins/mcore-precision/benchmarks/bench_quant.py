"""Quantisation kernels' bandwidth (``mcore_precision.kernels``) against a device-to-device copy and the torch
references, eager and under ``torch.compile``, in one run.

Why it exists: the FP8 linear only beats bf16 when quantising its operands costs little next to the GEMM
(issue 19: eager torch quantisation dropped the linear to 0.35-1.06x bf16). A quantisation pass is memory
bound, so its measure is bandwidth: each row gives the GB/s of one candidate over the pass's minimal traffic
(the input read once, every output written once: codes, transposed codes, scales) and that as a share of the
copy bandwidth measured in the same process (a large ``dst.copy_(src)``, read + write). Candidates are timed
interleaved (``mcore_testing.bench``); ``bitexact`` says whether the kernel's outputs equal the eager
reference's byte for byte.

    python plugins/mcore-precision/benchmarks/bench_quant.py --repeats 7      # GPU (--kernels mxfp8,rowwise: some)
    python plugins/mcore-precision/benchmarks/bench_quant.py --quick          # CPU smoke test (interpreter)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

if "--quick" in sys.argv:  # Triton's interpreter on CPU: set before Triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch

from mcore_precision.formats import E4M3
from mcore_testing.bench import emit, interleaved, run_header, timing_row, write_lines

# (rows, columns) of bench-0.9b-like GEMM operands: activations / gradients (8k tokens) and weights
ACTIVATIONS = [(8192, 2048), (8192, 5632), (8192, 8192)]
WEIGHTS = [(2048, 2048), (5632, 2048), (2048, 5632)]
COPY_ELEMENTS = 1 << 28  # bf16: 512 MiB each way


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU, kernels in Triton's interpreter")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--iters", type=int, default=20, help="calls per candidate per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd references")
    parser.add_argument(
        "--kernels", default="", help="comma-separated kernel names to run (e.g. 'mxfp8,rowwise'); default: all"
    )
    parser.add_argument("--out", default=None, help="also write the JSON lines here")
    return parser.parse_args(argv)


Case = tuple[str, str, Callable[[Any], Callable[[torch.Tensor], Any]], int]


def _cases(one: torch.Tensor) -> list[Case]:
    """``(family, layout, make(implementations) -> fn(x), output bytes per element)`` for activations;
    ``one``: the given scale of the delayed-scaling cast."""
    return [
        ("tensorwise-current", "rows", lambda m: lambda x: m.quantize_tensorwise(x, E4M3, 0, None, True)[:3], 2),
        ("tensorwise-given-scale", "rows", lambda m: lambda x: m.quantize_tensorwise(x, E4M3, 0, one, True)[:2], 2),
        ("rowwise", "rows", lambda m: lambda x: m.quantize_rowwise(x, E4M3), 1),
        ("rowwise", "columns", lambda m: lambda x: m.quantize_rowwise(x.t(), E4M3), 1),
        ("blockwise-1x128", "rows", lambda m: lambda x: m.quantize_blockwise(x, E4M3, (1, 128)), 1),
        ("blockwise-1x128", "columns", lambda m: lambda x: m.quantize_blockwise(x.t(), E4M3, (1, 128)), 1),
        ("mxfp8", "rows", lambda m: lambda x: m.quantize_mx(x, E4M3, "up"), 1),
        ("mxfp8", "columns", lambda m: lambda x: m.quantize_mx(x.t(), E4M3, "up"), 1),
        ("nvfp4-1x16", "rows", lambda m: lambda x: m.quantize_nvfp4(x, (1, 16)), 4),  # fp32 values, as the reference
    ]


def _weight_cases() -> list[Case]:
    return [
        ("blockwise-128x128", "rows", lambda m: lambda x: m.quantize_blockwise(x, E4M3, (128, 128)), 1),
        ("nvfp4-16x16", "rows", lambda m: lambda x: m.quantize_nvfp4(x, (16, 16)), 4),
    ]


def _equal(a: Any, b: Any) -> bool:
    """Byte equality of every tensor of two results (NaN bytes compared as bytes too)."""
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and bool(
            torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    return all(_equal(x, y) for x, y in zip(a, b) if x is not None)


def copy_bandwidth(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> float:
    """GB/s of a large ``dst.copy_(src)`` (bytes read + written)."""
    n = 1 << 16 if args.quick else COPY_ELEMENTS
    src, dst = torch.randn(n, device=device).to(dtype), torch.empty(n, device=device, dtype=dtype)
    measured = interleaved(
        {"copy": lambda: dst.copy_(src)}, repeats=args.repeats, iters=args.iters, warmup=2, device=device
    )
    ms = timing_row(measured["copy"]["times"])["median_ms"]
    return 2 * n * src.element_size() / (ms * 1e-3) / 1e9


def bench_case(
    args: argparse.Namespace,
    case: Case,
    shape: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
    copy_gbs: float,
) -> list[dict[str, Any]]:
    """One kernel family at one shape: the Triton kernel, the eager reference and the compiled reference."""
    from mcore_precision.kernels import reference

    family, layout, make, out_bytes = case
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    fns: dict[str, Callable[[torch.Tensor], Any]] = {"triton": make(_triton()), "eager": make(reference)}
    if not args.no_compile:
        fns["compiled"] = torch.compile(make(reference), dynamic=False)
    steps = {name: (lambda fn=fn: fn(x)) for name, fn in fns.items()}
    measured = interleaved(steps, repeats=args.repeats, iters=args.iters, warmup=args.warmup, device=device)
    traffic = x.numel() * (x.element_size() + out_bytes)  # minimal bytes: read once, write codes (+ scales, small)
    rows = []
    for name, result in measured.items():
        row: dict[str, Any] = {"kernel": family, "layout": layout, "shape": list(shape), "candidate": name}
        row |= timing_row(result["times"])
        gbs = traffic / (row["median_ms"] * 1e-3) / 1e9
        row["gb_s"] = float(f"{gbs:.4g}")
        row["pct_of_copy"] = round(100 * gbs / copy_gbs, 1)
        if name == "triton":
            row["bitexact"] = _equal(result["output"], measured["eager"]["output"])
        rows.append(row)
    return rows


def _triton() -> Any:
    """A namespace with every kernel entry point (the Triton implementations, imported directly)."""
    from types import SimpleNamespace

    from mcore_precision.kernels import blockwise, mx, nvfp4, rowwise, tensorwise

    return SimpleNamespace(
        quantize_tensorwise=tensorwise.quantize_tensorwise,
        quantize_rowwise=rowwise.quantize_rowwise,
        quantize_blockwise=blockwise.quantize_blockwise,
        quantize_mx=mx.quantize_mx,
        quantize_nvfp4=nvfp4.quantize_nvfp4,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16
    if args.quick:
        args.repeats, args.iters, args.warmup = min(args.repeats, 2), 1, 1
        args.no_compile = args.no_compile or not _compiler_present()
    lines: list[dict[str, Any]] = []
    copy_gbs = copy_bandwidth(args, device, dtype)
    emit(lines, run_header(device, dtype, copy_gb_s=float(f"{copy_gbs:.4g}"), repeats=args.repeats, iters=args.iters))
    activations, weights = ([(64, 160)], [(48, 160)]) if args.quick else (ACTIVATIONS, WEIGHTS)
    wanted = {name for name in args.kernels.split(",") if name}
    plan = [(shape, case) for shape in activations for case in _cases(torch.tensor(1.0, device=device))]
    plan += [(shape, case) for shape in weights for case in _weight_cases()]
    for shape, case in plan:
        if wanted and case[0] not in wanted:
            continue
        for row in bench_case(args, case, shape, device, dtype, copy_gbs):
            emit(lines, row)
    write_lines(args.out, lines)
    return 0


def _compiler_present() -> bool:
    """torch.compile on CPU needs a C++ compiler."""
    import shutil

    return shutil.which("g++") is not None or shutil.which("c++") is not None


if __name__ == "__main__":
    sys.exit(main())
