"""The whole Gated DeltaNet block against its pieces: where a ``hybrid-bench`` mixer's forward + backward goes.

Why it exists: the hybrid training step is about twice the dense one at 4,096 tokens (RESULTS.md), more than the
chunked rule's kernels explain. This times, at ``hybrid-bench``'s mixer shape (hidden 2048, 8 query/key heads, 16
value heads, head dims 128, packed documents), forward + backward of:

* ``block``: ``GatedDeltaNet.forward`` as the training step runs it (eager; on CUDA its conv + SiLU + L2 norm and
  gated norm run as the fused Triton kernels of ``conv_triton`` / ``norm_triton``);
* ``block_unfused``: the same with ``MCORE_SSM_FUSED=0`` set (the torch conv, ``l2_normalize`` and
  ``gated_rms_norm``), so one run A/Bs the fused ops;
* ``block_conv_two``: the same with the fused conv's two-kernel backward (``MCORE_SSM_CONV_BWD=two``);
* ``block_compiled``: the same block's forward under ``torch.compile`` (``train.compile = "blocks"``);
* ``projections``: its seven linears alone (the GEMM floor of the block);
* ``rule``: the chunked gated delta rule alone, on the block's shapes;
* ``conv``: the three causal convolutions + SiLU alone (packed documents; the torch path);
* ``conv_fused``: the same by ``conv_triton`` (q and k with the L2 norm in its epilogue; CUDA only), and
  ``conv_fused_two`` with its two-kernel backward;
* ``segments``: the documents' segments the block computes once per call (host syncs included).

Then a ``torch.profiler`` table of one eager fwd + bwd: kernels by CUDA time and the host's share. Output: JSON
lines (``mcore_testing.bench``) on stdout and in ``--out``.

    python bench_gdn_block.py --repeats 5            # on the GPU machine (run.sh gdnblock)
    python bench_gdn_block.py --device cpu --tiny    # smoke test
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from kernel_bench import check_device, documents

from mcore.protocols.block import BlockContext
from mcore_ssm.conv import causal_conv1d
from mcore_ssm.gdn import GatedDeltaNet
from mcore_ssm.gdn_kernels import gated_delta_rule
from mcore_ssm.packing import documents as packed_segments
from mcore_testing.bench import emit, interleaved, run_header, timing_row, write_lines

Step = Callable[[], Any]
#: The fused conv's two-kernel backward (``kernel_choice.conv_bwd``), set around a candidate's whole step.
TWO_PASS = {"MCORE_SSM_CONV_BWD": "two"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--docs", type=int, default=4, help="equal documents per row (1: none packed)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--qk-heads", type=int, default=8)
    parser.add_argument("--v-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip block_compiled")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    check_device(parser, args)
    if args.tiny:
        args.batch, args.seq, args.hidden, args.qk_heads, args.v_heads, args.head_dim = 1, 128, 64, 2, 4, 16
        args.repeats, args.iters, args.warmup = 1, 1, 1
    if args.docs < 1 or args.seq % args.docs:
        parser.error(f"--docs {args.docs}: must be >= 1 and divide --seq {args.seq}")
    return args


def context(args: argparse.Namespace, device: torch.device) -> BlockContext:
    """The step's context: ``--docs`` equal documents per row (positions restart at each)."""
    length = args.seq // args.docs
    positions = (torch.arange(args.seq, device=device) % length).expand(args.batch, -1)  # (B, T)
    cu = documents(args, device)  # (D + 1,) or None
    return BlockContext(positions=positions, cu_seqlens=cu, max_seqlen=length if cu is not None else None)


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """The environment variables ``values`` set inside (each restored after)."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def candidates(
    args: argparse.Namespace, block: GatedDeltaNet, ctx: BlockContext, hidden: torch.Tensor
) -> dict[str, Callable[[], Any]]:
    """Each candidate's fwd + bwd step (gradients of the parameters and the input, dropped after each call)."""
    batch, seq, _ = hidden.shape
    dk, hv = block.head_k_dim, block.A_log.out_features
    gen = torch.Generator(device="cpu").manual_seed(1)

    def rand(*shape: int, dtype: torch.dtype = hidden.dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=hidden.device, dtype=dtype)

    def fwd_bwd(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, env: dict[str, str] | None = None) -> Step:
        """``fn``'s forward + backward on fresh leaves of ``inputs``, with the environment ``env`` set around both."""
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        probe: list[torch.Tensor] = []

        def step() -> torch.Tensor:
            with environ(env or {}):
                out = fn(*leaves)
                if not probe:
                    probe.append(torch.randn_like(out))
                torch.autograd.backward(out, probe[0])
            for t in [*leaves, *block.parameters()]:
                t.grad = None
            return out.detach()

        return step

    linears = (block.q, block.k, block.v, block.z, block.b, block.a)

    def projections(x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return torch.cat([lin(x) for lin in linears] + [block.out(o)], dim=-1)  # (B, T, all outputs)

    q = torch.nn.functional.normalize(rand(batch, seq, args.qk_heads, dk), dim=-1)
    k = torch.nn.functional.normalize(rand(batch, seq, args.qk_heads, dk), dim=-1)
    v = rand(batch, seq, hv, block.head_v_dim)
    g = -torch.nn.functional.softplus(rand(batch, seq, hv, dtype=torch.float32)) * 0.3
    beta = torch.sigmoid(rand(batch, seq, hv, dtype=torch.float32))

    def rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        out, _ = gated_delta_rule(q, k, v, g, beta, cu_seqlens=ctx.cu_seqlens, kernel=block.config.kernel)
        return out  # (B, T, hv, dv)

    weights = [conv.weight.detach().requires_grad_(True) for conv in (block.conv_q, block.conv_k, block.conv_v)]

    def conv(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor) -> torch.Tensor:
        segments = packed_segments(batch, seq, ctx.cu_seqlens, xq.device) if ctx.cu_seqlens is not None else None
        ys = [
            causal_conv1d(x, w, cu_seqlens=ctx.cu_seqlens, segments=segments)[0] for x, w in zip((xq, xk, xv), weights)
        ]
        return torch.cat(ys, dim=-1)  # (B, T, channels)

    found_inputs = [rand(batch, seq, t[0, 0].numel()) for t in (q, k, v)]  # (B, T, channels) each
    found: dict[str, Callable[[], Any]] = {
        "block": fwd_bwd(lambda x: block(x, ctx), hidden),
        "block_unfused": fwd_bwd(lambda x: block(x, ctx), hidden, env={"MCORE_SSM_FUSED": "0"}),
        "projections": fwd_bwd(projections, hidden, rand(batch, seq, hv * block.head_v_dim)),
        "rule": fwd_bwd(rule, q, k, v, g, beta),
        "conv": fwd_bwd(conv, *found_inputs),
    }
    if hidden.is_cuda:
        from mcore_ssm.conv_triton import conv1d_silu_train

        def conv_fused(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor) -> torch.Tensor:
            cu = ctx.cu_seqlens
            pos = packed_segments(batch, seq, cu, xq.device).pos if cu is not None else None
            heads = (dk, dk, None)
            ys = [conv1d_silu_train(x, w, pos=pos, norm_head=h) for x, w, h in zip((xq, xk, xv), weights, heads)]
            return torch.cat(ys, dim=-1)  # (B, T, channels)

        found["conv_fused"] = fwd_bwd(conv_fused, *found_inputs)
        found["conv_fused_two"] = fwd_bwd(conv_fused, *found_inputs, env=TWO_PASS)
        found["block_conv_two"] = fwd_bwd(lambda x: block(x, ctx), hidden, env=TWO_PASS)
    if ctx.cu_seqlens is not None:
        cu = ctx.cu_seqlens
        found["segments"] = lambda: packed_segments(batch, seq, cu, hidden.device).pos
    if not args.no_compile:
        compiled = torch.compile(block.forward)
        found["block_compiled"] = fwd_bwd(lambda x: compiled(x, ctx), hidden)
    return found


def profile(step: Callable[[], Any], device: torch.device, lines: list[dict[str, Any]]) -> None:
    """One profiled fwd + bwd after two warm calls: the top kernels by device time, their count, the host's span."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_us = sum(e.device_time for e in kernels)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.device_time)
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:20]
    emit(lines, {"profile": "block fwd+bwd (eager)", "kernels": len(kernels), "device_busy_us": round(busy_us, 1)})
    for name, times in top:
        emit(lines, {"kernel": name, "calls": len(times), "total_us": round(sum(times), 1)})
    syncs = [e for e in prof.events() if e.name in ("aten::_local_scalar_dense", "cudaStreamSynchronize")]
    emit(lines, {"host_syncs": len(syncs), "sync_host_us": round(sum(e.cpu_time for e in syncs), 1)})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = GatedDeltaNet.Config(
        num_qk_heads=args.qk_heads, num_v_heads=args.v_heads, head_k_dim=args.head_dim, head_v_dim=args.head_dim
    )
    block = GatedDeltaNet(config, hidden_size=args.hidden).to(device=device, dtype=dtype)
    ctx = context(args, device)
    hidden = torch.randn(args.batch, args.seq, args.hidden, device=device, dtype=dtype)
    lines: list[dict[str, Any]] = []
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "device")}
    emit(lines, run_header(device, dtype, **settings))
    steps = candidates(args, block, ctx, hidden)
    results = interleaved(steps, repeats=args.repeats, iters=args.iters, warmup=args.warmup, device=device)
    for name, result in results.items():
        mode = "call" if name == "segments" else "fwd+bwd"
        emit(lines, {"candidate": name, "mode": mode, **timing_row(result["times"]), "peak_mib": result["peak_mib"]})
    if not args.no_profile:
        profile(steps["block"], device, lines)
    write_lines(args.out, lines)


if __name__ == "__main__":
    main()
