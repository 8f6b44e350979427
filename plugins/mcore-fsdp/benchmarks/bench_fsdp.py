"""Training-step benchmark: mcore ``fully_shard`` vs PyTorch FSDP2 vs DDP vs the bare model.

Runs unchanged on N GPUs (NCCL) and on CPU processes (gloo), always under torchrun:

    torchrun --nproc-per-node 8 bench_fsdp.py --model bench-0.9b --seq 4096
    torchrun --nproc-per-node 8 bench_fsdp.py --model bench-0.9b --replicate 2   # HSDP 2 x 4
    torchrun --nproc-per-node 2 bench_fsdp.py --tiny --device cpu

Per implementation it reports the median step time, tokens/s (global and per rank), MFU (GPU), peak
memory per rank, exposed communication time (GPU: NCCL kernel time not overlapped by any
compute kernel, from the profiler) and, for mcore, buffer-pool and CUDA segment counts after
the first step (both stay flat). The models are plain PyTorch Llama-style decoders defined
here (RMSNorm, RoPE, GQA, SwiGLU, untied embeddings). Precision: fp32 master parameters,
bf16 compute (``MixedPrecisionPolicy(bf16, fp32)`` for the FSDPs, ``torch.autocast`` for DDP
and the bare model). Shape legend: B batch, T tokens, H hidden, nh/nkv heads, hs head size.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

PRESETS = {
    "bench-0.9b": dict(hidden=2048, layers=16, heads=16, kv_heads=8, ffn=5632, vocab=32768),
    "llama3-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=256),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


# -- the model ------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int


class RMSNorm(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-5)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, nh, T, hs/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Block(nn.Module):
    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.s = s
        hs = s.hidden // s.heads
        self.attn_norm = RMSNorm(s.hidden)
        self.wqkv = nn.Linear(s.hidden, (s.heads + 2 * s.kv_heads) * hs, bias=False)
        self.wo = nn.Linear(s.hidden, s.hidden, bias=False)
        self.mlp_norm = RMSNorm(s.hidden)
        self.w13 = nn.Linear(s.hidden, 2 * s.ffn, bias=False)
        self.w2 = nn.Linear(s.ffn, s.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        s, hs = self.s, H // self.s.heads
        q, k, v = self.wqkv(self.attn_norm(x)).split([s.heads * hs, s.kv_heads * hs, s.kv_heads * hs], dim=-1)
        q = rope(q.view(B, T, s.heads, hs).transpose(1, 2), cos, sin)  # (B, nh, T, hs)
        k = rope(k.view(B, T, s.kv_heads, hs).transpose(1, 2), cos, sin)  # (B, nkv, T, hs)
        v = v.view(B, T, s.kv_heads, hs).transpose(1, 2)  # (B, nkv, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, nh, T, hs)
        x = x + self.wo(y.transpose(1, 2).reshape(B, T, H))
        gate, up = self.w13(self.mlp_norm(x)).chunk(2, dim=-1)  # 2 x (B, T, ffn)
        return x + self.w2(F.silu(gate) * up)


class Decoder(nn.Module):
    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.s = s
        self.embed = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(Block(s) for _ in range(s.layers))
        self.norm = RMSNorm(s.hidden)
        self.head = nn.Linear(s.hidden, s.vocab, bias=False)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        hs = self.s.hidden // self.s.heads
        inv = 1.0 / (10000.0 ** (torch.arange(0, hs, 2, device=tokens.device, dtype=torch.float32) / hs))
        angles = torch.outer(torch.arange(T, device=tokens.device, dtype=torch.float32), inv)  # (T, hs/2)
        x = self.embed(tokens)  # (B, T, H)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.head(self.norm(x))  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def flops_per_token(s: Shape, seq: int) -> float:
    hs = s.hidden // s.heads
    per_layer = s.hidden * (s.heads + 2 * s.kv_heads) * hs + s.hidden * s.hidden + 3 * s.hidden * s.ffn
    matmul = s.layers * per_layer + s.hidden * s.vocab
    attention = s.layers * 2 * s.hidden * seq  # causal: half of 4 * H * T per layer
    return 6.0 * matmul + 3.0 * attention


# -- wrapping ---------------------------------------------------------------------------------------
def wrap(
    impl: str,
    model: nn.Module,
    world: int,
    device: torch.device,
    reshard: bool,
    replicate: int = 1,
    *,
    whole: bool = False,
    prefetch: int = 1,
) -> nn.Module:
    if impl in ("mcore", "torch"):
        from torch.distributed.device_mesh import init_device_mesh

        if impl == "mcore":
            from mcore_fsdp import MixedPrecisionPolicy, fully_shard
        else:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        if world % replicate:
            raise SystemExit(f"--replicate {replicate} does not divide the world size {world}")
        # HSDP when replicate > 1: a 2-D (replicate, shard) mesh, the same for both FSDPs
        if replicate > 1:
            mesh = init_device_mesh(device.type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # mcore only: matrices kept whole on one rank (--whole), units gathered ahead (--prefetch)
        extra = {"keep_whole": (lambda p: p.dim() >= 2) if whole else False, "prefetch": prefetch}
        options = {
            "mesh": mesh,
            "mp_policy": mp,
            "reshard_after_forward": reshard,
            **(extra if impl == "mcore" else {}),
        }
        for block in model.layers:
            fully_shard(block, **options)
        return fully_shard(model, **options)
    if impl == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model.to(device), device_ids=[device.index] if device.type == "cuda" else None)
    if impl == "none":
        if world != 1:
            raise SystemExit("--impl none (the bare model) runs on one process only")
        return model.to(device)
    raise SystemExit(f"--impls: unknown {impl!r}; allowed: mcore, torch, ddp, none")


def autocast(impl: str, device: torch.device) -> contextlib.AbstractContextManager:
    if impl in ("ddp", "none"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_step(
    impl: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
) -> Callable[[], None]:
    """One forward, backward and optimizer step of ``model`` (autocast where ``impl`` needs it)."""

    def step() -> None:
        with autocast(impl, device):
            loss = model(inputs, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# -- measurement -------------------------------------------------------------------------------------
def exposed_comm_ms(prof: torch.profiler.profile, steps: int) -> float | None:
    """NCCL kernel time not covered by any compute kernel, per step (GPU only)."""
    comm, compute = [], []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        span = (e.time_range.start, e.time_range.end)
        (comm if "nccl" in e.name.lower() else compute).append(span)
    if not comm and not compute:
        return None

    def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
        out: list[list[float]] = []
        for a, b in sorted(spans):
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return [(a, b) for a, b in out]

    busy = union(compute)
    exposed = 0.0
    for a, b in union(comm):
        covered = sum(max(0.0, min(b, y) - max(a, x)) for x, y in busy)
        exposed += (b - a) - covered
    return exposed / 1000.0 / steps  # us -> ms


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Result:
    impl: str
    model: str
    world: int
    replicate: int
    seq: int
    batch_per_rank: int
    step_ms: float
    tokens_per_s: float
    tokens_per_s_per_rank: float
    mfu: float | None
    peak_mem_gb: float
    exposed_comm_ms: float | None
    peak_reserved_gb: float | None = None  # GPU: what the caching allocator held at most (cached blocks too)
    whole: bool = False
    prefetch: int = 1
    pool_allocations_after_step1: int | None = None
    pool_allocations_end: int | None = None
    cuda_segments_after_step1: int | None = None
    cuda_segments_end: int | None = None


def run(args: argparse.Namespace, impl: str, device: torch.device, rank: int, world: int) -> Result:
    shape = Shape(**PRESETS["tiny" if args.tiny else args.model])
    if args.layers:
        shape.layers = args.layers
    torch.manual_seed(0)
    with torch.device(device):
        model = Decoder(shape)
    model = wrap(
        impl, model, world, device, not args.no_reshard, args.replicate, whole=args.whole, prefetch=args.prefetch
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(1 + rank)
    tokens = torch.randint(0, shape.vocab, (args.batch, args.seq + 1), generator=g).to(device)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    step = training_step(impl, model, opt, inputs, labels, device)

    def counters() -> tuple[int | None, int | None]:
        pool = None
        if impl == "mcore":
            from mcore_fsdp.api import pool_of

            pool = pool_of(model).allocations
        seg = torch.cuda.memory_stats(device).get("segment.all.allocated") if device.type == "cuda" else None
        return pool, seg

    step()
    sync(device)
    pool1, seg1 = counters()
    for _ in range(args.warmup - 1):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peaks of the timed steps
    dist.barrier()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    elapsed = statistics.median(times)
    t = torch.tensor([elapsed], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    elapsed = t.item()
    exposed = None
    if device.type == "cuda" and args.profile_steps:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.profile_steps):
                step()
            sync(device)
        exposed = exposed_comm_ms(prof, args.profile_steps) or 0.0
    pool_end, seg_end = counters()
    reserved = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        reserved = torch.cuda.max_memory_reserved(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process max RSS (KiB -> GiB)
    tokens_step = args.batch * args.seq * world
    mfu = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak_tflops:
            mfu = flops_per_token(shape, args.seq) * tokens_step / elapsed / (peak_tflops * 1e12 * world)
    return Result(
        impl=impl,
        model="tiny" if args.tiny else args.model,
        world=world,
        replicate=args.replicate,
        seq=args.seq,
        batch_per_rank=args.batch,
        step_ms=elapsed * 1000,
        tokens_per_s=tokens_step / elapsed,
        tokens_per_s_per_rank=tokens_step / elapsed / world,
        mfu=mfu,
        peak_mem_gb=peak,
        exposed_comm_ms=exposed,
        peak_reserved_gb=reserved,
        whole=args.whole and impl == "mcore",
        prefetch=args.prefetch if impl == "mcore" else 1,
        pool_allocations_after_step1=pool1,
        pool_allocations_end=pool_end,
        cuda_segments_after_step1=seg1,
        cuda_segments_end=seg_end,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[k for k in PRESETS if k != "tiny"], default="bench-0.9b")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape (CPU runs)")
    parser.add_argument("--layers", type=int, default=0, help="override the number of layers")
    parser.add_argument("--impls", default="none,mcore,torch,ddp", help="comma-separated: mcore, torch, ddp, none")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1, help="sequences per rank per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--repeats", type=int, default=1, help="measure the implementations this many times, interleaved"
    )
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--replicate", type=int, default=1, help="HSDP: replicas (mesh replicate x shard)")
    parser.add_argument("--no-reshard", action="store_true", help="reshard_after_forward=False for the FSDPs")
    parser.add_argument("--whole", action="store_true", help="mcore: keep every matrix whole on one rank")
    parser.add_argument("--prefetch", type=int, default=1, help="mcore: units gathered ahead")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--out", default="", help="append JSON lines of results here (rank 0)")
    args = parser.parse_args()
    if args.tiny:
        args.seq = min(args.seq, 64)

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    impls = [i for i in args.impls.split(",") if i and not (i == "none" and world > 1)]
    results = []
    for _ in range(args.repeats):
        for impl in impls:
            results.append(run(args, impl, device, rank, world))
            gc.collect()  # the previous implementation's model and optimizer
            if use_cuda:
                torch.cuda.empty_cache()
            if rank == 0:
                r = results[-1]
                print(json.dumps(asdict(r)), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(
                            json.dumps({**asdict(r), "torch": torch.__version__, "device": device_name(device)}) + "\n"
                        )
    if rank == 0:
        print(
            f"\n{'impl':<6} {'step ms':>9} {'tok/s/rank':>11} {'MFU':>6} {'peak GB':>8} {'rsrvd GB':>8} {'exposed comm ms':>16}"
        )
        for r in results:
            mfu = f"{r.mfu:.1%}" if r.mfu is not None else "-"
            comm = f"{r.exposed_comm_ms:.2f}" if r.exposed_comm_ms is not None else "-"
            rsrvd = f"{r.peak_reserved_gb:.2f}" if r.peak_reserved_gb is not None else "-"
            print(
                f"{r.impl:<6} {r.step_ms:9.2f} {r.tokens_per_s_per_rank:11.0f} {mfu:>6} {r.peak_mem_gb:8.2f} {rsrvd:>8} "
                f"{comm:>16}"
            )
    dist.destroy_process_group()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    main()
