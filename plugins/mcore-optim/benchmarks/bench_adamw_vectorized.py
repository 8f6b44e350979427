"""The one-pass AdamW kernel with scalar loads against its vectorized launch, and the copy bandwidth they are bound by.

Why it exists: ``adamw_triton``'s kernel reads its tensors through tables of addresses, which carry no alignment,
so the compiler emits 4- and 2-byte loads and stores; ``MCORE_OPTIM_ADAMW_VECTORIZED=1`` (``vectorized=True``)
tells it that whole blocks of 16-byte aligned tensors may move 16 bytes at a time. In the bench-0.9b step the
kernel took 12.7 ms (H100, 2026-12-07 profile) for ~0.89 B parameters at 28 bytes each (bf16 gradient and
parameter, fp32 master and moments), ~70% of the card's copy bandwidth. This times both launches, interleaved, on
bench-0.9b-shaped parameters (the shapes of ``bench_step.py``), and a plain device copy of the same bytes, and
checks that both launches leave the same tensors.

    python plugins/mcore-optim/benchmarks/bench_adamw_vectorized.py --repeats 5     # GPU
    python plugins/mcore-optim/benchmarks/bench_adamw_vectorized.py --quick         # CPU smoke (interpreter)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

from mcore_testing.bench import emit, interleaved, run_header, timing_row, write_lines

HIDDEN, LAYERS, KV, FFN, VOCAB = 2048, 16, 1024, 5632, 32768
HYPER = {"lr": 3e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
BYTES_PER_PARAM = 2 + 4 + 4 + 4 + 4 + 4 + 4 + 2  # read: grad, master, m, v; write: master, m, v, param


def shapes(quick: bool) -> list[tuple[int, ...]]:
    """bench-0.9b's parameter shapes (embedding, head, per layer: qkv, out, gate, up, down, two norms; final norm),
    or a few small ones (``quick``)."""
    if quick:
        return [(64, 48), (5000,), (33,)]
    layer = [(HIDDEN + 2 * KV, HIDDEN), (HIDDEN, HIDDEN), (FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN)]
    return [(VOCAB, HIDDEN), (VOCAB, HIDDEN), *(layer * LAYERS), *([(HIDDEN,)] * (2 * LAYERS + 1))]


class State:
    """One optimizer state: fp32 masters and moments, bf16 parameters and gradients, step counts, its tables."""

    def __init__(self, sizes: list[tuple[int, ...]], device: torch.device, seed: int) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        self.w = [torch.randn(s, device=device, generator=g) * 0.02 for s in sizes]
        self.m = [torch.zeros(s, device=device) for s in sizes]
        self.v = [torch.zeros(s, device=device) for s in sizes]
        self.p = [w.to(torch.bfloat16) for w in self.w]
        self.grads = [torch.randn(s, device=device, generator=g).to(torch.bfloat16) for s in sizes]
        self.t = [torch.zeros((), device=device) for _ in sizes]
        self.cache: dict[Any, Any] = {}

    def step(self, vectorized: bool) -> torch.Tensor:
        from mcore_optim.adamw_triton import adamw_step_triton

        adamw_step_triton(
            self.w, self.grads, self.m, self.v, self.t, list(self.p), cache=self.cache, vectorized=vectorized, **HYPER
        )
        return self.p[-3]  # a norm weight: a partial block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU in Triton's interpreter")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None, help="also write the JSON lines here")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    sizes = shapes(args.quick)
    params = sum(torch.Size(s).numel() for s in sizes)
    scalar, vector = State(sizes, device, 0), State(sizes, device, 0)
    total = params * BYTES_PER_PARAM // 2  # bytes of a copy that reads and writes as much as one step
    src = torch.empty(total, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    steps = {
        "scalar": lambda: scalar.step(False),
        "vectorized": lambda: vector.step(True),
        "copy": lambda: dst.copy_(src),
    }
    lines: list[dict[str, Any]] = []
    emit(lines, run_header(device, torch.bfloat16, params=params, repeats=args.repeats))
    measured = interleaved(steps, repeats=args.repeats, iters=args.iters, warmup=3, device=device)
    copy_ms = timing_row(measured["copy"]["times"])["median_ms"]
    for name, result in measured.items():
        row: dict[str, Any] = {"candidate": name} | timing_row(result["times"])
        row["GB_per_s"] = round(2 * total / (row["median_ms"] * 1e-3) / 1e9, 1)
        row["vs_copy"] = round(copy_ms / row["median_ms"], 3)
        emit(lines, row)
    # the same steps from the same state: the same tensors (the launches differ in their loads only)
    same = all(torch.equal(a, b) for a, b in zip(scalar.w + scalar.m + scalar.v, vector.w + vector.m + vector.v))
    emit(lines, {"same_result": same and all(torch.equal(a, b) for a, b in zip(scalar.p, vector.p))})
    write_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
