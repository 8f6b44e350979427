"""Mamba2's chunked SSD scan, forward and forward + backward: our Triton kernel against the torch references and mamba_ssm.

Usage (GPU): ``python bench_mamba2.py [--batch 8 --seq 4096 --heads 64 --head-dim 64 --groups 8 --d-state 128 --docs 1]``
(the defaults: hidden 2048 with expand 2 and head dim 64). Smoke test anywhere: ``python bench_mamba2.py --device cpu
--tiny`` (tiny shapes, fp32, no Triton).

Candidates, each on the same inputs (x, B, C in bf16 on CUDA; dt before softplus, A, D, dt_bias fp32), as the
``mamba2`` block passes them, ``--docs`` equal documents per row (``cu_seqlens``):

* ``triton``: ``mcore_ssm.mamba2_triton.ssd_chunked_triton`` (Triton forward and backward);
* ``torch_chunked``: ``mcore_ssm.mamba2_reference.ssd_chunked`` eager;
* ``torch_chunked_compiled``: the same under ``torch.compile`` (the issue's baseline: goal >= 3x);
* ``mamba_ssm``: ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`` when it imports (documents as
  its ``seq_idx``).

Timing: ``mcore_testing.bench.interleaved`` (warm-up, then rotated rounds between CUDA events). TFLOP/s counts
the chunked form's multiply-adds per token, ``2 (Q g n + Q h p + 2 h p n)`` forward (Q the chunk), backward twice
that. Each candidate's output is checked against ``torch_chunked`` (rel error). One JSON line each.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from kernel_bench import add_common_args, check_device, documents, run, select

from mcore_ssm.mamba2_reference import ssd_chunked


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_common_args(parser)
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--d-state", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=64)
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.heads, args.head_dim, args.groups, args.d_state = 1, 160, 2, 16, 1, 16
        args.chunk, args.repeats, args.iters, args.warmup = 16, 2, 1, 1
    if args.seq % args.docs or args.heads % args.groups:
        parser.error("--docs must divide --seq and --groups must divide --heads")
    check_device(parser, args)
    return args


def make_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, t, h, p, g, n = args.batch, args.seq, args.heads, args.head_dim, args.groups, args.d_state

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    return {
        "x": randn(b, t, h, p).to(dtype),
        "dt": randn(b, t, h) - 2.0,  # fp32, before softplus, as the block passes it
        "A": -torch.exp(torch.rand(h, generator=gen) * 2.7).to(device),  # -[1, 16]
        "B": randn(b, t, g, n).to(dtype),
        "C": randn(b, t, g, n).to(dtype),
        "D": torch.ones(h, device=device),
        "dt_bias": randn(h) * 0.5,
        "cu_seqlens": documents(args, device),
    }


Scan = Callable[..., torch.Tensor]


def candidates(args: argparse.Namespace, device: torch.device) -> dict[str, Scan]:
    chunk = args.chunk
    found: dict[str, Scan] = {}
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        from mcore_ssm.mamba2_triton import ssd_chunked_triton

        found["triton"] = lambda cu_seqlens, **t: ssd_chunked_triton(**t, cu_seqlens=cu_seqlens, chunk_size=chunk)[0]
    found["torch_chunked"] = lambda cu_seqlens, **t: ssd_chunked(**t, cu_seqlens=cu_seqlens, chunk_size=chunk)[0]
    compiled = torch.compile(ssd_chunked)
    found["torch_chunked_compiled"] = lambda cu_seqlens, **t: compiled(**t, cu_seqlens=cu_seqlens, chunk_size=chunk)[0]
    if device.type == "cuda" and importlib.util.find_spec("mamba_ssm") is not None:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        def mamba_ssm(cu_seqlens: torch.Tensor | None, **t: torch.Tensor) -> torch.Tensor:
            b, seq = t["x"].shape[:2]
            seq_idx = None
            if cu_seqlens is not None:  # document ids over the flattened tokens, per row
                flat = torch.arange(b * seq, device=device)
                seq_idx = (torch.searchsorted(cu_seqlens.long(), flat, right=True) - 1).view(b, seq).int()
            return mamba_chunk_scan_combined(  # type: ignore[no-any-return]
                t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"], dt_bias=t["dt_bias"],
                seq_idx=seq_idx, dt_softplus=True,
            )  # fmt: skip

        found["mamba_ssm"] = mamba_ssm
    return select(args, found)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h, p, g, n, q = args.heads, args.head_dim, args.groups, args.d_state, args.chunk
    fwd_flops = 2 * args.batch * args.seq * (q * g * n + q * h * p + 2 * h * p * n)
    inputs = make_inputs(args, device, dtype)
    run(args, device, dtype, inputs, candidates(args, device), fwd_flops=fwd_flops, probe_like="x")


if __name__ == "__main__":
    main()
