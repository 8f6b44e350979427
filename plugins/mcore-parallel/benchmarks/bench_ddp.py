"""Does ``ddp`` cost anything on one GPU? The training step with and without the layout, interleaved.

The issue's speed promise: on one H200 at world size 1, ``ddp`` adds no measurable overhead to the
bench-0.9b step of the plain model. Both arms train their own copy of the same model (same
initial values) with the same batches, optimizer (AdamW, fused on CUDA) and precision (fp32
parameters, bf16 autocast); the ``ddp`` arm applies ``DDPLayout`` over a 1-rank mesh, so every
gradient lands in a bucket view, every hook and bucket bookkeeping runs, and only the collective
is skipped (there is nobody to reduce with). Rounds alternate the arms' order (A B, B A, ...) so
drift in clocks or temperature hits both; each round times ``--steps`` steps per arm after
``--warmup`` untimed ones. Reported per arm: median step time over rounds, min, max and spread
((max - min) / median); then the difference of the medians and whether it lies within the larger
spread (the claim "no measurable overhead").

    python bench_ddp.py --model bench-0.9b --seq 2048 --batch 4 --rounds 10     # one H200
    python bench_ddp.py --device cpu --tiny                                      # smoke test, CPU

The model is a plain Llama-style decoder defined here (RMSNorm, RoPE, GQA, SwiGLU, untied head).
Shape legend: B batch, T tokens, H hidden, nh/nkv heads, hs head size, V vocabulary.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mcore.mesh import build_mesh
from mcore_parallel.ddp import DDPLayout

SHAPES = {
    "bench-0.9b": dict(hidden=2048, layers=16, heads=16, kv_heads=8, ffn=5632, vocab=32768),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=256),
}


@dataclass(kw_only=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int


class Layer(nn.Module):
    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.s, hs = s, s.hidden // s.heads
        self.norm1 = nn.RMSNorm(s.hidden, eps=1e-5)
        self.q = nn.Linear(s.hidden, s.heads * hs, bias=False)
        self.kv = nn.Linear(s.hidden, 2 * s.kv_heads * hs, bias=False)
        self.o = nn.Linear(s.heads * hs, s.hidden, bias=False)
        self.norm2 = nn.RMSNorm(s.hidden, eps=1e-5)
        self.gate_up = nn.Linear(s.hidden, 2 * s.ffn, bias=False)
        self.down = nn.Linear(s.ffn, s.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        s, hs = self.s, self.s.hidden // self.s.heads
        h = self.norm1(x)
        q = self.q(h).view(B, T, s.heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        k, v = self.kv(h).view(B, T, 2, s.kv_heads, hs).permute(2, 0, 3, 1, 4)  # 2 x (B, nkv, T, hs)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, nh, T, hs)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, -1))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)  # 2 x (B, T, F)
        return x + self.down(F.silu(gate) * up)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)  # 2 x (B, nh, T, hs/2)
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


class Decoder(nn.Module):
    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.s = s
        self.embed = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.layers))
        self.norm = nn.RMSNorm(s.hidden, eps=1e-5)
        self.head = nn.Linear(s.hidden, s.vocab, bias=False)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        T, hs = tokens.shape[1], self.s.hidden // self.s.heads
        freq = 1.0 / (10000.0 ** (torch.arange(0, hs, 2, device=tokens.device) / hs))  # (hs/2,)
        angle = torch.outer(torch.arange(T, device=tokens.device), freq)  # (T, hs/2)
        cos, sin = angle.cos(), angle.sin()
        x = self.embed(tokens)  # (B, T, H)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.head(self.norm(x))  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def flops_per_token(s: Shape, seq: int) -> float:
    hs = s.hidden // s.heads
    per_layer = s.hidden * (s.heads + 2 * s.kv_heads) * hs + s.heads * hs * s.hidden + 3 * s.hidden * s.ffn
    return 6.0 * (s.layers * per_layer + s.hidden * s.vocab) + 6.0 * s.layers * s.hidden * seq


# -- the arms -------------------------------------------------------------------------------------------
@dataclass
class Arm:
    name: str
    step: Callable[[], float]
    times: list[float]


def make_arm(name: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace) -> Arm:
    device = batch[0].device
    layout = None
    if name == "ddp":
        layout = DDPLayout(DDPLayout.Config(bucket_mb=args.bucket_mb))
        model = layout.apply(model, build_mesh(layout.mesh_dims, {}, fill="dp_replicate", device_type=device.type))
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step() -> float:
        with amp:
            loss = model(*batch)
        loss.backward()
        if layout is not None:
            layout.finish_grad_sync()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()) if args.check else 0.0

    return Arm(name, step, [])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(arm: Arm, steps: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        arm.step()
    sync(device)
    return (time.perf_counter() - start) / steps


def summary(times: list[float]) -> dict[str, float]:
    median = statistics.median(times)
    return {
        "median_ms": 1e3 * median,
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "spread": (max(times) - min(times)) / median,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="bench-0.9b")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape, few steps (smoke test)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (each arm once per round)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per arm before the first round")
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--check", action="store_true", help="also check both arms' losses agree")
    parser.add_argument("--json", default="", help="write the results here too")
    args = parser.parse_args()
    if args.tiny:
        args.model, args.seq, args.batch, args.rounds, args.steps, args.warmup = "tiny", 64, 2, 3, 2, 1
        args.check = True
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU; use --device cpu --tiny for the smoke test")
    device = torch.device(args.device)
    shape = Shape(**SHAPES[args.model])
    torch.manual_seed(0)
    with torch.device(device):
        base = Decoder(shape)
        tokens = torch.randint(0, shape.vocab, (args.batch, args.seq + 1))
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())  # (B, T) each
    arms = [make_arm(name, copy.deepcopy(base), batch, args) for name in ("plain", "ddp")]
    del base
    losses = {arm.name: [arm.step() for _ in range(args.warmup)] for arm in arms}
    if args.check:
        a, b = losses["plain"], losses["ddp"]
        assert all(abs(x - y) <= 1e-3 * abs(x) for x, y in zip(a, b)), f"the arms' losses differ: {a} vs {b}"
    for r in range(args.rounds):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            arm.times.append(timed(arm, args.steps, device))
    stats = {arm.name: summary(arm.times) for arm in arms}
    plain, ddp = stats["plain"], stats["ddp"]
    diff = (ddp["median_ms"] - plain["median_ms"]) / plain["median_ms"]
    tokens_per_step = args.batch * args.seq
    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "seq": args.seq,
        "batch": args.batch,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "bucket_mb": args.bucket_mb,
        "arms": stats,
        "tokens_per_s": {n: tokens_per_step / (s["median_ms"] / 1e3) for n, s in stats.items()},
        "tflops_per_s": {
            n: flops_per_token(shape, args.seq) * tokens_per_step / (s["median_ms"] / 1e3) / 1e12
            for n, s in stats.items()
        },
        "ddp_overhead": diff,
        "within_spread": abs(diff) <= max(plain["spread"], ddp["spread"]),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    for name, s in stats.items():
        print(
            f"{name:>6}: median {s['median_ms']:.2f} ms  [{s['min_ms']:.2f} .. {s['max_ms']:.2f}]  "
            f"spread {100 * s['spread']:.1f}%"
        )
    print(f"ddp vs plain: {100 * diff:+.2f}% ({'within' if result['within_spread'] else 'outside'} the spread)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
