"""One GPU: the ``cp`` partial-attention + merge path at cp = 1 (the whole sequence as one block) against plain SDPA.

Causal attention, forward + backward, on the same inputs ``(B, T, nh, hd)`` (defaults: bench-0.9b's heads,
16 query heads, 8 key/value heads, head dim 128, bf16, B = 1) at each ``--seqs`` length. Candidates:

* ``cudnn_sdpa``: ``F.scaled_dot_product_attention`` (causal, ``enable_gqa``) on the cuDNN backend: the speed
  to beat (the issue's H200 anchor: 504 TFLOP/s at 8k); if cuDNN refuses GQA, the key/value heads are
  repeated inside the timed step and the row says ``"gqa": "repeated"``;
* ``flash_sdpa``: the same on the flash backend (the kernel our fast path calls, without our wrapping);
* ``ring_cp1``: what ``RingAttention`` computes at cp = 1: ``partial_attention`` on the one block (a
  causal ``BlockLayout``, described once as the layout caches it), ``merge_with_lse`` of that one part,
  and in backward ``partial_attention_backward`` from the merged output and log-sum-exp;
* ``autograd_cp1``: ``partial_attention`` under autograd (what the all-gather and all-to-all kinds run);
* ``flex_cp1``: FlexAttention on a general layout given a causal ``BlockMask`` (backward by recompute), the
  candidate for packed-document blocks (the ring runs those on the reference today, see ``lse_kernels``).

Timing: warm-up first (compiles), then ``--repeats`` rounds; each round runs every candidate ``--iters``
times between two CUDA events (host clock on CPU), in an order rotated each round (interleaved). Per
candidate: median, min and max ms over rounds, TFLOP/s (causal pairs ``T (T + 1) / 2``, forward
``4 * pairs * nh * hd``, backward 2.5 times that: FlashAttention's convention), peak memory of one call
above the inputs, and the output's relative error against the first candidate. A candidate that cannot
run here is a row with ``"status": "not available: ..."``. One JSON line per candidate (after a header
line) on stdout and in ``--out``.

    python plugins/mcore-parallel/benchmarks/bench_cp.py --seqs 8192 32768 --repeats 7
    python plugins/mcore-parallel/benchmarks/bench_cp.py --quick            # CPU smoke test: tiny, fp32
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from mcore_parallel.lse_kernels import (
    BlockLayout,
    describe_mask,
    flex_available,
    flex_block_mask,
)
from mcore_parallel.lse_merge import (
    merge_with_lse,
    partial_attention,
    partial_attention_backward,
)
from mcore_testing.bench import emit, interleaved, rel_error, run_header, timing_row, write_lines

Step = Callable[[], Any]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU, fp32, few repeats (smoke test)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--iters", type=int, default=5, help="calls per candidate per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the JSON lines here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seqs, args.heads, args.kv_heads, args.head_dim = [64], 4, 2, 16
        args.repeats, args.iters, args.warmup = 2, 1, 1
    return args


def _causal_mask(seq: int, device: torch.device) -> torch.Tensor:
    return torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None]  # (1, T, T)


def candidates(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, scale: float
) -> dict[str, tuple[Step, dict[str, Any]]]:
    """Each candidate's forward + backward step (returning the forward output) and its extra JSON fields."""
    seq, device = q.shape[1], q.device
    found: dict[str, tuple[Step, dict[str, Any]]] = {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend: Any, repeat: bool) -> Step:
        def step() -> torch.Tensor:
            qh, kh, vh = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))  # (B, n, T, hd)
            group = q.shape[2] // k.shape[2]
            keys = kh.repeat_interleave(group, dim=1) if repeat else kh
            values = vh.repeat_interleave(group, dim=1) if repeat else vh
            with sdpa_kernel([backend]) if backend is not None else nullcontext():
                out = F.scaled_dot_product_attention(
                    qh, keys, values, is_causal=True, scale=scale, enable_gqa=not repeat and group > 1
                )
                out.backward(grad.transpose(1, 2))
            return out.transpose(1, 2)

        return step

    if device.type == "cuda":
        for name, backend in (("cudnn_sdpa", SDPBackend.CUDNN_ATTENTION), ("flash_sdpa", SDPBackend.FLASH_ATTENTION)):
            for repeat in (False, True):
                try:
                    sdpa(backend, repeat)()
                except RuntimeError as error:
                    found[name] = (lambda: None, {"status": f"not available: {str(error).splitlines()[0][:200]}"})
                    continue
                found[name] = (sdpa(backend, repeat), {"gqa": "repeated" if repeat else "native"})
                break
    else:
        found["sdpa"] = (sdpa(None, False), {"gqa": "native"})

    dense = _causal_mask(seq, device)  # (1, T, T)
    causal = describe_mask(dense, seq, seq)  # once, as the layout caches it per micro-batch

    def ring_cp1() -> torch.Tensor:
        with torch.no_grad():
            out, lse = merge_with_lse([partial_attention(q, k, v, scale=scale, mask=causal)])
        partial_attention_backward(q, k, v, out, lse, grad, scale=scale, mask=causal)
        return out.to(q.dtype)

    def autograd_cp1() -> torch.Tensor:
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out, _ = partial_attention(*leaves, scale=scale, mask=causal)
        out.to(q.dtype).backward(grad)
        return out

    found["ring_cp1"] = (ring_cp1, {"layout": causal.kind})
    found["autograd_cp1"] = (autograd_cp1, {"layout": causal.kind})
    if device.type == "cuda" and flex_available():
        general = BlockLayout(
            kind="general", rows=(0, seq), cols=(0, seq), mask=dense, block_mask=flex_block_mask(dense)
        )

        def flex_cp1() -> torch.Tensor:
            with torch.no_grad():
                out, lse = merge_with_lse([partial_attention(q, k, v, scale=scale, mask=general)])
            partial_attention_backward(q, k, v, out, lse, grad, scale=scale, mask=general)
            return out.to(q.dtype)

        found["flex_cp1"] = (flex_cp1, {"layout": "general"})
    else:
        found["flex_cp1"] = (lambda: None, {"status": "not available: FlexAttention's compiled kernel needs CUDA"})
    return found


