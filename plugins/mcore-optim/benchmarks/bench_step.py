"""Optimizer step time on bench-0.9b-shaped parameters, against plain PyTorch references.

Shapes (built here, no model package needed): hidden 2048, 16 layers, 16 heads and 8 KV
heads of dim 128 (fused QKV weight 4096 x 2048), SwiGLU FFN 5632 (gate, up, down), vocab
32768 with an untied head, RMSNorm weights; about 0.89 B parameters.

Rows (each on its own fresh parameters, random values and gradients, never zeros):
* ``torch.optim.AdamW(fused=True)`` vs ``adamw`` (fused and foreach paths; bf16 params + fp32 masters);
* a plain PyTorch Muon (one matrix at a time, bf16 Newton-Schulz ``simple`` x5, torch's fused
  AdamW for the rest) vs ``muon`` (the same method, matrices batched by shape);
* Newton-Schulz alone on all the model's matrices: matmul TFLOP/s.

Timing: CUDA events around each ``step()``, 5 warm-up steps, median of 30.
Usage: ``python bench_step.py [--out DIR]`` (writes results.json and results.md there);
``--smoke`` runs the same code on CPU at 1/16 of the widths, 2 layers (a check, not a timing).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from mcore.mesh import ParallelMesh
from mcore.params import ParamSpec
from mcore_optim.adamw import AdamWFactory
from mcore_optim.muon import MuonFactory
from mcore_optim.newton_schulz import COEFFICIENT_SETS, flops, orthogonalize

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 2048, 16, 16, 8, 128, 5632, 32768
WARMUP, REPEATS = 5, 30
DEVICE = "cuda"
MESH = ParallelMesh((), (), "cuda")


def smoke_settings() -> None:
    global HIDDEN, LAYERS, HEAD_DIM, FFN, VOCAB, WARMUP, REPEATS, DEVICE, MESH
    HIDDEN, LAYERS, HEAD_DIM, FFN, VOCAB, WARMUP, REPEATS = 128, 2, 8, 352, 2048, 1, 2
    DEVICE, MESH = "cpu", ParallelMesh((), (), "cpu")


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class Norm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(HIDDEN))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn_norm, self.mlp_norm = Norm(), Norm()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM, bias=False)  # (4096, 2048)
        self.attn.proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(HIDDEN, FFN, bias=False)
        self.mlp.up = nn.Linear(HIDDEN, FFN, bias=False)
        self.mlp.down = nn.Linear(FFN, HIDDEN, bias=False)


class Bench09B(nn.Module):
    """Only the parameters of bench-0.9b (no forward: the optimizer step is what is timed)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = Norm()
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def param_specs(self) -> dict[str, ParamSpec]:
        """As gpt declares them: the untied head, and qkv as [all Q | K | V] with HEAD_DIM rows per head."""
        qkv = ParamSpec(
            "matrix",
            splits=(("q", HEADS * HEAD_DIM), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM)),
            head_rows=HEAD_DIM,
        )
        specs = {"lm_head.weight": ParamSpec("head")}
        specs.update({f"layers.{i}.attn.qkv.weight": qkv for i in range(len(self.layers))})
        return specs


