"""The run loop: data -> micro-batches -> forward/backward -> sync -> checks -> step -> log/save.

One optimizer step:

1. this data-parallel rank's micro-batches for the step (a pure function of the seed and step);
2. forward/backward of each micro-batch under the recipe's autocast, the scaled loss divided
   by the number of micro-batches; every layout's ``no_grad_sync`` is held for all but the
   last micro-batch, then ``finish_grad_sync``;
3. ``unscale_grads`` and the finiteness of the gradients agreed by all ranks, the loss
   averaged over all ranks, the global gradient norm (and clipping);
4. the NaN/spike policy, then the optimizer step with the LR of the schedule, ``update`` and
   ``after_step`` of the recipe;
5. metrics, lifecycle hooks, periodic eval and checkpoints.

Resume restores model, optimizer, recipe, RNG and step; the schedule and the sampler are
functions of the step, so the resumed run continues exactly where the first one was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mcore.checkpoint.state import rng_state, set_rng_state
from mcore.checkpoint.store import CheckpointManager, latest_checkpoint, load_checkpoint
from mcore.config import RunConfig
from mcore.data.packing import PackedRows
from mcore.data.pipeline import TrainData, build_train_data
from mcore.data.tokenizer import Tokenizer, load_tokenizer
from mcore.errors import ConfigError, UserError
from mcore.observe.layer_stats import LayerStats
from mcore.observe.memory import current_memory_gb
from mcore.observe.metrics import MetricsWriter, read_metrics
from mcore.observe.plot import plot_run
from mcore.observe.progress import Progress
from mcore.protocols.block import BlockContext
from mcore.train.build import Parts, build_parts
from mcore.train.grads import clip_grads_, global_grad_norm, mesh_all_reduce
from mcore.train.health import Health, TrainingHalted

#: Peak dense bf16 TFLOP/s of known devices, for MFU when ``log.peak_tflops`` is not given.
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0, "GB200": 2500.0, "L40S": 362.0}


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


def check_vocab(config: RunConfig, tokenizer: Tokenizer) -> None:
    vocab = getattr(config.model.config, "vocab_size", None)
    if vocab is not None and vocab < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size = {vocab} is smaller than the vocabulary of data.tokenizer = {config.data.tokenizer!r} "
            f"({tokenizer.vocab_size}); set --model.vocab_size={tokenizer.vocab_size} or larger"
        )


def to_batch(rows: PackedRows, parts: Parts, thd: bool) -> tuple[torch.Tensor, torch.Tensor, BlockContext]:
    device = parts.mesh.device
    tokens = torch.from_numpy(rows.tokens).to(device)  # (B, T)
    labels = torch.from_numpy(rows.labels).to(device)  # (B, T)
    ctx = BlockContext(
        positions=torch.from_numpy(rows.positions).to(device),  # (B, T)
        cu_seqlens=torch.from_numpy(rows.cu_seqlens).to(device) if thd else None,  # (D + 1,)
        max_seqlen=rows.max_seqlen if thd else None,
        token_ids=tokens,
        mesh=parts.mesh,
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


class Trainer:
    def __init__(self, config: RunConfig, host: Any) -> None:
        self.config, self.host = config, host
        self.train = config.train
        self.out_dir = Path(config.train.out_dir)
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        check_vocab(config, self.tokenizer)
        if config.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(config.train.seed)
        self.parts = build_parts(config, host)
        mesh = self.parts.mesh
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.is_main = self.rank == 0
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(self.out_dir / "tokenizer")
        torch.manual_seed(config.train.seed + self.rank)  # dropout etc. differ per rank; weights do not
        self.data: TrainData = build_train_data(
            config.data,
            config.train,
            self.tokenizer,
            dp_rank=self.parts.dp.rank,
            dp_size=self.parts.dp.size,
            is_writer=self.is_main,
            barrier=self.barrier,
        )
        impl = host.get("lr_schedule", config.train.lr_schedule)
        self.schedule = impl.load()(
            total_steps=config.train.steps,
            warmup_steps=config.train.warmup_steps,
            min_lr_ratio=config.train.min_lr_ratio,
            decay_fraction=config.train.decay_fraction,
        )
        self.base_lrs = [g["lr"] for g in self.parts.optimizer.param_groups]
        self.params = [p for p in self.parts.model.parameters() if p.requires_grad]
        self.health = Health(config.train.spike_factor, config.train.spike_warmup_steps, config.train.max_skipped_steps)
        ckpt_group = dist.new_group(backend="gloo") if mesh.world_size > 1 else None
        self.ckpt = CheckpointManager(
            self.out_dir / "checkpoints",
            keep_last=config.checkpoint.keep_last,
            async_save=config.checkpoint.async_save,
            rank=self.rank,
            world_size=mesh.world_size,
            group=ckpt_group,
            on_saved=lambda step, path: host.hook.mcore_checkpoint_saved(step=step, path=str(path)),
        )
        factory = self.parts.factory
        fpt = getattr(factory, "flops_per_token", None)
        self.flops_per_token = float(fpt(config.model.config, config.train.seq_len)) if callable(fpt) else None
        self.peak = peak_flops(config, mesh.device)
        self.step = 0

    # -- helpers ------------------------------------------------------------------------------
    def barrier(self) -> None:
        mesh_all_reduce(torch.zeros(1, device=self.parts.mesh.device), self.parts.mesh)

    def world_mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.parts.mesh.device)
        mesh_all_reduce(t, self.parts.mesh)
        return float(t.item()) / self.parts.mesh.world_size

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
        p = self.parts
        self.ckpt.save(
            step,
            model=p.model,
            optimizer=p.optimizer,
            precision=p.precision,
            meta=self.meta(),
            rank_extra={"rng": rng_state()},
            blocking=blocking,
        )

    def resume(self) -> int:
        spec = self.train.resume
        if not spec:
            return 0
        if spec == "latest":
            path = latest_checkpoint(self.out_dir / "checkpoints")
            if path is None:
                return 0
        else:
            path = Path(spec)
        p = self.parts
        meta, rank_json = load_checkpoint(
            path,
            model=p.model,
            optimizer=p.optimizer,
            precision=p.precision,
            rank=self.rank,
            group=self.ckpt.group,
            world_size=p.mesh.world_size,
        )
        if meta.get("model_name") != self.config.model.name:
            raise UserError(
                f"checkpoint {path} is of model {meta.get('model_name')!r}, this run builds {self.config.model.name!r}; "
                "set model.name to match or start a fresh run (another train.out_dir)"
            )
        if meta.get("world_size") == p.mesh.world_size and "rng" in rank_json:
            set_rng_state(rank_json["rng"])
        self.health.load(meta.get("health", {}))
        return int(meta["step"])

    # -- one step -------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, Any]:
        p = self.parts
        t0 = time.perf_counter()
        lr = self.set_lr(step)
        p.optimizer.zero_grad(set_to_none=True)
        micro = self.data.micro_batches(step)
        local_loss = 0.0
        for i, rows in enumerate(micro):
            tokens, labels, ctx = to_batch(rows, p, self.data.thd)
            with contextlib.ExitStack() as stack:
                if i < len(micro) - 1:
                    for layout in p.layouts:
                        stack.enter_context(layout.no_grad_sync())
                with p.precision.autocast():
                    loss = p.model(tokens, labels=labels, ctx=ctx)
                p.precision.scale_loss(loss / len(micro)).backward()
            local_loss += float(loss.detach()) / len(micro)
        for layout in p.layouts:
            layout.finish_grad_sync()
        finite = torch.tensor([1.0 if p.precision.unscale_grads(p.model) else 0.0], device=p.mesh.device)
        grads_finite = bool(mesh_all_reduce(finite, p.mesh, "min").item() > 0)
        loss_value = self.world_mean(local_loss)
        grad_norm = float(global_grad_norm(self.params)) if grads_finite else math.nan
        problem = self.health.verdict(loss_value, grads_finite)
        if problem is None:
            if self.train.grad_clip > 0:
                clip_grads_(self.params, self.train.grad_clip, torch.tensor(grad_norm))
            p.optimizer.step()
            self.health.good(loss_value)
        p.precision.update()
        if problem is None:
            p.precision.after_step(p.model)
        dt = time.perf_counter() - t0
        tokens_per_s = self.train.global_batch_size * self.train.seq_len / dt
        metrics: dict[str, Any] = {
            "step": step + 1,
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

    @torch.no_grad()
    def evaluate(self) -> float | None:
        p = self.parts
        batches = self.data.eval_batches(self.train.eval_batches, self.parts.dp.rank, self.parts.dp.size)
        if not batches:
            return None
        p.model.eval()
        total = 0.0
        for rows in batches:
            tokens, labels, ctx = to_batch(rows, p, self.data.thd)
            with p.precision.autocast():
                total += float(p.model(tokens, labels=labels, ctx=ctx))
        p.model.train()
        return self.world_mean(total / len(batches))

    # -- the run --------------------------------------------------------------------------------
    def run(self, stop_at_step: int | None = None) -> RunResult:
        cfg, p = self.config, self.parts
        start = self.resume()
        end = cfg.train.steps if stop_at_step is None else min(cfg.train.steps, stop_at_step)
        metrics_file = self.out_dir / "metrics.jsonl"
        if self.is_main and start > 0:  # drop what the interrupted run logged after its checkpoint
            kept = [r for r in read_metrics(metrics_file) if r.get("step", 0) <= start]
            metrics_file.write_text("".join(json.dumps(r) + "\n" for r in kept))
        writer = MetricsWriter(self.out_dir, tensorboard=cfg.log.tensorboard, enabled=self.is_main, append=start > 0)
        progress = Progress(cfg.log.progress, cfg.train.steps, start, enabled=self.is_main)
        layer_stats = LayerStats(
            p.model, self.out_dir / "layer_stats.jsonl", enabled=cfg.log.layer_stats_every > 0 and self.is_main
        )
        result = RunResult(out_dir=self.out_dir, start_step=start, steps_done=start)
        self.host.hook.mcore_run_start(config=cfg, mesh=p.mesh)
        t_start = time.perf_counter()
        tokens_seen = 0
        metrics: dict[str, Any] = {}
        try:
            for step in range(start, end):
                if cfg.log.layer_stats_every and (step + 1) % cfg.log.layer_stats_every == 0:
                    layer_stats.begin()
                metrics = self.train_step(step)
                layer_stats.end(step + 1)
                tokens_seen += cfg.train.global_batch_size * cfg.train.seq_len
                elapsed = time.perf_counter() - t_start
                metrics["eta_s"] = elapsed / (step + 1 - start) * (cfg.train.steps - step - 1)
                result.losses[step + 1] = metrics["loss"]
                result.steps_done = step + 1
                if metrics["skipped"]:
                    self.handle_bad_step(step, metrics, progress)
                if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
                    ev = self.evaluate()
                    if ev is not None:
                        metrics["eval_loss"] = ev
                        result.eval_losses[step + 1] = ev
                self.host.hook.mcore_step_end(step=step + 1, metrics=metrics)
                if (step + 1) % cfg.log.every == 0 or step + 1 == end or step == start or "eval_loss" in metrics:
                    writer.write({k: v for k, v in metrics.items() if k not in ("eta_s",)})
                    progress.update(metrics)
                if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and step + 1 < end:
                    self.save(step + 1)
            if cfg.checkpoint.save_final and end > start:
                self.save(end)
            result.last_checkpoint = self.ckpt.wait()
        finally:
            progress.close()
            writer.close()
            with contextlib.suppress(UserError):
                self.ckpt.wait()
        result.wall_s = time.perf_counter() - t_start
        result.tokens_per_s = tokens_seen / result.wall_s if result.wall_s > 0 else 0.0
        if self.is_main and cfg.log.plot:
            result.plot = plot_run(metrics_file, self.out_dir / "checkpoints" / "loss.png")
        self.host.hook.mcore_run_end(step=result.steps_done, metrics=metrics)
        return result

    def handle_bad_step(self, step: int, metrics: dict[str, Any], progress: Progress) -> None:
        problem = metrics["problem"]
        self.health.bad()
        if self.train.nan_policy == "stop":
            self.save(step, blocking=True)  # the model still holds the state before this step
            raise TrainingHalted(
                f"training stopped at step {step + 1}: {problem} (train.nan_policy = 'stop'). The last good state is "
                f"saved in {self.ckpt.last_good}; lower optimizer.lr or raise train.warmup_steps, then resume with "
                "--train.resume=latest"
            )
        message = f"step {step + 1} skipped: {problem} (train.nan_policy = 'skip')"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        progress.message(message)
        if self.health.skipped_in_row > self.train.max_skipped_steps:
            self.save(step, blocking=True)
            raise TrainingHalted(
                f"training stopped at step {step + 1}: {self.health.skipped_in_row} bad steps in a row "
                f"(train.max_skipped_steps = {self.train.max_skipped_steps}); last: {problem}. The last good state is in "
                f"{self.ckpt.last_good}; lower optimizer.lr, then resume with --train.resume=latest"
            )


def run(config: RunConfig, host: Any, *, stop_at_step: int | None = None) -> RunResult:
    """Train ``config``; ``stop_at_step`` ends early (the schedule still spans ``train.steps``)."""
    previous, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if config.train.cpu_threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(config.train.cpu_threads)
    try:
        return Trainer(config, host).run(stop_at_step=stop_at_step)
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.set_num_threads(threads)
