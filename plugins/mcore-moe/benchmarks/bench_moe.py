"""One GPU: the ``moe`` block's forward + backward against a plain ``torch._grouped_mm`` layer and a per-expert loop.

The issue's shape by default: 8192 tokens, hidden 2048, 64 experts top-8, expert FFN 1024, bf16, softmax
top-k routing, dropless, no shared expert; routing, permutation, the three expert GEMMs, SwiGLU and the
weighted combine are all inside the timed step. Every candidate uses the same weights and inputs:

* ``mcore_moe``: our block (``topk`` router, ``allgather`` dispatcher at ep = 1, ``GroupedSwiGLU``): on CUDA one
  grouped GEMM for gate and up, the Triton SwiGLU, the permute and combine by the known permutation (Triton);
* ``mcore_moe_unpacked``: the same block with the experts' gate and up as separate tensors (as before they were
  kept packed in one ``(E, 2, F, H)`` buffer): the gate/up GEMM concatenates the ``(E, 2F, H)`` stack in its
  forward and again in its backward; what the packed layout gains, in the same run;
* ``mcore_moe_unfused``: the same block on its reference paths (two gate/up GEMMs, torch ``silu(gate) * up``,
  advanced-indexing permute, fp32 ``index_add`` combine): what the fusions gain, in the same run;
* ``mcore_moe_triton_gemm``: the same block with ``MCORE_MOE_GROUPED_GEMM=triton`` while it runs: gate, up and the
  SwiGLU as one Triton grouped GEMM with the activation in its epilogue (``grouped_swiglu_triton``; autotuned on
  its first call, inside the warm-up); on the CPU the choice falls back to the torch path;
* ``mcore_moe_chunked``: the same with ``chunk_tokens`` = a quarter of the routed rows (memory against time);
* ``grouped_mm_plain``: the baseline to beat by 1.5x: a plain layer on ``torch._grouped_mm`` with torch
  permutes (argsort by expert, gather, grouped GEMMs, ``index_add`` combine) (the issue's H200 anchor: 10.76 ms);
* ``per_expert_loop``: one GEMM chain per expert over its rows (the anchor: 77.0 ms);
* ``dense_ceiling``: the same GEMM FLOPs as one dense chain ``(N*K, H) -> (N*K, F) x 2 -> (N*K, H)``: the
  matmul speed the grouped GEMMs are compared to.

Per candidate: median/min/max ms over interleaved rounds (``mcore_testing.bench``), TFLOP/s of the expert
GEMMs (``18 N K H F`` for forward + backward; every step starts with the weights' gradients set to ``None``, as a
training step does, so no candidate pays for accumulating into old ones), peak memory of one call above the inputs, and the output's
relative error against ``per_expert_loop`` (fp32 reference math in the loop's accumulation is not claimed:
all run in the benchmark dtype). A candidate that cannot run here is a row with ``"status"``.

    python plugins/mcore-moe/benchmarks/bench_moe.py --repeats 7
    python plugins/mcore-moe/benchmarks/bench_moe.py --quick            # CPU smoke test: tiny, fp32
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from mcore.protocols import AuxLosses, BlockContext
from mcore_moe.block import MoE, MoEConfig
from mcore_testing.bench import Step, emit, interleaved, rel_error, run_header, timing_row, write_lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU, fp32, few repeats (smoke test)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--iters", type=int, default=5, help="calls per candidate per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-loop", action="store_true", help="leave out the (slow) per-expert loop")
    parser.add_argument("--only", nargs="*", default=None, help="candidates to run (default: all available)")
    parser.add_argument("--out", default=None, help="also write the JSON lines here")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.experts, args.top_k, args.ffn = 64, 32, 8, 2, 16
        args.repeats, args.iters, args.warmup = 2, 1, 1
    return args


def _block(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, chunk: int | None) -> MoE:
    config = MoEConfig(num_experts=args.experts, top_k=args.top_k, moe_ffn_hidden_size=args.ffn, chunk_tokens=chunk)
    block = MoE(config, hidden_size=args.hidden)
    block.reset_parameters(torch.Generator().manual_seed(0))
    return block.to(device=device, dtype=dtype)


@contextmanager
def _unfused(block: MoE) -> Iterator[None]:
    """``block`` on its reference paths while inside: the experts' ``forward_reference``, no Triton kernel."""
    import mcore_moe.dispatcher
    import mcore_moe.swiglu

    modules = (mcore_moe.dispatcher, mcore_moe.swiglu)
    saved = [m.use_triton for m in modules]
    block.experts.forward = block.experts.forward_reference  # type: ignore[method-assign]
    for m in modules:
        setattr(m, "use_triton", lambda x, kernel="auto": False)  # noqa: B010
    try:
        yield
    finally:
        del block.experts.forward
        for m, use in zip(modules, saved):
            setattr(m, "use_triton", use)  # noqa: B010


