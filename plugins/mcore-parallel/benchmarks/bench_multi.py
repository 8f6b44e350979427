"""Multi-process benchmark of the data- and tensor-parallel layouts: tokens/s per GPU, MFU, exposed communication, peak memory.

Arms (N = the world size torchrun starts):

* ``tpN``, ``tpN+sp``, ``tpN+overlap``, ``tpN+sp+overlap``, ``tpN+sp+overlap-rs``: ``parallel.layouts = ["tp"]``
  over all N ranks, with ``[parallel.tp] sequence_parallel`` and the communication-overlap option
  (``overlap_chunks = 4``): ``+overlap`` overlaps both sides under sequence parallelism (the row-parallel
  reduce-scatters and the chunked all-gather before the column-parallel GEMMs), ``+overlap-rs`` the row side
  only (``overlap_all_gather = false``), so the all-gather side's gain is its difference to ``+sp+overlap``;
* ``tpN+sp+compiled``, ``tpN+sp+async``: the blocks compiled (``train.compile = "blocks"``), without and with
  torch's async TP (``[parallel.tp] async_tp``: CUDA, NCCL and symmetric memory; elsewhere the arm lists its
  one-line refusal), so async TP's gain is its difference to ``+sp+compiled``;
* ``tp2xfsdpM`` (M = N / 2) against ``fsdpN``: ``["tp", "fsdp"]`` against mcore-fsdp's ``["fsdp"]``;
* ``ddpN`` against ``torch-ddpN``: mcore-parallel's ``ddp`` against ``torch.nn.parallel.DistributedDataParallel``
  around the same model, optimizer and step.

Every arm is built as the runtime builds it (``mcore.config.resolve_config`` then ``mcore.train.build.build_parts``:
the ``gpt`` model of ``--model``'s preset on the meta device, the layouts, the run's optimizer) and steps as the run
loop does (batch sharding, micro-batches under ``no_grad_sync``, ``finish_grad_sync``, global gradient norm and
clipping, optimizer step). An arm whose configuration is refused (a feature not there yet, or sizes that do not
divide) is listed with its one-line error as ``"status": "not available: ..."``; nothing is silently skipped.

Method:

* the same global batch (``--global-batch`` rows of ``--seq`` tokens, random ids from a fixed seed) every step
  and in every arm; each arm splits it over its data-parallel ranks in micro-batches of ``--micro`` rows, so
  arms compare at equal work, and every arm's first-step loss (mean over the batch) is compared with the first
  arm's (same weights from the same seed): ``loss_agrees`` catches a layout that is fast because it is wrong;
* interleaved repeats: ``--rounds`` rounds, the arms' order rotated each round; in each round an arm is built
  afresh (so memory of one arm never holds another, which an 8B model needs), runs ``--warmup`` untimed steps,
  then ``--steps`` timed ones (device synchronised, host clock; every rank's time, the slowest rank counts).
  Reported per arm: median, min and max over rounds of the mean step time;
* tokens/s per GPU = global batch tokens / median step time / N; MFU = ``GPT.flops_per_token`` x tokens/s per
  GPU / the device's peak dense bf16 FLOP/s (``--peak-tflops``, else the core's table for known GPUs; none on CPU);
* peak memory: CUDA ``max_memory_allocated`` since the arm was built (reset each round); on CPU the process's
  resident set after the timed steps (``rss_gib``) and its high-water mark (``max_rss_gib``, which includes
  earlier arms: CPU has no per-arm reset);
* exposed communication (first version): one extra profiled step per arm in the first round
  (``torch.profiler``). Collective events are recognised by name (NCCL kernels, gloo and c10d ops). On CUDA,
  ``comm_ms`` is the union of the collective kernels' intervals and ``exposed_comm_ms`` the part of it during
  which no other kernel runs (communication the GEMMs do not hide); on CPU gloo runs collectives on its own
  threads and the step waits for them, so both are the union of the collective ops' intervals on the host.
  ``profiled_step_ms`` is that step's time (the profiler slows it; compare ratios, not absolute times).
  A stricter method (the same step with collectives replaced by no-ops) is left for the multi-GPU issue.

One JSON line per arm (and one header line) on rank 0's stdout and in ``--out``.

    python -m torch.distributed.run --nproc_per_node 8 plugins/mcore-parallel/benchmarks/bench_multi.py \
        --model bench-0.9b --seq 4096 --global-batch 16 --micro 2 --out multi-0.9b.jsonl
    python -m torch.distributed.run --nproc_per_node 2 plugins/mcore-parallel/benchmarks/bench_multi.py \
        --tiny --arms tp ddp torch-ddp --out /tmp/multi-tiny.jsonl                      # CPU proof, gloo
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mcore.errors import UserError
from mcore.mesh import build_mesh
from mcore.plugins import load_plugins
from mcore.protocols.block import BlockContext
from mcore.train.build import build_model
from mcore.train.grads import clip_grads_, global_grad_norm
from mcore.train.loop import KNOWN_PEAK_TFLOPS, model_flops_per_token
from mcore.train.microbatch import classify, forward_backward, shard

ARM_FAMILIES = (
    "tp",
    "tp+sp",
    "tp+overlap",
    "tp+sp+overlap",
    "tp+sp+overlap-rs",
    "tp+sp+compiled",
    "tp+sp+async",
    "tp-fsdp",
    "fsdp",
    "ddp",
    "torch-ddp",
)
COMM = re.compile(r"nccl|gloo|c10d|all_?reduce|reduce_?scatter|all_?gather|broadcast|all_to_all", re.IGNORECASE)


@dataclass
class Arm:
    name: str
    family: str
    parallel: dict[str, Any]
    """The run config's ``[parallel]`` table (``torch-ddp``: the mesh only; the wrapper is this file's)."""
    times: list[float] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    train: dict[str, Any] = field(default_factory=dict)
    """Keys of the run config's ``[train]`` table this arm sets (``compile``)."""


