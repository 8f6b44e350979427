"""The run loop: data -> micro-batches -> forward/backward -> sync -> checks -> step -> log/save.

One optimizer step:

1. this data-parallel rank's micro-batches for the step (a pure function of the seed and step);
2. each micro-batch through the batch-sharding layouts (``shard_batch``, the loss group in its
   context), then forward/backward of all of them (``microbatch``): a scheduled layout's
   ``forward_backward``, or the plain loop under the recipe's autocast, the scaled loss divided
   by the number of micro-batches, every layout's ``no_grad_sync`` held for all but the last;
   then ``finish_grad_sync``;
3. ``unscale_grads`` and the finiteness of the gradients agreed by all ranks (the recipe's answer and the
   global gradient norm being finite: a NaN or Inf element makes it NaN or Inf), the loss
   averaged over all ranks (parts of one loss group summed), the global gradient norm with
   every element counted once (``grads``) and clipping (folded into the update by an optimizer that
   takes the factor, ``ScaledStep``);
4. the NaN/spike policy (decided on the device, so an optimizer that can skip there, ``GuardedStep``, is
   queued before the host reads the decision), then the optimizer step with the LR of the schedule, the model's
   post-step hooks (``AfterOptimizerStep``: state such as MoE routing biases, reduced over the
   ranks that saw distinct tokens), ``update`` and ``after_step`` of the recipe;
5. metrics, lifecycle hooks, periodic eval and checkpoints.

Where the run starts is decided first, from what ``train.out_dir`` holds (``rundir``): the
first line printed says whether it starts fresh, resumes (from which checkpoint) or has nothing
to do. Resume restores model, optimizer, recipe, RNG and step; the schedule and the sampler
are functions of the step, so the resumed run continues exactly where the first one was.

Each phase of a step runs under ``HangGuard.phase`` (a timed-out collective ends every rank
with a message naming the phase and the late ranks), a CUDA out-of-memory error becomes one
line (``oom``), and SIGTERM stops the run after the current step with a checkpoint
(``signals``; the flag rides on the step's loss all-reduce, so all ranks stop together).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mcore.checkpoint.finite import first_non_finite
from mcore.checkpoint.state import rng_state, set_rng_state, split_state
from mcore.checkpoint.store import STEP_DIR, CheckpointManager, NonFiniteStateError, list_checkpoints, load_checkpoint
from mcore.config import RunConfig
from mcore.data.packing import PackedRows
from mcore.data.pipeline import TrainData, build_train_data
from mcore.data.tokenizer import Tokenizer, load_tokenizer
from mcore.errors import ConfigError, UserError
from mcore.mesh import world_from_env
from mcore.observe.layer_stats import LayerStats
from mcore.observe.memory import current_memory_gb
from mcore.observe.metrics import MetricsWriter
from mcore.observe.plot import plot_run
from mcore.observe.profile import StepProfiler
from mcore.observe.progress import Progress
from mcore.protocols.block import BlockContext
from mcore.protocols.optimizer import GuardedStep, ScaledStep
from mcore.train.build import Parts, build_parts
from mcore.train.grads import clip_factor, clip_grads_, global_grad_norm, mesh_all_reduce
from mcore.train.hangs import HangGuard
from mcore.train.health import Health, TrainingHalted
from mcore.train.microbatch import StepLayouts, classify, forward_backward, forward_only, shard
from mcore.train.oom import OutOfMemory, oom_message
from mcore.train.rundir import StartPlan, carry_out, plan_start, set_aside
from mcore.train.signals import StopSignal
from mcore.train.step_hooks import after_optimizer_step, metric_modules, post_step_modules, step_metrics, token_groups

#: Peak dense bf16 TFLOP/s of known devices, for MFU when ``log.peak_tflops`` is not given.
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0, "GB200": 2500.0, "L40S": 362.0}


#: A loss read on the host (float) or kept on the device (0-d fp64 tensor): ``loss_mean`` takes either.
LossValue = TypeVar("LossValue", float, torch.Tensor)


def model_flops_per_token(factory: Any, config: RunConfig, host: Any) -> float | None:
    """The factory's ``flops_per_token`` for this run (``None`` without one); blocks of other plugins
    are found through the registry when the factory takes ``block_lookup``."""
    fpt = getattr(factory, "flops_per_token", None)
    if not callable(fpt):
        return None
    kwargs: dict[str, Any] = {}
    if "block_lookup" in inspect.signature(fpt).parameters:
        kwargs["block_lookup"] = lambda name: host.load("block", name)
    return float(fpt(config.model.config, config.train.seq_len, **kwargs))


def device_flag(value: bool, device: torch.device) -> torch.Tensor:
    """``1.0`` or ``0.0`` as a 0-d fp64 tensor made on ``device`` (a fill, not a copy from the host)."""
    return torch.full((), 1.0 if value else 0.0, dtype=torch.float64, device=device)


def read_later(values: torch.Tensor) -> Callable[[], list[float]]:
    """``values`` (a 1-d device tensor) read by the returned call without waiting for work queued after this one:
    on CUDA copied now into pinned host memory behind an event, so reading them after the optimizer's kernels are
    queued waits for the copy only, not for them (the GPU runs the update while the host reads, logs and queues
    the next step's first kernels, instead of idling while it does)."""
    if values.device.type != "cuda":
        return lambda: [float(x) for x in values.tolist()]
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> list[float]:
        copied.synchronize()
        return [float(x) for x in host.tolist()]

    return read


def not_finite_flag(finite: bool | torch.Tensor, norm: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``1.0`` when a recipe's ``unscale_grads`` answer (a bool, or a 0-d bool tensor: no host sync) says this
    rank's gradients are not all finite, or the global gradient norm (``global_grad_norm``, the same on every rank)
    is NaN or Inf: any NaN or Inf gradient element makes it so, which is how a plain recipe's answer is judged
    without a pass of its own (``finite_from_norm``); a 0-d fp64 device tensor."""
    bad = torch.logical_not(torch.isfinite(norm.to(device)))
    if isinstance(finite, torch.Tensor):
        bad = bad | torch.logical_not(finite.to(device))
    elif not finite:
        bad = torch.ones_like(bad)
    return bad.double()


@dataclass
class RunResult:
    """What a finished run reports (the same numbers are in ``metrics.jsonl``)."""

    out_dir: Path
    start_step: int
    steps_done: int
    losses: dict[int, float] = field(default_factory=dict)
    eval_losses: dict[int, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    plot: Path | None = None
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    stopped_by: str | None = None  # the signal that ended the run early ("SIGTERM"), after a checkpoint


def check_vocab(config: RunConfig, tokenizer: Tokenizer) -> None:
    vocab = getattr(config.model.config, "vocab_size", None)
    if vocab is not None and vocab < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size = {vocab} is smaller than the vocabulary of data.tokenizer = {config.data.tokenizer!r} "
            f"({tokenizer.vocab_size}); set --model.vocab_size={tokenizer.vocab_size} or larger"
        )


def to_device(array: Any, device: torch.device) -> torch.Tensor:
    """A host array on ``device``. To CUDA through pinned memory without waiting: a copy from pageable
    memory first waits for the stream's queued work (the previous step's optimizer), leaving the GPU idle
    while the host then queues the next forward; torch's pinned-memory cache keeps the staging buffer
    until the copy is done."""
    host = torch.from_numpy(array)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def to_batch(
    rows: PackedRows, parts: Parts, thd: bool, attention: Any = None
) -> tuple[torch.Tensor, torch.Tensor, BlockContext]:
    device = parts.mesh.device
    tokens = to_device(rows.tokens, device)  # (B, T)
    labels = to_device(rows.labels, device)  # (B, T)
    ctx = BlockContext(
        positions=to_device(rows.positions, device),  # (B, T)
        cu_seqlens=to_device(rows.cu_seqlens, device) if thd else None,  # (D + 1,)
        max_seqlen=rows.max_seqlen if thd else None,
        token_ids=tokens,
        mesh=parts.mesh,
        attention=attention,
        precision=parts.precision,
    )
    return tokens, labels, ctx


def peak_flops(config: RunConfig, device: torch.device) -> float | None:
    if config.log.peak_tflops is not None:
        return config.log.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def trim_jsonl(path: Path, last_step: int) -> None:
    """Drop the records of ``path`` after ``last_step`` (what an interrupted run logged past its checkpoint).

    Lines that are not a JSON object with an integer (or absent) ``step`` (a line cut short by a crash,
    NUL bytes a full disk left, a stray ``[1, 2]``) are moved to ``<path>.bad`` with one warning: resuming
    never fails on the run's own log.
    """
    if not path.is_file():
        return
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read '{path}' to resume the run ({exc.strerror or exc}); fix or remove it") from None
    kept: list[str] = []
    bad: list[str] = []
    for raw in data.split(b"\n"):
        line = raw.decode("utf-8", errors="replace")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        step = record.get("step", 0) if isinstance(record, dict) else None
        if not isinstance(step, (int, float)) or isinstance(step, bool) or not math.isfinite(step):
            bad.append(line)
        elif step <= last_step:
            kept.append(json.dumps(record))
    if bad:
        aside = path.with_name(path.name + ".bad")
        with aside.open("a", encoding="utf-8") as f:
            f.write("".join(b.replace("\x00", "") + "\n" for b in bad))
        warnings.warn(
            f"{path}: {len(bad)} line(s) that are not JSON records (cut short or corrupted) were moved to {aside}",
            RuntimeWarning,
            stacklevel=2,
        )
    path.write_text("".join(r + "\n" for r in kept))


class Trainer:
    def __init__(self, config: RunConfig, host: Any, start: StartPlan) -> None:
        self.config, self.host, self.start = config, host, start
        self.train = config.train
        self.out_dir = start.out_dir
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        check_vocab(config, self.tokenizer)
        name = config.train.attention  # "auto": each attention block's own default (None in the context)
        self.attention = None if name == "auto" else host.get("attention", name).load()()
        torch.manual_seed(config.train.seed)
        self.parts = build_parts(config, host)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_main = self.rank == 0
        self.guard = HangGuard.for_run(config.parallel.timeout_s)
        try:
            self.prepare(config, host, start)
        except BaseException:
            self.guard.close()  # its heartbeat thread must not outlive a run that never started
            raise

    def prepare(self, config: RunConfig, host: Any, start: StartPlan) -> None:
        """Everything after the process groups: the run directory, the data, the step's parts, checkpointing."""
        mesh = self.parts.mesh
        if start.move or start.copy:
            with self.guard.phase("setting the previous run aside"):
                self.barrier()  # every rank has read the directory before rank 0 changes it
                if self.is_main:
                    carry_out(start)
                self.barrier()
        if self.is_main:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self.tokenizer.save(self.out_dir / "tokenizer")
            except OSError as exc:  # a path the system will not create (/proc/x) or a full disk: one line
                raise UserError(
                    f"train.out_dir = {str(self.out_dir)!r}: cannot write the run there ({exc.strerror or exc}); "
                    "give a directory you can write"
                ) from None
        torch.manual_seed(config.train.seed + self.rank)  # dropout etc. differ per rank; weights do not
        with self.guard.phase("data preparation (rank 0 tokenizes data.source while the other ranks wait)"):
            self.data: TrainData = build_train_data(
                config.data,
                config.train,
                self.tokenizer,
                dp_rank=self.parts.dp.rank,
                dp_size=self.parts.dp.size,
                is_writer=self.is_main,
                barrier=self.barrier,
                vocab_size=getattr(config.model.config, "vocab_size", None),
            )
        impl = host.get("lr_schedule", config.train.lr_schedule)
        self.schedule = impl.load()(
            total_steps=config.train.steps,
            warmup_steps=config.train.warmup_steps,
            min_lr_ratio=config.train.min_lr_ratio,
            decay_fraction=config.train.decay_fraction,
        )
        self.base_lrs = [g["lr"] for g in self.parts.optimizer.param_groups]
        self.named_params = [(n, p) for n, p in self.parts.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named_params]
        self.step_layouts: StepLayouts = classify(self.parts.layouts, config.parallel.layouts)
        self.token_groups = token_groups(self.parts.layouts, config.parallel.layouts, self.step_layouts)
        self.post_step = post_step_modules(self.parts.model)
        self.metric_modules = metric_modules(self.parts.model)
        self.update_takes_finite = "finite" in inspect.signature(self.parts.precision.update).parameters
        # the step's finiteness is judged from the global gradient norm (always computed): a recipe that only
        # scans for it is told so and skips its own pass over every gradient
        self.unscale_kwargs = (
            {"finite_from_norm": True}
            if "finite_from_norm" in inspect.signature(self.parts.precision.unscale_grads).parameters
            else {}
        )
        # whether any rank reports step metrics: a pipeline stage without such modules must still join the
        # gather of the stages' numbers (decided once, the same on every rank)
        # (a collective: under a phase, so a rank that failed before it ends the others with one line)
        with self.guard.phase("agreeing on the step metrics after data preparation"):
            reports = torch.tensor([1.0 if self.metric_modules else 0.0], device=mesh.device)
            self.step_metrics_on = bool(mesh_all_reduce(reports, mesh, "max").item() > 0)
            timeout = timedelta(seconds=config.parallel.timeout_s)
            ckpt_group = dist.new_group(backend="gloo", timeout=timeout) if mesh.world_size > 1 else None
        self.health = Health(config.train.spike_factor, config.train.spike_warmup_steps, config.train.max_skipped_steps)
        self.ckpt = CheckpointManager(
            self.out_dir / "checkpoints",
            keep_last=config.checkpoint.keep_last,
            async_save=config.checkpoint.async_save,
            rank=self.rank,
            world_size=mesh.world_size,
            group=ckpt_group,
            on_saved=lambda step, path: host.hook.mcore_checkpoint_saved(step=step, path=str(path)),
        )
        self.flops_per_token = model_flops_per_token(self.parts.factory, config, host)
        self.peak = peak_flops(config, mesh.device)
        self.stop: StopSignal | None = None  # set while the loop runs
        self.last_good_step = 0  # the newest step whose verdict was good (or the resumed-from step)
        self.stop_agreed = False  # some rank received SIGTERM during the last step
        self.prefetched: tuple[int, list[tuple[torch.Tensor, torch.Tensor, BlockContext]]] | None = None

    # -- helpers ------------------------------------------------------------------------------
    def barrier(self) -> None:
        mesh_all_reduce(torch.zeros(1, device=self.parts.mesh.device), self.parts.mesh)

    def device_batches(self, rows: list[PackedRows]) -> list[tuple[torch.Tensor, torch.Tensor, BlockContext]]:
        """Host rows -> this rank's micro-batches on the device, through the batch-sharding layouts."""
        return [shard(to_batch(r, self.parts, self.data.thd, self.attention), self.step_layouts) for r in rows]

    def step_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, BlockContext]]:
        """Step ``step``'s micro-batches on the device: the ones ``prefetch`` queued during the step before, or
        made now."""
        ready, self.prefetched = self.prefetched, None
        if ready is not None and ready[0] == step:
            return ready[1]
        return self.device_batches(self.data.micro_batches(step))

    def prefetch(self, step: int) -> None:
        """Make step ``step``'s micro-batches now (rows packed on the host, copied, block masks queued), while
        the device still runs this step's backward: the host work of a step start no longer leaves the device
        idle. The batches are a pure function of the step (``TrainData.micro_batches``), so nothing a
        checkpoint records moves; a step that never comes (the last, a stop) just drops them."""
        if step < self.train.steps:
            self.prefetched = (step, self.device_batches(self.data.micro_batches(step)))

    def token_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum ``value`` in place over the ranks that saw distinct tokens of the step (``AfterOptimizerStep``)."""
        for group in self.token_groups:
            dist.all_reduce(value, group=group)
        return value

    def module_metrics(self) -> dict[str, float]:
        """The model's ``step_metrics`` for the step just ended (MoE loads), gathered over pipeline stages."""
        with self.guard.phase("step metrics"):
            return step_metrics(self.metric_modules, self.token_sum, gather=self.step_layouts.scheduled is not None)

    def loss_mean(self, share_sum: LossValue) -> LossValue:
        """The batch's mean loss from the ranks' summed loss shares: the ranks of a loss group hold
        parts of one micro-batch, every other rank a copy or another batch (``microbatch``)."""
        return share_sum * self.step_layouts.loss_group_size() / self.parts.mesh.world_size

    def set_lr(self, step: int) -> float:
        factor = self.schedule.factor(step)
        for group, base in zip(self.parts.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return self.base_lrs[0] * factor

    def meta(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "model_name": self.config.model.name,
            "tokenizer": self.tokenizer.describe(),
            "health": self.health.state(),
            "sampler": {"kind": "blended", "seed": self.train.seed, "global_batch_size": self.train.global_batch_size},
            "format": "mcore-checkpoint-1",
        }

    def save(self, step: int, *, blocking: bool = False) -> None:
        """Checkpoint the state after ``step`` steps; ``NonFiniteStateError`` (nothing written) if it is not finite."""
        p = self.parts
        with self.guard.phase(f"checkpoint save of step {step}"):
            self.ckpt.save(
                step,
                model=p.model,
                optimizer=p.optimizer,
                precision=p.precision,
                meta=self.meta(),
                rank_extra={"rng": rng_state()},
                blocking=blocking,
            )

    def checkpoint(self, step: int, *, blocking: bool = False) -> None:
        """A periodic, final or stop checkpoint: state that is not finite ends the run instead."""
        try:
            self.save(step, blocking=blocking)
        except NonFiniteStateError as exc:
            raise TrainingHalted(f"training stopped after step {step}: {exc}; {self.after_stop()}") from None

    def wait_for_saves(self) -> Path | None:
        with self.guard.phase("a background checkpoint save"):
            return self.ckpt.wait()

    def after_stop(self) -> str:
        """Which checkpoint to go back to after a bad step, and how; sets aside the ones that lead into it.

        A step is a function of the state before it and its (fixed) batch alone, so a checkpoint
        followed by a bad step replays that step on every resume, whatever the learning rate.
        The checkpoint to go back to is the newest one a good step followed (checkpoints are
        finite: a save refuses inf/nan; steps before the resumed-from one are taken as good, as
        the run that made them went on). Newer checkpoints of this run are moved to
        ``out_dir/previous/<time>/`` (rank 0), so running the same command again resumes from
        the good one.
        """
        self.wait_for_saves()
        root = self.out_dir / "checkpoints"
        found = [(int(m.group(1)), c) for c in list_checkpoints(root) if (m := STEP_DIR.match(c.name))]
        replays = [c for step, c in found if step >= self.last_good_step]
        if self.start.checkpoint is not None and self.start.checkpoint.parent != root:
            found.append((self.start.step, self.start.checkpoint))
        good = [(step, path) for step, path in found if step < self.last_good_step]
        moved = ""
        if replays:
            archive = set_aside(self.out_dir, replays, move=self.is_main)
            moved = f"; moved {', '.join(c.name for c in replays)}, which would replay this step, to {archive}"
        lower = "lower optimizer.lr (or raise train.warmup_steps)"
        if not good:
            return f"no checkpoint of this run was followed by a good step{moved}: {lower} and start again"
        last = max(good)[1]
        how = "run again; it resumes there" if last.parent == root else f"resume with --train.resume={last}"
        return f"the last checkpoint followed by a good step is {last}{moved}: {lower} and {how}"

    def resume(self) -> int:
        path = self.start.checkpoint
        if path is None:
            return 0
        p = self.parts
        with self.guard.phase(f"checkpoint load of step {self.start.step}"):
            meta, rank_json = load_checkpoint(
                path,
                model=p.model,
                optimizer=p.optimizer,
                precision=p.precision,
                rank=self.rank,
                group=self.ckpt.group,
                world_size=p.mesh.world_size,
                config=self.config.to_dict(),
            )
            self.check_finite_after_load(path)
        if meta.get("model_name") != self.config.model.name:
            raise UserError(
                f"checkpoint {path} is of model {meta.get('model_name')!r}, this run builds {self.config.model.name!r}; "
                "set model.name to match or start a fresh run (another train.out_dir)"
            )
        if meta.get("world_size") == p.mesh.world_size and "rng" in rank_json:
            set_rng_state(rank_json["rng"])
        # a resume that changes the optimizer or training settings (the lr the stop message told
        # the user to lower) starts counting bad steps afresh
        self.health.load(meta.get("health", {}), fresh_counter=self.start.settings_changed)
        self.ckpt.protect.add(path)  # never pruned: the known-good point this run branched from
        self.ckpt.last_good = path  # verified finite just now
        return int(meta["step"])

    def check_finite_after_load(self, path: Path) -> None:
        """Refuse a checkpoint holding inf/nan (saved before checkpoints were checked); agreed by all ranks."""
        p = self.parts
        tensors = {f"model/{k}": v for k, v in p.model.state_dict().items()}
        tensors.update(split_state(p.optimizer.state_dict(), "optimizer")[1])
        bad = first_non_finite(tensors)
        flag = torch.tensor([0.0 if bad is None else 1.0], device=p.mesh.device)
        if mesh_all_reduce(flag, p.mesh, "max").item() > 0:
            name = repr(list(tensors)[bad]) if bad is not None else "a tensor on another rank"
            raise UserError(
                f"checkpoint {path} holds inf or nan values ({name}); resume from an earlier checkpoint with "
                "--train.resume=<its directory>, or start again with --train.overwrite=true"
            )

    # -- one step -------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, Any]:
        p, n = self.parts, step + 1
        t0 = time.perf_counter()
        lr = self.set_lr(step)
        p.optimizer.zero_grad(set_to_none=True)
        with self.guard.phase(f"forward/backward of step {n}"):
            micro = self.step_batches(step)
            local_loss = forward_backward(p.model, micro, self.step_layouts, p.precision)
            del micro
        with self.guard.phase(f"gradient sync of step {n}"):
            for layout in reversed(p.layouts):  # the outermost (applied last) first: its reductions land
                layout.finish_grad_sync()
            finite_here = p.precision.unscale_grads(p.model, **self.unscale_kwargs)
        with self.guard.phase(f"preparing the batches of step {n + 1}"):
            self.prefetch(step + 1)  # before this step's first host sync (below)
        with self.guard.phase(f"gradient norm of step {n}"):
            # queued before the first host sync, so the device computes it while the host waits for the loss;
            # used (clipping on the device, the metric read later) only if every rank's gradients are finite
            norm = global_grad_norm(self.named_params, p.mesh, p.layouts)
        # one all-reduce for the loss, the gradients' finiteness and a pending stop signal, built on the
        # device (the loss share and the built-in recipes' finiteness are device tensors): reading its result
        # is the step's one host sync. The good/bad decision is made on the device from it too, so an optimizer
        # that can skip on the device (``GuardedStep``) has its update queued before that read: the GPU goes
        # from the backward to the update without waiting for the host.
        stop_here = self.stop is not None and self.stop.requested is not None
        device = p.mesh.device
        agreed = torch.stack(
            [local_loss.to(device), not_finite_flag(finite_here, norm, device), device_flag(stop_here, device)]
        )
        with self.guard.phase(f"loss all-reduce of step {n}"):
            reduced = mesh_all_reduce(agreed, p.mesh)  # (3,) fp64: loss share sum, bad ranks, stops
        ok = self.health.device_ok(self.loss_mean(reduced[0]), reduced[1])  # the same arithmetic, on the device
        # the verdict and the norm (the metric, used only if finite), copied out before the update is queued
        verdict_later = read_later(
            torch.cat([reduced, ok.reshape(1).to(reduced.dtype), norm.reshape(1).to(device, reduced.dtype)])
        )
        with self.guard.phase(f"optimizer step {n}"):
            guarded = self.device_guarded_update(ok, norm)
        with self.guard.phase(f"loss all-reduce of step {n}"):
            loss_sum, bad_ranks, stops, ok_read, norm_read = verdict_later()
        loss_value, grads_finite = self.loss_mean(loss_sum), bad_ranks == 0
        self.stop_agreed = stops > 0
        grad_norm = math.nan
        # the device's decision is the one the update followed; the host's names the reason (the same test)
        problem = None if ok_read else self.health.verdict(loss_value, grads_finite) or "the step was judged bad"
        with self.guard.phase(f"optimizer step {n}"):
            if problem is None:
                if not guarded:
                    self.optimizer_step(norm)
                self.health.good(loss_value)
            after_optimizer_step(self.post_step, self.token_sum, applied=problem is None)
            if self.update_takes_finite:  # the finiteness all ranks agreed on: every rank moves its scale alike
                p.precision.update(finite=grads_finite)
            else:
                p.precision.update()
            if problem is None:
                p.precision.after_step(p.model)
        if grads_finite:
            grad_norm = norm_read
        dt = time.perf_counter() - t0
        tokens_per_s = self.train.global_batch_size * self.train.seq_len / dt
        metrics: dict[str, Any] = {
            "step": n,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "step_time_s": dt,
            "skipped": problem is not None,
        }
        if self.flops_per_token and self.peak:
            metrics["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * p.mesh.world_size)
        metrics["memory_gb"] = current_memory_gb(p.mesh.device)
        if problem is not None:
            metrics["problem"] = problem
        return metrics

    def device_guarded_update(self, ok: torch.Tensor, norm: torch.Tensor) -> bool:
        """Queue the update guarded by the device's decision ``ok`` (``GuardedStep``: skipped on the device if the
        step is bad), with clipping's factor; ``False`` when the optimizer cannot, and nothing was done."""
        optimizer, max_norm = self.parts.optimizer, self.train.grad_clip
        if not isinstance(optimizer, GuardedStep):
            return False
        return optimizer.step_guarded(ok, clip_factor(max_norm, norm) if max_norm > 0 else None)

    def optimizer_step(self, norm: torch.Tensor) -> None:
        """The update, with clipping on the device from the norm tensor (no host sync): folded into the update by
        an optimizer that takes the factor (``ScaledStep``: one pass less over the gradients), else applied to
        ``.grad`` first."""
        optimizer, max_norm = self.parts.optimizer, self.train.grad_clip
        if max_norm > 0 and isinstance(optimizer, ScaledStep):
            optimizer.step_scaled(clip_factor(max_norm, norm))
            return
        if max_norm > 0:
            clip_grads_(self.params, max_norm, norm)
        optimizer.step()

    def out_of_memory(self, exc: BaseException, where: str) -> OutOfMemory:
        rows = self.train.micro_batch_size or self.train.global_batch_size // self.parts.dp.size
        return OutOfMemory(
            oom_message(
                exc,
                where=where,
                config=self.config,
                host=self.host,
                world_size=self.parts.mesh.world_size,
                micro_rows=rows,
            )
        )

    def guarded_step(self, step: int) -> dict[str, Any]:
        try:
            return self.train_step(step)
        except torch.OutOfMemoryError as exc:
            error = self.out_of_memory(exc, f"step {step + 1}")
        raise error

    def guarded_eval(self, step: int) -> float | None:
        try:
            with self.guard.phase(f"evaluation after step {step}"):
                return self.evaluate()
        except torch.OutOfMemoryError as exc:
            error = self.out_of_memory(exc, f"the evaluation after step {step}")
        raise error

    @torch.no_grad()
    def evaluate(self) -> float | None:
        p = self.parts
        batches = self.data.eval_batches(self.train.eval_batches, self.parts.dp.rank, self.parts.dp.size)
        if not batches:
            return None
        p.model.eval()
        share = forward_only(
            p.model,
            self.device_batches(batches),
            self.step_layouts,
            p.precision,
        )
        p.model.train()
        t = share.reshape(1).to(p.mesh.device)
        return self.loss_mean(float(mesh_all_reduce(t, p.mesh).item()))

    # -- the run --------------------------------------------------------------------------------
    def run(self, stop_at_step: int | None = None) -> RunResult:
        cfg, p = self.config, self.parts
        start = self.last_good_step = self.resume()
        end = cfg.train.steps if stop_at_step is None else min(cfg.train.steps, stop_at_step)
        metrics_file = self.out_dir / "metrics.jsonl"
        if self.is_main and start > 0:  # drop what the interrupted run logged after its checkpoint
            trim_jsonl(metrics_file, start)
            trim_jsonl(self.out_dir / "layer_stats.jsonl", start)
        writer = MetricsWriter(
            self.out_dir, tensorboard=cfg.log.tensorboard, enabled=self.is_main, append=start > 0, resumed_at=start
        )
        progress = Progress(cfg.log.progress, cfg.train.steps, start, enabled=self.is_main)
        layer_stats = LayerStats(
            p.model, self.out_dir / "layer_stats.jsonl", enabled=cfg.log.layer_stats_every > 0 and self.is_main
        )
        profiler = StepProfiler(
            self.out_dir, first=cfg.log.profile_from, steps=cfg.log.profile_steps, rank=self.rank, device=p.mesh.device
        )
        result = RunResult(out_dir=self.out_dir, start_step=start, steps_done=start)
        self.host.hook.mcore_run_start(config=cfg, mesh=p.mesh)
        t_start = time.perf_counter()
        tokens_seen = 0
        metrics: dict[str, Any] = {}
        try:
            with StopSignal() as self.stop:
                for step in range(start, end):
                    if cfg.log.layer_stats_every and (step + 1) % cfg.log.layer_stats_every == 0:
                        layer_stats.begin()
                    profiler.begin(step + 1)
                    metrics = self.guarded_step(step)
                    profiler.end(step + 1)
                    layer_stats.end(step + 1)
                    tokens_seen += cfg.train.global_batch_size * cfg.train.seq_len
                    elapsed = time.perf_counter() - t_start
                    metrics["eta_s"] = elapsed / (step + 1 - start) * (cfg.train.steps - step - 1)
                    result.losses[step + 1] = metrics["loss"]
                    result.steps_done = step + 1
                    if metrics["skipped"]:
                        self.handle_bad_step(step, metrics, progress)
                    else:
                        self.last_good_step = step + 1
                    if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
                        ev = self.guarded_eval(step + 1)
                        if ev is not None:
                            metrics["eval_loss"] = ev
                            result.eval_losses[step + 1] = ev
                    self.host.hook.mcore_step_end(step=step + 1, metrics=metrics)
                    stopping = self.stop_agreed
                    if (
                        (step + 1) % cfg.log.every == 0
                        or step + 1 == end
                        or step == start
                        or "eval_loss" in metrics
                        or stopping
                    ):
                        if self.step_metrics_on:  # a collective: every rank, on the logged steps
                            metrics.update(self.module_metrics())
                        writer.write({k: v for k, v in metrics.items() if k not in ("eta_s",)})
                        progress.update(metrics)
                    if stopping:  # every rank saw the signal in this step's all-reduce: stop here, together
                        self.checkpoint(step + 1, blocking=True)
                        result.stopped_by = self.stop.requested or "a signal on another rank"
                        break
                    if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and step + 1 < end:
                        self.checkpoint(step + 1)
                else:
                    if cfg.checkpoint.save_final and end > start:
                        self.checkpoint(end)
                result.last_checkpoint = self.wait_for_saves()
        finally:
            self.stop = None
            profiler.close()
            progress.close()
            writer.close()
            with contextlib.suppress(UserError):
                self.ckpt.wait()
        result.wall_s = time.perf_counter() - t_start
        result.tokens_per_s = tokens_seen / result.wall_s if result.wall_s > 0 else 0.0
        if self.is_main and cfg.log.plot:
            result.plot = plot_run(metrics_file, self.out_dir / "checkpoints" / "loss.png")
        self.host.hook.mcore_run_end(step=result.steps_done, metrics=metrics)
        if result.stopped_by is not None and self.is_main:
            print(
                f"stopped by {result.stopped_by} at step {result.steps_done}; checkpoint {result.last_checkpoint}; "
                "resume with the same command",
                flush=True,
            )
        return result

    def handle_bad_step(self, step: int, metrics: dict[str, Any], progress: Progress) -> None:
        problem = metrics["problem"]
        if self.train.nan_policy == "skip" and self.health.skipped_in_row < self.train.max_skipped_steps:
            self.health.bad()
            message = f"step {step + 1} skipped: {problem} (train.nan_policy = 'skip')"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            progress.message(message)
            return
        # Nothing is saved: the state before this step produced it, and resuming from it would
        # replay the same bad step (same weights, same batch) whatever the learning rate.
        self.health.bad()
        if self.train.nan_policy == "stop":
            why = f"{problem} (train.nan_policy = 'stop')"
        else:
            why = (
                f"{self.health.skipped_in_row} bad steps in a row (train.max_skipped_steps = "
                f"{self.train.max_skipped_steps}); last: {problem}"
            )
        raise TrainingHalted(f"training stopped at step {step + 1}: {why}; {self.after_stop()}")


def run(config: RunConfig, host: Any, *, stop_at_step: int | None = None) -> RunResult:
    """Train ``config``; ``stop_at_step`` ends early (the schedule still spans ``train.steps``).

    The first line printed (rank 0) says how the run starts: fresh, resuming (from where), or
    nothing to do (the checkpoint in ``train.out_dir`` already reached ``train.steps``; then
    nothing is built and the result names that checkpoint).
    """
    start = plan_start(config)
    rank = dist.get_rank() if dist.is_initialized() else world_from_env()[0]
    if rank == 0:
        print(start.message, flush=True)
    if start.finished:
        return RunResult(
            out_dir=start.out_dir, start_step=start.step, steps_done=start.step, last_checkpoint=start.checkpoint
        )
    previous, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if config.train.cpu_threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(config.train.cpu_threads)
    if config.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        trainer = Trainer(config, host, start)
        try:
            return trainer.run(stop_at_step=stop_at_step)
        finally:
            trainer.guard.close()
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.set_num_threads(threads)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
