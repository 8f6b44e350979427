"""FP8 linear (per-tensor current scaling, ``torch._scaled_mm``) against the bf16 ``nn.Linear`` it replaces.

Why it exists: the fp8 recipes only pay off where the FP8 GEMMs beat bf16 by more than the quantisation
passes cost (amax, scale, cast of input, weight and gradient). This bench times forward + backward of
one linear for GPT-sized shapes, interleaved with the bf16 baseline in the same process, and reports the
median, spread, GEMM TFLOP/s and the relative error of the output against the bf16 one.

    python plugins/mcore-precision/benchmarks/bench_fp8.py --repeats 7          # GPU
    python plugins/mcore-precision/benchmarks/bench_fp8.py --repeats 5 --compile  # + both under torch.compile
    python plugins/mcore-precision/benchmarks/bench_fp8.py --repeats 5 --compile --torchao  # + torchao's compiled
    python plugins/mcore-precision/benchmarks/bench_fp8.py --quick              # CPU smoke test (emulated)
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import torch
from torch import nn

from mcore_precision import kernels
from mcore_precision.formats import E4M3, E5M2
from mcore_precision.fp8 import CurrentScaler
from mcore_precision.fp8_linear import FP8Linear, native_scaled_mm_available
from mcore_testing.bench import emit, interleaved, rel_error, run_header, timing_row, write_lines

# (rows N, in K, out F): attention-projection and MLP shapes of a ~1B and an ~8B model, 8k tokens
SHAPES = [(8192, 2048, 2048), (8192, 2048, 8192), (8192, 8192, 2048), (8192, 4096, 4096), (8192, 4096, 14336)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU, fp32 emulation (smoke test)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--iters", type=int, default=10, help="calls per candidate per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time both linears under torch.compile (the FP8 one traced whole: the host out of its step)",
    )
    parser.add_argument(
        "--torchao",
        action="store_true",
        help="also time torchao's float8 linear (tensorwise), compiled as torchao means it to run (needs torchao)",
    )
    parser.add_argument("--out", default=None, help="also write the JSON lines here")
    return parser.parse_args(argv)


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Any:
    def run() -> torch.Tensor:
        module.weight.grad = None
        xi = x.detach().requires_grad_()
        out = module(xi)  # (N, F)
        out.backward(grad)
        return out.detach()

    return run


class _Unwrapped(nn.Module):
    """A wrapped linear that exposes its ``weight`` (``_step`` clears its gradient) and calls the wrapper."""

    def __init__(self, call: Any, linear: nn.Module) -> None:
        super().__init__()
        self.call, self.weight = call, linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.call(x)
        return out


def bench_shape(args: argparse.Namespace, shape: tuple[int, int, int], device: torch.device) -> list[dict[str, Any]]:
    n, k, f = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(k, f, bias=False).to(device=device, dtype=dtype)
    x = torch.randn(n, k, generator=g).to(device=device, dtype=dtype)  # (N, K)
    grad = torch.randn(n, f, generator=g).to(device=device, dtype=dtype) * 0.01  # (N, F)
    fp8 = FP8Linear.from_linear(
        linear, input=CurrentScaler(E4M3, 0), weight=CurrentScaler(E4M3, 0), grad=CurrentScaler(E5M2, 0)
    )
    steps = {"bf16_linear": _step(linear, x, grad), "fp8_current": _step(fp8, x, grad)}
    if args.compile:
        # a fresh cache per shape, as in a run of one model: the same ``forward`` seen at a new shape would
        # otherwise be retraced with dynamic shapes, which torch 2.11 fails on inside the autograd function
        torch._dynamo.reset()
        kernels.load_references()  # before tracing: dynamo does not trace the import
        steps["bf16_compiled"] = _step(torch.compile(linear), x, grad)
        steps["fp8_current_compiled"] = _step(torch.compile(fp8), x, grad)
    if args.torchao:
        from torchao.float8 import convert_to_float8_training

        theirs = nn.Sequential(copy.deepcopy(linear))  # the converter swaps children
        convert_to_float8_training(theirs)
        steps["torchao_float8_compiled"] = _step(_Unwrapped(torch.compile(theirs), theirs[0]), x, grad)
    measured = interleaved(steps, repeats=args.repeats, iters=args.iters, warmup=args.warmup, device=device)
    flops = 6 * n * k * f  # forward + two backward GEMMs
    rows = []
    base = measured["bf16_linear"]
    for name, result in measured.items():
        row: dict[str, Any] = {"candidate": name, "rows": n, "in": k, "out": f} | timing_row(result["times"])
        row["gemm_tflops"] = round(flops / (row["median_ms"] * 1e-3) / 1e12, 1)
        row["speedup_vs_bf16"] = round(timing_row(base["times"])["median_ms"] / row["median_ms"], 3)
        row["peak_mib"] = result["peak_mib"]
        row["rel_err_vs_bf16"] = rel_error(result["output"], base["output"])
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    shapes = [(64, 32, 48)] if args.quick else SHAPES
    lines: list[dict[str, Any]] = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    native = native_scaled_mm_available(device)
    emit(lines, run_header(device, dtype, pass_="fwd+bwd", native_fp8_gemm=native, repeats=args.repeats))
    for shape in shapes:
        for row in bench_shape(args, shape, device):
            emit(lines, row)
    write_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
