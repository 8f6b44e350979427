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
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mcore.errors import UserError
from mcore.mesh import ParallelMesh, build_mesh
from mcore.protocols.block import BlockContext
from mcore_parallel.cp import KINDS, CPLayout

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _slowest(value: float, device: torch.device) -> float:
    """The largest ``value`` over the ranks."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _timed(step: Step, iters: int, device: torch.device) -> float:
    """Ms per step of ``iters`` steps, the slowest rank's."""
    dist.barrier()
    _sync(device)
    begin = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return _slowest((time.perf_counter() - begin) * 1e3 / iters, device)


def _peak_mib(step: Step, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    _sync(device)
    return round(_slowest((torch.cuda.max_memory_allocated() - before) / 2**20, device), 1)


def _rel_error(out: torch.Tensor, ref: torch.Tensor, device: torch.device) -> float:
    """``||out - ref|| / ||ref||`` over every rank's share."""
    sums = torch.tensor(
        [(out.double() - ref.double()).square().sum().item(), ref.double().square().sum().item()], device=device
    )
    dist.all_reduce(sums)
    return float((sums[0] / sums[1]).sqrt().item())


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
    outputs = {name: kinds[name].step() for name in names}
    for name in names:
        for _ in range(args.warmup - 1):
            kinds[name].step()
    peaks = {name: _peak_mib(kinds[name].step, device) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.repeats):
        shift = round_index % max(len(names), 1)
        for name in names[shift:] + names[:shift]:  # rotated order each round
            times[name].append(_timed(kinds[name].step, args.iters, device))
    tokens = args.batch * seq
    for name in names:
        median = statistics.median(times[name])
        rows[name] = {
            "kind": name,
            "seq": seq,
            "cp": world,
            "median_ms": round(median, 3),
            "min_ms": round(min(times[name]), 3),
            "max_ms": round(max(times[name]), 3),
            "tokens_per_s": round(tokens / (median * 1e-3), 1),
            "tokens_per_s_per_gpu": round(tokens / (median * 1e-3) / world, 1),
            "peak_mib": peaks[name],
            f"rel_err_vs_{names[0]}": float(f"{_rel_error(outputs[name], outputs[names[0]], device):.3e}"),
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
    header = {
        "config": True,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device_type == "cuda" else "cpu",
        "world": mesh.size("cp"),
        "dtype": str(dtype),
        "batch": args.batch,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "causal": True,
        "pass": "fwd+bwd",
        "repeats": args.repeats,
        "iters": args.iters,
    }
    lines = [header]
    if rank0:
        print(json.dumps(header), flush=True)
    for seq in args.seqs:
        for row in bench_seq(args, mesh, seq, dtype):
            lines.append(row)
            if rank0:
                print(json.dumps(row), flush=True)
    if rank0 and args.out:
        with open(args.out, "w") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