def make_model(dtype: torch.dtype, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = Bench09B()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
            p.grad = torch.randn_like(p).mul_(1e-3)
        model.to(dtype)
        for p in model.parameters():
            p.grad = p.grad.to(dtype)
    return model


def time_steps(step) -> dict[str, float]:
    for _ in range(WARMUP):
        step()
    synchronize()
    times = []
    for _ in range(REPEATS):
        if DEVICE != "cuda":
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def plain_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class PlainMuon:
    """The reference: Muon one matrix at a time, torch's fused AdamW for everything else."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, momentum: float = 0.95, weight_decay: float = 0.1) -> None:
        embeds = {id(model.embed.weight), id(model.lm_head.weight)}
        self.matrices = [p for p in model.parameters() if p.dim() == 2 and id(p) not in embeds]
        others = [p for p in model.parameters() if p.dim() != 2 or id(p) in embeds]
        self.bufs = [torch.zeros_like(p) for p in self.matrices]
        self.adamw = torch.optim.AdamW(others, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, fused=True)
        self.lr, self.momentum, self.wd = lr, momentum, weight_decay

    @torch.no_grad()
    def step(self) -> None:
        for p, buf in zip(self.matrices, self.bufs):
            buf.mul_(self.momentum).add_(p.grad)
            update = p.grad.add(buf, alpha=self.momentum)
            o = plain_newton_schulz(update)
            p.mul_(1 - self.lr * self.wd).add_(o.to(p.dtype), alpha=-self.lr * 0.2 * math.sqrt(max(p.shape)))
        self.adamw.step()


def run_case(name: str, dtype: torch.dtype, build) -> dict[str, object]:
    model = make_model(dtype, seed=0)
    optimizer = build(model)
    result = {"name": name, **time_steps(optimizer.step)}
    result["params"] = sum(p.numel() for p in model.parameters())
    del optimizer, model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    print(f"{name:58s} {result['median_ms']:9.2f} ms", flush=True)
    return result


def ns_throughput() -> dict[str, object]:
    """Newton-Schulz (simple, 5 steps, bf16) on every matrix of the model, batched by shape as ``muon`` does."""
    triples = COEFFICIENT_SETS["simple"].triples
    q = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    shapes = {(q, HIDDEN): LAYERS, (HIDDEN, HEADS * HEAD_DIM): LAYERS, (FFN, HIDDEN): 2 * LAYERS, (HIDDEN, FFN): LAYERS}
    batches = [torch.randn(n, m, k, device=DEVICE, dtype=torch.bfloat16) for (m, k), n in shapes.items()]
    total = sum(n * flops(m, k, len(triples)) for (m, k), n in shapes.items())

    def run() -> None:
        for b in batches:
            orthogonalize(b, triples)

    timing = time_steps(run)
    tflops = total / (timing["median_ms"] * 1e-3) / 1e12
    print(
        f"{'newton-schulz (simple x5), all matrices, batched':58s} {timing['median_ms']:9.2f} ms  {tflops:.0f} TFLOP/s"
    )
    return {"name": "newton-schulz", **timing, "tflop": total / 1e12, "tflop_per_s": tflops}


def matmul_ceiling() -> float:
    n = 8192 if DEVICE == "cuda" else 256
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    timing = time_steps(lambda: a @ b)
    return 2 * n**3 / (timing["median_ms"] * 1e-3) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        smoke_settings()
    else:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA device (or --smoke)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    adamw = {"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.95), "no_decay_roles": ()}
    muon = {"lr": 1e-3, "weight_decay": 0.1, "ns_coefficients": "simple"}
    rows = [
        run_case(
            "torch.optim.AdamW(fused=True), fp32 params",
            torch.float32,
            lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True),
        ),
        run_case(
            "adamw (impl=fused), fp32 params",
            torch.float32,
            lambda m: AdamWFactory(AdamWFactory.Config(**adamw, impl="fused")).build(m, mesh=MESH, layouts=[]),
        ),
        run_case(
            "adamw (impl=foreach), fp32 params",
            torch.float32,
            lambda m: AdamWFactory(AdamWFactory.Config(**adamw, impl="foreach")).build(m, mesh=MESH, layouts=[]),
        ),
        run_case(
            "adamw (impl=fused), bf16 params + fp32 masters",
            torch.bfloat16,
            lambda m: AdamWFactory(AdamWFactory.Config(**adamw, impl="fused")).build(m, mesh=MESH, layouts=[]),
        ),
        run_case("plain PyTorch Muon (per matrix, simple x5), fp32 params", torch.float32, PlainMuon),
        run_case(
            "muon (simple x5, batched by shape, whole qkv), fp32 params",
            torch.float32,
            lambda m: MuonFactory(MuonFactory.Config(**muon, split_fused=False)).build(m, mesh=MESH, layouts=[]),
        ),
        run_case(
            "muon (simple x5, qkv split into Q, K, V), fp32 params",
            torch.float32,
            lambda m: MuonFactory(MuonFactory.Config(**muon)).build(m, mesh=MESH, layouts=[]),
        ),
        run_case(
            "muon (simple x5, qkv per head: 32 blocks), fp32 params",
            torch.float32,
            lambda m: MuonFactory(MuonFactory.Config(**muon, split_heads=True)).build(m, mesh=MESH, layouts=[]),
        ),
    ]
    ns = ns_throughput()
    ceiling = matmul_ceiling()
    print(f"{'bf16 8192^3 matmul (ceiling measured here)':58s} {ceiling:9.0f} TFLOP/s")
    meta = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run: not a measurement)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "warmup": WARMUP,
        "repeats": REPEATS,
        "matmul_ceiling_tflop_per_s": ceiling,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "newton_schulz": ns}, indent=2))
    lines = [
        f"{meta['device']}, torch {meta['torch']} (CUDA {meta['cuda']}), {meta['date_utc']} UTC; "
        f"median of {REPEATS} steps after {WARMUP} warm-up",
        "",
        "| optimizer step | median ms | min ms | max ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['name']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['max_ms']:.2f} |" for r in rows]
    lines += [
        "",
        f"Newton-Schulz (simple, 5 steps, bf16) over all {4 * LAYERS + LAYERS} matrices, batched by shape: "
        f"{ns['median_ms']:.2f} ms for {ns['tflop']:.1f} TFLOP = {ns['tflop_per_s']:.0f} TFLOP/s "
        f"(bf16 8192^3 matmul on this card: {ceiling:.0f} TFLOP/s)",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
