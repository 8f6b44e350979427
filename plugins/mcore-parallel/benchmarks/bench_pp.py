"""Multi-process benchmark of the ``pp`` schedules against plain ``torch.distributed.pipelining``.

Arms (pp = the world size torchrun starts; one pipeline, no data parallelism):

* ``1f1b``, ``interleaved`` (``--virtual`` stages per rank), ``zb-h1``: mcore-parallel's ``pp`` layout
  (``forward_backward`` as the run loop calls it, then ``finish_grad_sync``);
* ``torch-1f1b``, ``torch-interleaved``: torchtitan-style ``torch.distributed.pipelining``
  (``PipelineStage`` around the same stage modules, ``Schedule1F1B`` / ``ScheduleInterleaved1F1B``, the
  loss as ``loss_fn`` on the full logits of the last stage, as torchtitan does).

Every arm cuts the same ``gpt`` model of ``--model``'s preset (built on the meta device; each rank
allocates only its stages, every parameter filled from a generator seeded by its name, so every arm
holds the same weights) and runs the same micro-batches (``--micro-batches`` of ``--micro`` rows of
``--seq`` random tokens, fixed seed). ``loss_agrees``: each arm's first-step loss equals the first
arm's (rel 1e-3 under bf16 autocast on CUDA, 1e-5 in fp32 on CPU): a fast wrong arm is caught.
The optimizer is not part of the step (``zero_grad`` only): what differs between arms is the schedule.

Method: ``--rounds`` rounds, the arms' order rotated each round; each round builds the arm afresh,
runs ``--warmup`` untimed steps then ``--steps`` timed ones (device synchronised, host clock, the
slowest rank counts); per arm the median, min and max over rounds of the mean step time. Reported:
tokens/s (the step's tokens / median step time, and per GPU), ``bubble_sim`` (the schedule's bubble
share from ``pp_schedule.simulate`` with unit costs: F = 1, B = 2, or F = B = W = 1 for zb-h1; the
torch arms share their algorithm's row), and peak memory per stage (CUDA ``max_memory_allocated``
since the arm was built; on CPU the resident set after the timed steps). A refused arm (sizes that do
not divide) is listed with its one-line error as ``"status": "not available: ..."``.

    python -m torch.distributed.run --nproc_per_node 8 plugins/mcore-parallel/benchmarks/bench_pp.py \
        --model llama3-8b --seq 4096 --micro 1 --micro-batches 16 --out pp-8b.jsonl
    python -m torch.distributed.run --nproc_per_node 2 plugins/mcore-parallel/benchmarks/bench_pp.py \
        --tiny --out /tmp/pp-tiny.jsonl                                                  # CPU proof, gloo
    python plugins/mcore-parallel/benchmarks/bench_pp.py --table      # the simulated bubble table (no torch.distributed)
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
import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mcore.errors import UserError
from mcore.mesh import build_mesh
from mcore.protocols.block import BlockContext
from mcore_models.gpt import GPT
from mcore_models.presets import preset_config
from mcore_parallel.pp import PPLayout, StageChunks
from mcore_parallel.pp_schedule import Timeline, bubble_theory, build, simulate, unit_costs, with_comms
from mcore_parallel.pp_split import rank_stages, stage_counts, stage_ranges

OURS = ("1f1b", "interleaved", "zb-h1")
TORCH = ("torch-1f1b", "torch-interleaved")


class _Precision:
    """bf16 autocast on CUDA, fp32 on CPU; the loss unscaled."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss


def _fill(module: nn.Module, device: torch.device) -> None:
    """Allocate ``module``'s parameters on ``device``, each from a generator seeded by its (full) name."""
    module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))


def _model(args: argparse.Namespace) -> nn.Module:
    cfg = preset_config(
        args.model, max_position_embeddings=max(args.seq, 64), **({"num_layers": args.layers} if args.layers else {})
    )
    with torch.device("meta"):
        return GPT(cfg)