def bench_seq(args: argparse.Namespace, seq: int, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seq)
    b, nh, nkv, hd = args.batch, args.heads, args.kv_heads, args.head_dim
    q, k = torch.randn(b, seq, nh, hd, generator=g), torch.randn(b, seq, nkv, hd, generator=g)
    v, grad = torch.randn(b, seq, nkv, hd, generator=g), torch.randn(b, seq, nh, hd, generator=g)
    q, k, v, grad = (x.to(device=device, dtype=dtype) for x in (q, k, v, grad))
    steps = candidates(q, k, v, grad, 1 / hd**0.5)
    runnable = {name: step for name, (step, extra) in steps.items() if "status" not in extra}
    measured = interleaved(runnable, repeats=args.repeats, iters=args.iters, warmup=args.warmup, device=device)
    first = next(iter(runnable))
    pairs = b * seq * (seq + 1) // 2
    flops = 3.5 * 4 * pairs * nh * hd
    rows = []
    for name, (_, extra) in steps.items():
        row: dict[str, Any] = {"candidate": name, "seq": seq, **extra}
        if name in measured:
            row |= timing_row(measured[name]["times"])
            row |= {
                "tflops": round(flops / (row["median_ms"] * 1e-3) / 1e12, 2),
                "peak_mib": measured[name]["peak_mib"],
                f"rel_err_vs_{first}": rel_error(measured[name]["output"], measured[first]["output"]),
            }
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lines: list[dict[str, Any]] = []
    settings = {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim}
    settings |= {"causal": True, "pass": "fwd+bwd", "repeats": args.repeats, "iters": args.iters}
    emit(lines, run_header(device, dtype, **settings))
    for seq in args.seqs:
        for row in bench_seq(args, seq, device, dtype):
            emit(lines, row)
    write_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
