"""Several GPUs (torchrun): the ``cp`` attention kinds' tokens/s and peak memory against the sequence length.

One attention layer, forward + backward, over all ``N`` ranks torchrun starts (``cp = N``), causal rows of one
document, each rank holding its zig-zag share (``B`` rows of ``seq / N`` tokens, ``(B, L, nh, hd)`` per rank).
Every kind is built as the ``cp`` layout builds it for a micro-batch (``CPLayout(kind).shard_batch`` gives the
backend; its masks are built on the first call and reused, as every layer after the first finds them):

* ``ring``: K/V blocks around the ring, partial attention merged by log-sum-exp;
* ``a2a``: DeepSpeed-Ulysses, heads scattered and tokens gathered by all-to-all;
* ``allgather``: K/V all-gathered, one attention;
* ``a2a+ring``: all-to-all inside groups of ``--a2a-size`` ranks (a node; default ``N / 2`` from 4 ranks), ring
  across them; listed as not available when the world has no such split or the layout lacks the kind.

Method: for each ``--seqs`` length, warm-up calls (mask building, compiles), then ``--repeats`` rounds; each
round times ``--iters`` steps of every kind, in an order rotated each round (interleaved), host clock after a
device synchronise, the slowest rank's time. Per kind and length: median, min and max ms per step, tokens/s
of the whole group (``B * seq / median``) and per GPU, peak memory (CUDA ``max_memory_allocated`` of one
step above what was allocated before it, the largest over ranks; ``null`` on CPU) and the output's relative
error against the first kind (all compute the same attention from the same inputs: a kind that is fast
because it is wrong shows here). A kind refused by the layout (heads not divisible, a size that does not
split) is a row with ``"status": "not available: ..."``; running out of memory ends the run (collectives of
the other ranks cannot be unwound), so pass the lengths that fit.

One JSON line per kind and length (after a header line) on rank 0's stdout and in ``--out``.

    python -m torch.distributed.run --nproc_per_node 8 plugins/mcore-parallel/benchmarks/bench_cp_multi.py \\
        --seqs 8192 16384 32768 65536 131072 --out cp-multi.jsonl
    python -m torch.distributed.run --nproc_per_node 2 plugins/mcore-parallel/benchmarks/bench_cp_multi.py \\
        --tiny --out /tmp/cp-tiny.jsonl                                               # CPU proof, gloo
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mcore.errors import UserError
from mcore.mesh import ParallelMesh, build_mesh
from mcore.protocols.block import BlockContext
from mcore_parallel.cp import KINDS, CPLayout
from mcore_testing.bench import emit, interleaved, rel_error, run_header, timing_row, write_lines

ALL_KINDS = ("ring", "a2a", "allgather", "a2a+ring")
Step = Callable[[], torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, fp32, few repeats (CPU proof on gloo)")
    parser.add_argument("--kinds", nargs="+", default=list(ALL_KINDS), choices=ALL_KINDS)
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--a2a-size", type=int, default=None, help="a2a+ring: ranks per all-to-all group")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.seqs, args.heads, args.kv_heads, args.head_dim = [16, 32], 4, 2, 8
        args.repeats, args.iters, args.warmup = 2, 1, 1
    return args


class Kind:
    """One kind's backend for one length, its inputs on this rank, and its step."""

    def __init__(self, name: str, mesh: ParallelMesh, args: argparse.Namespace, seq: int, dtype: torch.dtype) -> None:
        world = mesh.size("cp")
        a2a_size = args.a2a_size or (world // 2 if world >= 4 else None)
        if name not in KINDS:
            raise UserError(f"parallel.cp.kind = {name!r} is not in this layout; allowed: {', '.join(KINDS)}")
        if name == "a2a+ring" and a2a_size is None:
            raise UserError(f"kind 'a2a+ring' needs at least 4 ranks (or --a2a-size); this run has {world}")
        config = CPLayout.Config(kind=name, a2a_size=a2a_size if name == "a2a+ring" else None)
        layout = CPLayout(config)
        layout.apply(nn.Identity(), mesh)
        device = torch.device(mesh.device_type)
        tokens = torch.zeros(args.batch, seq, dtype=torch.int64, device=device)
        _, _, self.ctx = layout.shard_batch(tokens, tokens, BlockContext())
        width = seq // world
        g = torch.Generator().manual_seed(1000 + dist.get_rank())  # every kind: the same inputs on this rank
        shapes = [(args.heads, args.head_dim), (args.kv_heads, args.head_dim), (args.kv_heads, args.head_dim)]
        self.inputs = [torch.randn(args.batch, width, n, d, generator=g).to(device, dtype) for n, d in shapes]
        self.grad = torch.randn(args.batch, width, args.heads, args.head_dim, generator=g).to(device, dtype)
        self.scale = args.head_dim**-0.5

    def step(self) -> torch.Tensor:
        q, k, v = (x.detach().requires_grad_() for x in self.inputs)
        attention = self.ctx.attention
        assert attention is not None
        out = attention(q, k, v, ctx=self.ctx, scale=self.scale, window=None)  # (B, L, nh, hd)
        out.backward(self.grad)
        return out.detach()


def bench_seq(args: argparse.Namespace, mesh: ParallelMesh, seq: int, dtype: torch.dtype) -> list[dict[str, Any]]:
    device, world = torch.device(mesh.device_type), mesh.size("cp")
    kinds: dict[str, Kind] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in args.kinds:
        try:
            kinds[name] = Kind(name, mesh, args, seq, dtype)
            kinds[name].step()  # builds the masks; a refused configuration raises here on every rank
        except UserError as error:
            kinds.pop(name, None)
            rows[name] = {"kind": name, "seq": seq, "status": f"not available: {error}"}
    names = list(kinds)
    steps = {name: kinds[name].step for name in names}
    measured = interleaved(steps, repeats=args.repeats, iters=args.iters, warmup=args.warmup, device=device)
    tokens = args.batch * seq
    for name in names:
        row = {"kind": name, "seq": seq, "cp": world, **timing_row(measured[name]["times"], digits=3)}
        median = row["median_ms"]
        rows[name] = row | {
            "tokens_per_s": round(tokens / (median * 1e-3), 1),
            "tokens_per_s_per_gpu": round(tokens / (median * 1e-3) / world, 1),
            "peak_mib": measured[name]["peak_mib"],
            f"rel_err_vs_{names[0]}": rel_error(measured[name]["output"], measured[names[0]]["output"]),
        }
    return [rows[name] for name in args.kinds]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device_type = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    mesh = build_mesh(["cp"], fill="cp", device_type=device_type)  # every rank torchrun starts: cp = N
    if mesh.size("cp") < 2:
        print("bench_cp_multi: start it on 2 or more ranks (torchrun --nproc_per_node N)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    rank0 = dist.get_rank() == 0
    lines: list[dict[str, Any]] = []
    settings = {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim}
    settings |= {"causal": True, "pass": "fwd+bwd", "repeats": args.repeats, "iters": args.iters}
    emit(lines, run_header(torch.device(device_type), dtype, **settings), show=rank0)
    for seq in args.seqs:
        for row in bench_seq(args, mesh, seq, dtype):
            emit(lines, row, show=rank0)
    if rank0:
        write_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