def make_arms(families: list[str], world: int) -> list[Arm]:
    out = []
    for family in families:
        if family.startswith("tp") and family != "tp-fsdp":
            tp: dict[str, Any] = {}
            if "+sp" in family:
                tp["sequence_parallel"] = True
            if "+overlap" in family:
                tp["overlap_chunks"] = 4  # reductions (and, under sp, the gathers) overlapped with chunked GEMMs
            if family.endswith("+overlap-rs"):
                tp["overlap_all_gather"] = False  # the row side only
            if family.endswith("+async"):
                tp["async_tp"] = True  # torch's async TP: the gathers and reduce-scatters fused with their GEMMs
            compiled = family.endswith(("+compiled", "+async"))  # async TP is a pass of inductor's
            name = f"tp{world}{family[2:]}"
            parallel = {"layouts": ["tp"], "sizes": {"tp": world}, **({"tp": tp} if tp else {})}
            out.append(Arm(name, family, parallel, train={"compile": "blocks"} if compiled else {}))
        elif family == "tp-fsdp":
            fs = max(world // 2, 1)
            out.append(Arm(f"tp2xfsdp{fs}", family, {"layouts": ["tp", "fsdp"], "sizes": {"tp": 2, "dp_shard": fs}}))
        elif family == "fsdp":
            out.append(Arm(f"fsdp{world}", family, {"layouts": ["fsdp"]}))
        elif family == "ddp":
            out.append(Arm(f"ddp{world}", family, {"layouts": ["ddp"]}))
        else:
            out.append(Arm(f"torch-ddp{world}", family, {"layouts": ["ddp"]}))
    return out


def run_config(arm: Arm, args: argparse.Namespace, host: Any) -> Any:
    from mcore.config import resolve_config

    raw: dict[str, Any] = {
        "model": {"name": "gpt", "preset": args.model},
        "optimizer": {"name": args.optimizer, "lr": 1e-4},
        "precision": {"recipe": args.precision},
        "parallel": {**arm.parallel, "device": args.device},
        "train": {
            "seq_len": args.seq,
            "global_batch_size": args.global_batch,
            "micro_batch_size": args.micro,
            "grad_clip": 1.0,
            "seed": 1234,
            "out_dir": "bench-multi-unused",
            **arm.train,
        },
    }
    return resolve_config(raw, host)


# -- one arm, built ------------------------------------------------------------------------------------------------
@dataclass
class Built:
    step: Callable[[], float]
    flops_per_token: float | None
    dp_size: int


def build_arm(arm: Arm, args: argparse.Namespace, host: Any) -> Built:
    from mcore.train.build import build_parts

    config = run_config(arm, args, host)
    if arm.family == "torch-ddp":
        return build_torch_ddp(config, args, host)
    parts = build_parts(config, host)
    step_layouts = classify(parts.layouts, config.parallel.layouts)
    named = [(n, p) for n, p in parts.model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    rows = rows_of(args, parts.dp.rank, parts.dp.size)
    device = parts.mesh.device

    def step() -> float:
        parts.optimizer.zero_grad(set_to_none=True)
        micro = [shard(batch(r, parts.mesh, parts.precision, device), step_layouts) for r in rows]
        share = forward_backward(parts.model, micro, step_layouts, parts.precision)
        for layout in parts.layouts:
            layout.finish_grad_sync()
        norm = global_grad_norm(named, parts.mesh, parts.layouts)
        clip_grads_(params, 1.0, norm)
        parts.optimizer.step()
        return float(share)  # the step's loss on the host, as the torch DDP arm gives it

    return Built(step, model_flops_per_token(parts.factory, config, host), parts.dp.size)


def build_torch_ddp(config: Any, args: argparse.Namespace, host: Any) -> Built:
    """The same model, optimizer, precision and step, with ``torch.nn.parallel.DistributedDataParallel``."""
    mesh = build_mesh(
        ("dp_replicate",), {}, fill="dp_replicate", device_type=None if args.device == "auto" else args.device
    )
    model, factory = build_model(config, host, mesh.device)
    precision = config.precision.instantiate()
    model = precision.prepare(model)
    optimizer = config.optimizer.instantiate().build(model, mesh=mesh, layouts=[])
    ids = [mesh.device.index] if mesh.device.type == "cuda" else None
    wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=args.bucket_mb)
    params = [p for p in model.parameters() if p.requires_grad]
    rank, size = dist.get_rank(), dist.get_world_size()
    rows = rows_of(args, rank, size)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        share = 0.0
        for i, r in enumerate(rows):
            tokens, labels, ctx = batch(r, mesh, precision, mesh.device)
            with wrapped.no_sync() if i < len(rows) - 1 else contextlib.nullcontext():
                with precision.autocast():
                    loss = wrapped(tokens, labels=labels, ctx=ctx)
                precision.scale_loss(loss / len(rows)).backward()
            share += float(loss.detach()) / len(rows)
        clip_grads_(params, 1.0, global_grad_norm(params))
        optimizer.step()
        return share

    return Built(step, model_flops_per_token(factory, config, host), size)


# -- the data: one global batch, split over data-parallel ranks ----------------------------------------------------
def rows_of(args: argparse.Namespace, dp_rank: int, dp_size: int) -> list[torch.Tensor]:
    """This data-parallel rank's micro-batches of the global batch: ``(micro, seq + 1)`` token ids each."""
    if args.global_batch % (dp_size * args.micro):
        raise UserError(
            f"--global-batch = {args.global_batch} does not split into micro-batches of --micro = {args.micro} over "
            f"{dp_size} data-parallel ranks; allowed: a multiple of {dp_size * args.micro}"
        )
    g = torch.Generator().manual_seed(0)
    vocab = args.vocab
    everything = torch.randint(0, vocab, (args.global_batch, args.seq + 1), generator=g)  # (G, T + 1)
    mine = everything.chunk(dp_size)[dp_rank]  # (G / dp, T + 1)
    return list(mine.split(args.micro))


def batch(rows: torch.Tensor, mesh: Any, precision: Any, device: torch.device) -> tuple[Any, Any, BlockContext]:
    tokens = rows[:, :-1].contiguous().to(device)  # (B, T)
    labels = rows[:, 1:].contiguous().to(device)  # (B, T)
    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)  # (B, T)
    ctx = BlockContext(positions=positions, token_ids=tokens, mesh=mesh, precision=precision)
    return tokens, labels, ctx


