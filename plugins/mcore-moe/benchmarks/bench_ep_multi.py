"""Several GPUs (or gloo CPU ranks): the ``moe`` layer under the ``ep`` layout, each dispatcher, and the share of
its time that is token exchange.

Launch with ``torchrun --nproc_per_node N`` (every rank is one ``ep`` rank; ``--tiny`` on CPU with gloo). Each
rank routes its own ``--tokens`` tokens (different data per rank, as ``ep`` ranks read). For every
``--dispatchers`` entry, with the same weights (seed 0) and inputs:

* ``layer``: the block's forward + backward (routing, dispatch, the rank's ``E / ep`` experts as grouped GEMMs,
  combine), the experts sharded by ``EPLayout`` exactly as a run shards them;
* ``exchange``: the same dispatcher's ``dispatch`` then ``combine`` (forward + backward) with the routed rows
  passed through unchanged: the token exchange and permutations alone. Nothing overlaps the exchange with
  compute yet, so ``exchange / layer`` is the share of the layer exposed to communication.

Timing (``mcore_testing.bench``): warm-up, then ``--repeats`` rounds of ``--iters`` calls per candidate in a
rotated order, the slowest rank's time per round; medians, min and max; tokens/s over all ranks; peak
memory; each dispatcher's output against the first's (every dispatcher computes the same layer). One JSON
line per dispatcher after a header, on rank 0's stdout and in ``--out``.

    torchrun --nproc_per_node 8 plugins/mcore-moe/benchmarks/bench_ep_multi.py --repeats 7
    torchrun --nproc_per_node 2 plugins/mcore-moe/benchmarks/bench_ep_multi.py --tiny   # CPU, gloo
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.distributed as dist

from mcore.mesh import build_mesh
from mcore.protocols import AuxLosses, BlockContext, RoutingDecision
from mcore_moe.block import DISPATCHERS, MoE, MoEConfig
from mcore_moe.ep import EPLayout
from mcore_testing.bench import Step, emit, interleaved, rel_error, run_header, timing_row, write_lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (gloo), few repeats")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--dispatchers", nargs="+", default=list(DISPATCHERS), choices=list(DISPATCHERS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the JSON lines here (rank 0)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.tokens, args.hidden, args.experts, args.top_k, args.ffn = 32, 16, 8, 2, 8
        args.repeats, args.iters, args.warmup = 2, 1, 1
    return args


def build(args: argparse.Namespace, dispatcher: str, mesh: Any, dtype: torch.dtype) -> MoE:
    """The block with the same weights on every rank, its experts sharded by the ``ep`` layout."""
    block = MoE(
        MoEConfig(num_experts=args.experts, top_k=args.top_k, moe_ffn_hidden_size=args.ffn), hidden_size=args.hidden
    )
    block.reset_parameters(torch.Generator().manual_seed(0))
    block = block.to(device=mesh.device, dtype=dtype)
    return EPLayout(EPLayout.Config(dispatcher=dispatcher)).apply(block, mesh)  # type: ignore[return-value]


def steps_for(block: MoE, x: torch.Tensor, grad: torch.Tensor) -> tuple[Step, Step, torch.Tensor]:
    """``(layer, exchange, what exchange must give)`` for one dispatcher (module docstring): rows passed
    through unchanged come back as ``x`` times the token's summed routing weights."""

    def layer() -> torch.Tensor:
        inp = x.detach().requires_grad_()
        out = block(inp[None], BlockContext(aux_losses=AuxLosses()))[0]  # (N, H)
        out.backward(grad)
        return out.detach()

    with torch.no_grad():
        routing = block.router.route(x)
    fixed = RoutingDecision(experts=routing.experts, weights=routing.weights, num_experts=routing.num_experts)

    def exchange() -> torch.Tensor:
        inp = x.detach().requires_grad_()
        result = block.dispatcher.dispatch(inp, fixed)
        out = block.dispatcher.combine(result.tokens, result)  # (N, H)
        out.backward(grad)
        return out.detach()

    return layer, exchange, x * routing.weights.sum(-1, keepdim=True).to(x.dtype)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device_type = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    mesh = build_mesh(["ep"], fill="ep", device_type=device_type)  # every rank torchrun starts: ep = N
    ep = mesh.size("ep")
    if ep < 2:
        print("bench_ep_multi: start it on 2 or more ranks (torchrun --nproc_per_node N)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    device = torch.device(mesh.device)
    rank0 = dist.get_rank() == 0
    g = torch.Generator().manual_seed(100 + dist.get_rank())  # each rank its own tokens
    x = torch.randn(args.tokens, args.hidden, generator=g).to(device=device, dtype=dtype)
    grad = torch.randn(args.tokens, args.hidden, generator=g).to(device=device, dtype=dtype)
    lines: list[dict[str, Any]] = []
    shape = {"tokens_per_rank": args.tokens, "hidden": args.hidden, "experts": args.experts, "top_k": args.top_k}
    settings = {**shape, "ffn": args.ffn, "pass": "fwd+bwd", "repeats": args.repeats, "iters": args.iters}
    emit(lines, run_header(device, dtype, **settings), show=rank0)
    steps: dict[str, Step] = {}
    expected: dict[str, torch.Tensor] = {}
    for name in args.dispatchers:
        layer, exchange, expected[name] = steps_for(build(args, name, mesh, dtype), x, grad)
        steps[f"{name}/layer"], steps[f"{name}/exchange"] = layer, exchange
    measured = interleaved(steps, repeats=args.repeats, iters=args.iters, warmup=args.warmup, device=device)
    first = f"{args.dispatchers[0]}/layer"
    tokens = args.tokens * ep
    for name in args.dispatchers:
        layer, exchange = measured[f"{name}/layer"], measured[f"{name}/exchange"]
        row: dict[str, Any] = {"dispatcher": name, "ep": ep, **timing_row(layer["times"])}
        median = row["median_ms"]
        row["tokens_per_s"] = round(tokens / (median * 1e-3), 1)
        row["exchange_median_ms"] = timing_row(exchange["times"])["median_ms"]
        row["exchange_share"] = round(row["exchange_median_ms"] / median, 4) if median else None
        row["peak_mib"] = layer["peak_mib"]
        row[f"rel_err_vs_{args.dispatchers[0]}"] = rel_error(layer["output"], measured[first]["output"])
        row["exchange_rel_err"] = rel_error(exchange["output"], expected[name])
        emit(lines, row, show=rank0)
    if rank0:
        write_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