def _batches(args: argparse.Namespace, vocab: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(args.micro_batches):
        tokens = torch.randint(0, vocab, (args.micro, args.seq), generator=g)
        labels = torch.randint(0, vocab, (args.micro, args.seq), generator=g)
        out.append((tokens.to(device), labels.to(device)))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ours(arm: str, args: argparse.Namespace, mesh: Any, device: torch.device) -> tuple[Callable[[], float], nn.Module]:
    virtual = args.virtual if arm == "interleaved" else 1
    layout = PPLayout(PPLayout.Config(schedule=arm, virtual_stages=virtual))
    stage = layout.apply(_model(args), mesh)
    _fill(stage, device)
    batches = [(t, y, BlockContext()) for t, y in _batches(args, args.vocab, device)]
    precision = _Precision(device)

    def step() -> float:
        loss = layout.forward_backward(stage, batches, precision=precision, no_grad_sync=contextlib.nullcontext)
        layout.finish_grad_sync()
        stage.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, stage


class _Plain(nn.Module):
    """A stage as torch's pipelining calls it: activations in, activations (or full logits) out."""

    def __init__(self, stage: nn.Module, first: bool) -> None:
        super().__init__()
        self.stage, self.first = stage, first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x if self.first else torch.zeros(x.shape[:2], dtype=torch.int64, device=x.device)  # positions only
        return self.stage(x, tokens=tokens, labels=None, ctx=BlockContext())  # type: ignore[no-any-return]


def _torch(
    arm: str, args: argparse.Namespace, mesh: Any, device: torch.device
) -> tuple[Callable[[], float], nn.Module]:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    pp, rank = mesh.size("pp"), mesh.rank("pp")
    virtual = args.virtual if arm == "torch-interleaved" else 1
    model = _model(args)
    ranges = stage_ranges(stage_counts(model.stage_layers(), pp, virtual))
    total = pp * virtual
    mods, stages = [], []
    for s in rank_stages(rank, pp, virtual):
        mod = _Plain(model.pipeline_stage(ranges[s], first=s == 0, last=s == total - 1), s == 0)
        _fill(mod.stage, device)
        mods.append(mod)
        stages.append(PipelineStage(mod, s, total, device, group=mesh.group("pp")))
    precision = _Precision(device)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    n = args.micro_batches
    if virtual == 1:
        schedule: Any = Schedule1F1B(stages[0], n, loss_fn=loss_fn)
    else:
        schedule = ScheduleInterleaved1F1B(stages, n, loss_fn=loss_fn)
    batches = _batches(args, args.vocab, device)
    tokens = torch.cat([t for t, _ in batches])
    labels = torch.cat([y for _, y in batches])
    holder = StageChunks([m.stage for m in mods]) if len(mods) > 1 else mods[0]

    def step() -> float:
        losses: list[torch.Tensor] = []
        with precision.autocast():
            if rank == 0:
                schedule.step(tokens, target=labels, losses=losses)
            else:
                schedule.step(target=labels, losses=losses)
        mean = torch.stack(losses).float().mean() if losses else torch.zeros((), device=device)
        dist.all_reduce(mean, group=mesh.group("pp"))  # only the last stage holds the losses
        holder.zero_grad(set_to_none=True)
        return float(mean.detach())

    return step, holder


def _peak(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    return {"rss_gib": rss, "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _round(arm: str, args: argparse.Namespace, mesh: Any, device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    make = _ours if arm in OURS else _torch
    step, _ = make(arm, args, mesh, device)
    first = step()
    for _ in range(args.warmup - 1):
        step()
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    took = torch.tensor([(time.perf_counter() - start) / args.steps])
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, _peak(device))
    return {"first_loss": first, "step_s": float(took), "memory_per_stage": every}


def _timeline(arm: str, pp: int, m: int, v: int) -> Timeline:
    schedule = arm.removeprefix("torch-")
    virtual = v if schedule == "interleaved" else 1
    lists = with_comms(build(schedule, pp, m, virtual), pp, pp * virtual)
    return simulate(lists, unit_costs(schedule, virtual), stages=pp * virtual, micro_batches=m)


def _simulated(arm: str, pp: int, m: int, v: int) -> float:
    return _timeline(arm, pp, m, v).bubble


def bubble_table(pps: tuple[int, ...] = (2, 4, 8), ms: tuple[int, ...] = (8, 16, 32), v: int = 2) -> str:
    """The markdown table of simulated bubble shares against theory (unit costs; no torch.distributed)."""
    rows = ["| pp | m | 1F1B sim / theory | interleaved v=2 sim / theory | ZB-H1 sim / theory | ZB-H1 / 1F1B idle |",
            "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for p in pps:
        for m in ms:
            cells = []
            for arm in OURS:
                cells.append(f"{_simulated(arm, p, m, v):.3f} / {bubble_theory(arm, p, m, v):.3f}")
            idle = [t.makespan - t.busy[0] for t in (_timeline("1f1b", p, m, v), _timeline("zb-h1", p, m, v))]
            rows.append(f"| {p} | {m} | {' | '.join(cells)} | {idle[1] / idle[0]:.2f} |")  # idle time per rank
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset, 8 layers, seq 32 (CPU proof)")
    parser.add_argument("--layers", type=int, default=0, help="override the preset's layer count (0: keep it)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro", type=int, default=1, help="rows per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=16)
    parser.add_argument("--virtual", type=int, default=2, help="stages per rank of the interleaved arms")
    parser.add_argument("--arms", nargs="+", default=[*OURS, *TORCH])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="")
    parser.add_argument("--table", action="store_true", help="print the simulated bubble table and exit")
    args = parser.parse_args()
    if args.table:
        print(bubble_table())
        return
    if args.tiny:
        args.model, args.layers, args.seq = "tiny", args.layers or 8, 32
        args.micro_batches, args.rounds, args.steps, args.warmup = 4, 2, 2, 1
    args.vocab = preset_config(args.model).vocab_size
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    pp = dist.get_world_size()
    mesh = build_mesh(("pp",), {}, fill="pp", device_type=device.type)
    header = {"bench": "pp", "model": args.model, "pp": pp, "seq": args.seq, "micro": args.micro,
              "micro_batches": args.micro_batches, "virtual": args.virtual, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}  # fmt: skip
    lines = [header]
    results: dict[str, dict[str, Any]] = {arm: {"times": []} for arm in args.arms}
    for r in range(args.rounds):
        order = args.arms[r % len(args.arms) :] + args.arms[: r % len(args.arms)]
        for arm in order:
            entry = results[arm]
            if "status" in entry:
                continue
            try:
                out = _round(arm, args, mesh, device)
            except (UserError, ValueError) as exc:
                entry["status"] = f"not available: {' '.join(str(exc).split())}"
                continue
            entry["times"].append(out["step_s"])
            entry.setdefault("first_loss", out["first_loss"])
            entry["memory_per_stage"] = out["memory_per_stage"]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    tokens = args.micro * args.seq * args.micro_batches
    first = next((e["first_loss"] for e in results.values() if "first_loss" in e), None)
    tol = 1e-3 if device.type == "cuda" else 1e-5
    for arm in args.arms:
        entry = results[arm]
        line: dict[str, Any] = {"arm": arm}
        if "status" in entry:
            line["status"] = entry["status"]
        else:
            med = statistics.median(entry["times"])
            line.update(
                status="ok",
                median_step_ms=med * 1e3,
                min_step_ms=min(entry["times"]) * 1e3,
                max_step_ms=max(entry["times"]) * 1e3,
                tokens_per_s=tokens / med,
                tokens_per_s_per_gpu=tokens / med / pp,
                bubble_sim=_simulated(arm, pp, args.micro_batches, args.virtual),
                first_loss=entry["first_loss"],
                loss_agrees=abs(entry["first_loss"] - first) <= tol * abs(first),  # type: ignore[operator]
                memory_per_stage=entry["memory_per_stage"],
            )
        lines.append(line)
    if dist.get_rank() == 0:
        text = "\n".join(json.dumps(line) for line in lines)
        print(text, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