@contextmanager
def _grouped_gemm(kernel: str) -> Iterator[None]:
    """``MCORE_MOE_GROUPED_GEMM`` = ``kernel`` while inside (the experts read it per call), then as before."""
    from mcore_moe.kernel_choice import GROUPED_GEMM_ENV

    saved = os.environ.get(GROUPED_GEMM_ENV)
    os.environ[GROUPED_GEMM_ENV] = kernel
    try:
        yield
    finally:
        if saved is None:
            del os.environ[GROUPED_GEMM_ENV]
        else:
            os.environ[GROUPED_GEMM_ENV] = saved


def _route(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k of the router logits, renormalised (fp32, as the block's default router):
    ``(experts (N, K), weights (N, K))``."""
    probs = torch.softmax(F.linear(x.float(), router.float()), dim=-1)  # (N, E)
    weights, experts = probs.topk(k, dim=-1)
    return experts, weights / weights.sum(-1, keepdim=True)


def _plain_grouped_mm(x: torch.Tensor, w: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """The baseline layer: torch permutes around three ``torch._grouped_mm`` calls."""
    experts, weights = _route(x, w["router"], k)
    flat = experts.reshape(-1)  # (N*K,)
    order = torch.argsort(flat, stable=True)  # (N*K,) slots by expert
    tokens = torch.div(order, k, rounding_mode="floor")
    offsets = torch.cumsum(torch.bincount(flat, minlength=w["gate"].shape[0]), 0).to(torch.int32)  # (E,)
    rows = x[tokens]  # (N*K, H)
    gate = torch._grouped_mm(rows, w["gate"].transpose(-2, -1), offs=offsets)  # (N*K, F)
    up = torch._grouped_mm(rows, w["up"].transpose(-2, -1), offs=offsets)
    out_rows = torch._grouped_mm(F.silu(gate) * up, w["down"].transpose(-2, -1), offs=offsets)  # (N*K, H)
    scaled = out_rows * weights.reshape(-1)[order].unsqueeze(-1).to(out_rows.dtype)
    return x.new_zeros(x.shape).index_add(0, tokens, scaled)  # (N, H)


def _per_expert_loop(x: torch.Tensor, w: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    experts, weights = _route(x, w["router"], k)
    out = x.new_zeros(x.shape)
    for e in range(w["gate"].shape[0]):
        token, slot = (experts == e).nonzero(as_tuple=True)  # tokens that chose e
        rows = x[token]
        h = F.silu(rows @ w["gate"][e].T) * (rows @ w["up"][e].T)
        out = out.index_add(0, token, (h @ w["down"][e].T) * weights[token, slot].unsqueeze(-1).to(x.dtype))
    return out


def candidates(args: argparse.Namespace, x: torch.Tensor, grad: torch.Tensor) -> dict[str, tuple[Step | None, str]]:
    """``{name: (step or None, why not)}``: each step runs forward + backward and returns the output."""
    device, dtype = x.device, x.dtype
    ours, chunked = (
        _block(args, device, dtype, None),
        _block(args, device, dtype, max(1, args.tokens * args.top_k // 4)),
    )
    chunked.load_state_dict(ours.state_dict())
    unfused = _block(args, device, dtype, None)
    unfused.load_state_dict(ours.state_dict())
    unpacked = _block(args, device, dtype, None)
    unpacked.load_state_dict(ours.state_dict())
    with torch.no_grad():  # storage of their own: the layout before packing
        gate, up = unpacked.experts.gate, unpacked.experts.up
        gate.data, up.data = gate.detach().clone(), up.detach().clone()
    triton_gemm = _block(args, device, dtype, None)
    triton_gemm.load_state_dict(ours.state_dict())
    weights = {
        "router": ours.router.weight.detach(),
        "gate": ours.experts.gate.detach(),
        "up": ours.experts.up.detach(),
        "down": ours.experts.down.detach(),
    }
    params = {name: value.clone().requires_grad_() for name, value in weights.items()}
    b_t_h = (1, args.tokens, args.hidden)

    def block_step(block: MoE, reference: bool = False, kernel: str = "torch") -> Step:
        def step() -> torch.Tensor:
            for p in block.parameters():
                p.grad = None  # as a training step leaves them: each backward writes fresh gradients
            inp = x.detach().requires_grad_()
            if reference:
                with _unfused(block):
                    out = block(inp.view(b_t_h), BlockContext(aux_losses=AuxLosses())).view(x.shape)
                    out.backward(grad)
            else:
                with _grouped_gemm(kernel):
                    out = block(inp.view(b_t_h), BlockContext(aux_losses=AuxLosses())).view(x.shape)
                    out.backward(grad)
            return out.detach()

        return step

    def plain_step(layer: Any) -> Step:
        def step() -> torch.Tensor:
            for p in params.values():
                p.grad = None
            inp = x.detach().requires_grad_()
            out = layer(inp, params, args.top_k)
            out.backward(grad)
            return out.detach()

        return step

    rows = args.tokens * args.top_k
    dense = {
        "gate": torch.randn(args.ffn, args.hidden, device=device, dtype=dtype, requires_grad=True),
        "up": torch.randn(args.ffn, args.hidden, device=device, dtype=dtype, requires_grad=True),
        "down": torch.randn(args.hidden, args.ffn, device=device, dtype=dtype, requires_grad=True),
    }
    dense_in = torch.randn(rows, args.hidden, device=device, dtype=dtype)
    dense_grad = torch.randn(rows, args.hidden, device=device, dtype=dtype)

    def dense_ceiling() -> None:
        for p in dense.values():
            p.grad = None
        inp = dense_in.detach().requires_grad_()
        out = F.linear(F.silu(F.linear(inp, dense["gate"])) * F.linear(inp, dense["up"]), dense["down"])
        out.backward(dense_grad)

    grouped_ok = device.type == "cuda" and hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16
    out: dict[str, tuple[Step | None, str]] = {}
    if not args.skip_loop:
        out["per_expert_loop"] = (plain_step(_per_expert_loop), "")
    out["mcore_moe"] = (block_step(ours), "")
    out["mcore_moe_unpacked"] = (block_step(unpacked), "")
    out["mcore_moe_unfused"] = (block_step(unfused, reference=True), "")
    out["mcore_moe_triton_gemm"] = (block_step(triton_gemm, kernel="triton"), "")
    out["mcore_moe_chunked"] = (block_step(chunked), "")
    out["grouped_mm_plain"] = (
        (plain_step(_plain_grouped_mm), "")
        if grouped_ok
        else (None, "not available: needs CUDA bf16 torch._grouped_mm")
    )
    out["dense_ceiling"] = (dense_ceiling, "")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(device=device, dtype=dtype)
    grad = torch.randn(args.tokens, args.hidden, generator=g).to(device=device, dtype=dtype)
    lines: list[dict[str, Any]] = []
    shape = {"tokens": args.tokens, "hidden": args.hidden, "experts": args.experts, "top_k": args.top_k}
    settings = {**shape, "ffn": args.ffn, "pass": "fwd+bwd", "repeats": args.repeats, "iters": args.iters}
    emit(lines, run_header(device, dtype, **settings))
    steps = candidates(args, x, grad)
    if args.only is not None:
        unknown = sorted(set(args.only) - set(steps))
        if unknown:
            print(f"bench_moe: unknown --only {', '.join(unknown)}; allowed: {', '.join(steps)}", file=sys.stderr)
            return 2
        steps = {name: entry for name, entry in steps.items() if name in args.only}
    runnable = {name: step for name, (step, _) in steps.items() if step is not None}
    measured = interleaved(runnable, repeats=args.repeats, iters=args.iters, warmup=args.warmup, device=device)
    flops = 18 * args.tokens * args.top_k * args.hidden * args.ffn  # the expert GEMMs, forward + backward
    reference = next((measured[n]["output"] for n in ("per_expert_loop", "grouped_mm_plain") if n in measured), None)
    for name, (_, why) in steps.items():
        row: dict[str, Any] = {"candidate": name}
        if name not in measured:
            emit(lines, row | {"status": why})
            continue
        result = measured[name]
        row |= timing_row(result["times"])
        row["expert_gemm_tflops"] = round(flops / (row["median_ms"] * 1e-3) / 1e12, 2)
        row["peak_mib"] = result["peak_mib"]
        output = result["output"]
        if reference is not None and isinstance(output, torch.Tensor):
            row["rel_err_vs_reference"] = rel_error(output, reference)
        emit(lines, row)
    write_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