# -- measuring -----------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def world_mean(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def world_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e3  # profiler times are microseconds


def exposed_ms(comm: list[tuple[float, float]], other: list[tuple[float, float]]) -> float:
    """The part of the union of ``comm`` not covered by the union of ``other`` (milliseconds)."""
    both = [(max(a, c), min(b, d)) for a, b in comm for c, d in other if min(b, d) > max(a, c)]
    return union_ms(comm) - union_ms(both)


def profile_step(built: Built, device: torch.device) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        built.step()
        sync(device)
        step_ms = 1e3 * (time.perf_counter() - start)
    comm: list[tuple[float, float]] = []
    other: list[tuple[float, float]] = []
    for e in prof.events():
        on_device = e.device_type != torch.autograd.DeviceType.CPU
        if (device.type == "cuda") != on_device:
            continue
        span = (e.time_range.start, e.time_range.end)
        (comm if COMM.search(e.name) else other).append(span)
    if device.type == "cuda":
        return {"profiled_step_ms": step_ms, "comm_ms": union_ms(comm), "exposed_comm_ms": exposed_ms(comm, other)}
    host = union_ms(comm)
    return {"profiled_step_ms": step_ms, "comm_ms": host, "exposed_comm_ms": host}


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


@contextlib.contextmanager
def fresh(device: torch.device) -> Iterator[None]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def one_round(arm: Arm, args: argparse.Namespace, host: Any, device: torch.device, first: bool) -> None:
    with fresh(device):
        try:
            built = build_arm(arm, args, host)
        except (UserError, ValueError) as exc:  # ConfigError is a UserError: the arm's configuration is refused
            arm.status = f"not available: {str(exc).splitlines()[0]}"
            return
        except torch.OutOfMemoryError:
            arm.status = "not available: out of memory while building"
            return
        try:
            losses = [built.step() for _ in range(max(args.warmup, 1))]
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                built.step()
            sync(device)
            arm.times.append(world_max((time.perf_counter() - start) / args.steps, device))
            if first:
                arm.result["first_step_loss"] = world_mean(losses[0], device)
                arm.result.update(profile_step(built, device))
                arm.result["flops_per_token"] = built.flops_per_token
                arm.result["dp_size"] = built.dp_size
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**30
                arm.result["peak_memory_gib"] = max(arm.result.get("peak_memory_gib", 0.0), peak)
            else:
                arm.result["rss_gib"] = max(arm.result.get("rss_gib", 0.0), rss_gib())
                arm.result["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        except torch.OutOfMemoryError:
            arm.status = "not available: out of memory"
        finally:
            del built


def peak_flops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops is not None:
        return float(args.peak_tflops) * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((t * 1e12 for key, t in KNOWN_PEAK_TFLOPS.items() if key in name), None)
    return None


def report(
    arm: Arm, args: argparse.Namespace, world: int, peak: float | None, reference: float | None
) -> dict[str, Any]:
    row: dict[str, Any] = {"arm": arm.name, "family": arm.family, "status": arm.status, "parallel": arm.parallel}
    if arm.train:
        row["train"] = arm.train
    if arm.family == "torch-ddp":  # the mesh of [parallel]; the model is wrapped by torch, not by the layout
        row["wrapper"] = "torch.nn.parallel.DistributedDataParallel"
    if arm.status != "ok" or not arm.times:
        return row
    median = statistics.median(arm.times)
    per_gpu = args.global_batch * args.seq / median / world
    fpt = arm.result.get("flops_per_token")
    row.update(
        step_ms_median=1e3 * median,
        step_ms_min=1e3 * min(arm.times),
        step_ms_max=1e3 * max(arm.times),
        rounds=len(arm.times),
        tokens_per_s_per_gpu=per_gpu,
        mfu=fpt * per_gpu / peak if fpt and peak else None,
        **arm.result,
    )
    loss = arm.result.get("first_step_loss")
    if reference is not None and loss is not None:
        row["loss_agrees"] = abs(loss - reference) <= args.loss_rtol * abs(reference)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="bench-0.9b", help="a gpt preset: bench-0.9b, llama3-8b, ...")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset, short sequences, few steps (CPU proof)")
    parser.add_argument("--arms", nargs="+", default=list(ARM_FAMILIES), choices=ARM_FAMILIES)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--global-batch", type=int, default=16, help="rows per optimizer step, all ranks together")
    parser.add_argument("--micro", type=int, default=2, help="rows per micro-batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per arm per round (compile, allocator)")
    parser.add_argument("--precision", default=None, help="precision recipe (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--bucket-mb", type=float, default=25.0, help="torch DDP's bucket_cap_mb")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense FLOP/s of one device, for MFU")
    parser.add_argument(
        "--loss-rtol", type=float, default=None, help="first-step loss agreement (default by precision)"
    )
    parser.add_argument("--out", default="", help="append the JSON lines here too")
    args = parser.parse_args()
    if args.tiny:
        args.model, args.seq, args.global_batch, args.micro = "tiny", 64, 4, 1
        args.rounds, args.steps, args.warmup = 2, 2, 1
    dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    if torch.cuda.is_available() and args.device != "cpu":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    args.device = device.type
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.loss_rtol = args.loss_rtol or (2e-2 if args.precision == "bf16" else 1e-4)
    from mcore_models.presets import preset_config

    args.vocab = preset_config(args.model).vocab_size
    host = load_plugins()
    world, rank = dist.get_world_size(), dist.get_rank()
    arms = make_arms(args.arms, world)
    for r in range(args.rounds):
        k = r % len(arms)
        for arm in arms[k:] + arms[:k]:  # rotated order: drift hits every arm alike
            if arm.status == "ok":
                one_round(arm, args, host, device, first=not arm.times)
    peak = peak_flops(args, device)
    reference = next((a.result.get("first_step_loss") for a in arms if a.status == "ok" and a.times), None)
    header = {
        "bench": "multi",
        "model": args.model,
        "world_size": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backend": dist.get_backend(),
        "seq": args.seq,
        "global_batch": args.global_batch,
        "micro": args.micro,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "precision": args.precision,
        "peak_tflops": peak / 1e12 if peak else None,
        "torch": torch.__version__,
    }
    rows = [header] + [report(a, args, world, peak, reference) for a in arms]
    if rank == 0:
        lines = [json.dumps(row) for row in rows]
        print("\n".join(lines), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write("\n".join(lines) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
