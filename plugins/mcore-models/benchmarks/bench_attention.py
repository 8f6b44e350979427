"""Packed-document attention, forward + backward: our ``flex`` backend through the seam against the alternatives.

Usage (GPU): ``python bench_attention.py [--batch 2 --seq 4096 --docs 4 --heads 16 --kv-heads 8 --head-dim 128]``.
Smoke test anywhere: ``python bench_attention.py --device cpu --tiny`` (tiny shapes, fp32, forward only on CPU:
torch has no FlexAttention backward there).

Candidates, each on the same bf16 inputs ``(B, T, nh, hd)`` with ``--docs`` equal documents per row:

* ``ours_flex``: ``FlexBackend`` through ``attention_backends.seam.attend``, as an attention block calls it
  (the block mask cached for the call, as every layer after the first finds it);
* ``flex_direct``: ``torch.compile(flex_attention)`` with a prebuilt document ``BlockMask``, on
  contiguous ``(B, n, T, hd)`` inputs;
* ``flex_direct_views``: the same on the ``(B, T, n, hd)`` tensors a block hands over, seen transposed
  (what ``ours_flex`` runs, without the seam: the difference between the two is the layout's cost);
* ``flash_per_document``: one causal flash SDPA call per document;
* ``cudnn_full_causal``: one cuDNN SDPA call, causal over the whole row (no document mask: more work, a
  different function; the speed to beat);
* ``sdpa_dense_mask``: ``SDPABackend`` through the seam, the dense boolean mask (the old default path);
* ``ours_flex_opts<i>`` (``--flex-options``): ``FlexBackend(kernel_options=...)`` through the seam, one per
  given dict (tile sizes, warps, stages of forward and backward); ``ours_flex_autotune`` (``--autotune``):
  the ``flex-autotune`` backend (inductor times its tile configs on the first call, during the warm-up);
* ``flex_block_mask_build``: building the ``BlockMask`` for a new batch (once per step, not per layer),
  from per-block document ids (``flex_blocks``); ``create_block_mask_build``: the same mask by
  ``create_block_mask`` (every pair evaluated), the previous way.

Timing (METHOD.md): warm-up first (compiles), then ``--repeats`` rounds; each round runs every candidate
``--iters`` times between two CUDA events, in an order rotated each round (interleaved, so drift hits all
alike). Per candidate: median, min and max over rounds of the time per call. TFLOP/s counts the attended
(query, key) pairs: forward ``4 * pairs * nh * hd`` FLOPs, backward 2.5 times that (FlashAttention's
convention), ``cudnn_full_causal`` credited with the document pairs only. Each candidate's output is
checked against ``flex_direct`` first. One JSON object per line on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from mcore.protocols.block import BlockContext
from mcore_models.attention_backends.flex import FlexAutotuneBackend, FlexBackend, _mask_mod, recompile_room
from mcore_models.attention_backends.sdpa import SDPABackend
from mcore_models.attention_backends.seam import attend
from mcore_models.blocks.masking import document_ids

Step = Callable[[], Any]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few repeats (smoke test)")
    parser.add_argument("--batch", type=int, default=2, help="rows")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per row")
    parser.add_argument("--docs", type=int, default=4, help="equal documents per row")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--iters", type=int, default=20, help="calls per candidate per round")
    parser.add_argument("--warmup", type=int, default=5, help="calls per candidate before timing")
    parser.add_argument("--fwd-only", action="store_true", help="time the forward alone")
    parser.add_argument(
        "--flex-options",
        default="[]",
        help="JSON list of FlexAttention kernel_options dicts: one candidate ours_flex_opts<i> each (CUDA)",
    )
    parser.add_argument(
        "--autotune", action="store_true", help="add ours_flex_autotune (flex-autotune: inductor picks the tiles)"
    )
    parser.add_argument("--only", default="", help="comma-separated candidates to time (default: all)")
    args = parser.parse_args(argv)
    try:
        args.flex_options = json.loads(args.flex_options)
    except json.JSONDecodeError as exc:
        parser.error(f"--flex-options: not JSON ({exc.msg}); expected a list of objects")
    if not isinstance(args.flex_options, list) or not all(isinstance(o, dict) for o in args.flex_options):
        parser.error("--flex-options: expected a JSON list of objects, e.g. '[{\"BLOCK_M1\": 32}]'")
    if args.tiny:
        args.batch, args.seq, args.docs, args.heads, args.kv_heads, args.head_dim = 1, 64, 2, 2, 1, 16
        args.repeats, args.iters, args.warmup = 2, 2, 1
    for key in ("batch", "seq", "docs", "heads", "kv_heads", "head_dim", "repeats", "iters"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} = {getattr(args, key)}: must be at least 1")
    if args.seq % args.docs or args.heads % args.kv_heads:
        parser.error("--docs must divide --seq and --kv-heads must divide --heads")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu --tiny for a smoke test")
    if args.device == "cpu":
        args.fwd_only = True  # torch has no FlexAttention backward on CPU
    return args


def make_step(
    fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], dout: torch.Tensor, fwd_only: bool
) -> Step:
    """One forward (+ backward by ``autograd.grad``: no gradient accumulation kernels) of ``fn``."""
    if fwd_only:

        def forward() -> Any:
            with torch.no_grad():
                return fn(*inputs)

        return forward

    def forward_backward() -> Any:
        out = fn(*inputs)
        return torch.autograd.grad(out, inputs, dout)

    return forward_backward


def candidates(
    args: argparse.Namespace, dtype: torch.dtype
) -> tuple[dict[str, Step], dict[str, Callable[[], torch.Tensor]], int]:
    """The timed steps, a forward per candidate for the correctness check, and the attended pairs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    device = torch.device(args.device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch, seq, nh, nkv, hd = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q = rand(batch, seq, nh, hd).requires_grad_(not args.fwd_only)  # (B, T, nh, hd): what a block hands over
    k = rand(batch, seq, nkv, hd).requires_grad_(not args.fwd_only)
    v = rand(batch, seq, nkv, hd).requires_grad_(not args.fwd_only)
    dout = rand(batch, seq, nh, hd)
    doc_len = seq // args.docs
    cu = torch.arange(0, batch * seq + 1, doc_len, dtype=torch.int32, device=device)  # (B * docs + 1,)
    pairs = batch * args.docs * doc_len * (doc_len + 1) // 2
    scale = hd**-0.5
    gqa = nh != nkv
    cuda = device.type == "cuda"

    ours = FlexBackend()
    dense = SDPABackend()
    ctx_flex = BlockContext(cu_seqlens=cu, max_seqlen=doc_len, attention=ours)
    ctx_dense = BlockContext(cu_seqlens=cu, max_seqlen=doc_len, attention=dense)

    def ours_flex(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return attend(a, b, c, ctx=ctx_flex, scale=scale, window=None, default=dense)

    def sdpa_dense_mask(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return attend(a, b, c, ctx=ctx_dense, scale=scale, window=None, default=dense)

    docs = document_ids(cu, batch, seq)
    block_mask = create_block_mask(_mask_mod(docs, 0, None), batch, None, seq, seq, device=device)
    flex = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
    qh, kh, vh = (x.detach().transpose(1, 2).contiguous().requires_grad_(not args.fwd_only) for x in (q, k, v))
    douth = dout.transpose(1, 2).contiguous()

    def flex_direct(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        with recompile_room():  # it shares flex_attention's compiled variants with the candidates below
            return flex(a, b, c, block_mask=block_mask, scale=scale, enable_gqa=gqa)  # (B, nh, T, hd)

    def flex_direct_views(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The same kernel on ``(B, T, n, hd)`` tensors seen as ``(B, n, T, hd)`` (what a block hands over)."""
        with recompile_room():
            out = flex(
                a.transpose(1, 2),
                b.transpose(1, 2),
                c.transpose(1, 2),
                block_mask=block_mask,
                scale=scale,
                enable_gqa=gqa,
            )
        return out.transpose(1, 2)

    def kernel(backend: Any) -> Any:
        return sdpa_kernel([backend]) if cuda else contextlib.nullcontext()  # CPU: whatever SDPA picks

    def flash_per_document(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        outs = []
        flat = [x.view(batch * seq, x.shape[2], x.shape[3]) for x in (a, b, c)]  # (B*T, n, hd)
        with kernel(SDPBackend.FLASH_ATTENTION):
            for start in range(0, batch * seq, doc_len):
                qd, kd, vd = (x[start : start + doc_len][None].transpose(1, 2) for x in flat)  # (1, n, L, hd)
                outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=gqa))
        return torch.cat([o.transpose(1, 2)[0] for o in outs]).view(batch, seq, nh, hd)

    def cudnn_full_causal(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        with kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(
                a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=gqa
            )
        return out.transpose(1, 2)

    def build_mask() -> Any:
        fresh = cu.clone()  # a new batch: nothing cached
        return ours.block_mask(fresh, batch, seq, seq, None, device)

    def create_block_mask_build() -> Any:
        """The previous way: ``create_block_mask`` evaluating the mask on every pair."""
        return create_block_mask(
            _mask_mod(document_ids(cu.clone(), batch, seq), 0, None), batch, None, seq, seq, device=device
        )

    variants = {f"ours_flex_opts{i}": FlexBackend(kernel_options=opts) for i, opts in enumerate(args.flex_options)}
    if args.autotune:
        variants["ours_flex_autotune"] = FlexAutotuneBackend()

    def through(backend: FlexBackend) -> Callable[..., torch.Tensor]:
        ctx = BlockContext(cu_seqlens=cu, max_seqlen=doc_len, attention=backend)
        return lambda a, b, c: attend(a, b, c, ctx=ctx, scale=scale, window=None, default=dense)

    bthd = (q, k, v)
    steps = {
        "ours_flex": make_step(ours_flex, bthd, dout, args.fwd_only),
        "flex_direct": make_step(flex_direct, (qh, kh, vh), douth, args.fwd_only),
        "flex_direct_views": make_step(flex_direct_views, bthd, dout, args.fwd_only),
        "flash_per_document": make_step(flash_per_document, bthd, dout, args.fwd_only),
        "cudnn_full_causal": make_step(cudnn_full_causal, bthd, dout, args.fwd_only),
        "sdpa_dense_mask": make_step(sdpa_dense_mask, bthd, dout, args.fwd_only),
        "flex_block_mask_build": build_mask,
        "create_block_mask_build": create_block_mask_build,
    }
    forwards = {
        "ours_flex": lambda: ours_flex(q, k, v),
        "flex_direct": lambda: flex_direct(qh, kh, vh).transpose(1, 2),
        "flex_direct_views": lambda: flex_direct_views(q, k, v),
        "flash_per_document": lambda: flash_per_document(q, k, v),
        "sdpa_dense_mask": lambda: sdpa_dense_mask(q, k, v),
    }
    for name, backend in variants.items():
        fn = through(backend)
        steps[name] = make_step(fn, bthd, dout, args.fwd_only)
        forwards[name] = functools.partial(fn, q, k, v)
    if args.only:
        keep = set(args.only.split(",")) | {"flex_direct"}  # the correctness reference always runs
        unknown = keep - set(steps)
        if unknown:
            raise SystemExit(f"--only: unknown candidates {sorted(unknown)}; known: {sorted(steps)}")
        steps = {name: step for name, step in steps.items() if name in keep}
        forwards = {name: fn for name, fn in forwards.items() if name in keep}
    return steps, forwards, pairs


class Timer:
    """Milliseconds of ``iters`` calls: CUDA events on CUDA, the host clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, step: Step, iters: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / iters
        begin = time.perf_counter()
        for _ in range(iters):
            step()
        return (time.perf_counter() - begin) * 1e3 / iters


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps, forwards, pairs = candidates(args, dtype)
    fwd_flops = 4 * pairs * args.heads * args.head_dim
    flops = fwd_flops if args.fwd_only else int(3.5 * fwd_flops)
    print(
        json.dumps(
            {
                "config": True,
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "dtype": str(dtype),
                "batch": args.batch,
                "seq": args.seq,
                "docs_per_row": args.docs,
                "heads": args.heads,
                "kv_heads": args.kv_heads,
                "head_dim": args.head_dim,
                "attended_pairs": pairs,
                "pass": "fwd" if args.fwd_only else "fwd+bwd",
                "flops_per_call": flops,
                "repeats": args.repeats,
                "iters": args.iters,
            }
        ),
        flush=True,
    )
    with torch.no_grad():
        reference = forwards["flex_direct"]()
        errors = {name: rel_error(fn(), reference) for name, fn in forwards.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    timer = Timer(device)
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:  # rotated order each round
            times[name].append(timer(steps[name], args.iters))
    for name in names:
        median = statistics.median(times[name])
        row: dict[str, Any] = {
            "candidate": name,
            "median_ms": round(median, 4),
            "min_ms": round(min(times[name]), 4),
            "max_ms": round(max(times[name]), 4),
        }
        if not name.endswith("_build"):
            row["tflops"] = round(flops / (median * 1e-3) / 1e12, 1)
        if name in errors:
            row["rel_err_vs_flex_direct"] = float(f"{errors[name]:.3e}")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
