"""Schemas of the sections the core itself owns (``[train]``, ``[data]``, ``[parallel]``...).

Implementation-specific sections (``[model]`` beyond ``name``, ``[optimizer]`` beyond
``name``, ``[precision]`` beyond ``recipe``, ``[parallel.<layout>]``) take their schema from
the chosen implementation's ``Config`` dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """``[parallel]``: which layouts to apply, in order, and the size of each mesh dimension.

    ``sizes`` maps dimension names (``dp_replicate``, ``dp_shard``, ``cp``, ``tp``, ``pp``,
    ``ep``) to sizes; one may be -1 (or left out, for the data-parallel dimension) to take
    what remains of the world size.
    """

    layouts: list[str] = field(default_factory=lambda: ["single"])
    sizes: dict[str, int] = field(default_factory=dict)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        if not self.layouts:
            raise ValueError("parallel.layouts must name at least one layout (use 'single' for none)")
        if len(set(self.layouts)) != len(self.layouts):
            raise ValueError(f"parallel.layouts = {self.layouts!r} names a layout twice")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """``[train]``: the run loop.

    ``global_batch_size`` rows per optimizer step are split over the data-parallel ranks and
    then into micro-batches of ``micro_batch_size`` rows (gradient accumulation covers the
    rest; ``none``: each rank's whole share in one micro-batch). ``resume`` is ``"latest"`` (the newest complete checkpoint under ``out_dir``, or a
    fresh start if there is none) or a checkpoint directory. ``deterministic`` makes torch
    pick deterministic kernels (CPU runs are bit-exact for a seed either way; on CUDA it also
    sets ``CUBLAS_WORKSPACE_CONFIG``). ``cpu_threads`` > 0 sets torch's intra-op threads for a
    CPU run (0: torch's default; 1 is fastest for tiny models on a busy machine).
    """

    steps: int = 1000
    seq_len: int = 128
    global_batch_size: int = 16
    micro_batch_size: int | None = None
    seed: int = 1234
    out_dir: Path = Path("runs/default")
    resume: str | None = None
    lr_schedule: str = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    grad_clip: float = 1.0
    recompute: Literal["none", "selective", "full"] = "none"
    deterministic: bool = False
    nan_policy: Literal["skip", "stop"] = "skip"
    spike_factor: float = 0.0
    spike_warmup_steps: int = 20
    max_skipped_steps: int = 10
    eval_every: int = 0
    eval_batches: int = 2
    cpu_threads: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "global_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} = {getattr(self, name)}: must be a positive int")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"train.micro_batch_size = {self.micro_batch_size}: must be a positive int or none")
        for name in (
            "warmup_steps",
            "eval_every",
            "eval_batches",
            "spike_warmup_steps",
            "max_skipped_steps",
            "cpu_threads",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} = {getattr(self, name)}: must be >= 0")
        if self.micro_batch_size is not None and self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size = {self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size = {self.micro_batch_size}; choose sizes where it is"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio = {self.min_lr_ratio}: must be in [0, 1]")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"train.decay_fraction = {self.decay_fraction}: must be in [0, 1]")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip = {self.grad_clip}: must be >= 0 (0 disables clipping)")
        if self.spike_factor != 0.0 and self.spike_factor <= 1.0:
            raise ValueError(f"train.spike_factor = {self.spike_factor}: must be 0 (off) or > 1")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """``[data]``: where tokens come from and how they become rows.

    ``source`` is ``"stdlib"`` (the ``.py`` files of this interpreter's standard library), a
    text / ``.jsonl`` / ``.parquet`` file, a directory of them, or a directory written by
    ``mcore data prepare``; several comma-separated sources are blended by ``weights``.
    ``tokenizer`` is ``"byte"``, a ``tokenizer.json`` file, or a directory holding one.
    Raw sources are tokenized once, by ``workers`` processes, into memory-mapped shards under
    ``cache_dir`` (default ``<train.out_dir>/data``), at most ``max_tokens`` of them (none: all).
    ``packing = "thd"`` gives the model each row's document boundaries (``cu_seqlens``);
    ``"concat"`` lets attention run across documents. ``eval_fraction`` of each source's rows
    (at its end) is held out for ``train.eval_every``.
    """

    source: str = "stdlib"
    tokenizer: str = "byte"
    weights: list[float] = field(default_factory=list)
    text_field: str = "text"
    packing: Literal["thd", "concat"] = "thd"
    workers: int = 2
    max_tokens: int | None = None
    cache_dir: Path | None = None
    eval_fraction: float = 0.02

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"data.workers = {self.workers}: must be >= 0 (0 tokenizes in the main process)")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"data.max_tokens = {self.max_tokens}: must be a positive int or none")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction = {self.eval_fraction}: must be in [0, 1)")
        if any(w <= 0 for w in self.weights):
            raise ValueError(f"data.weights = {self.weights}: every weight must be > 0")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """``[checkpoint]``: when and how checkpoints are written under ``<train.out_dir>/checkpoints``."""

    every: int = 0
    keep_last: int = 2
    async_save: bool = True
    save_final: bool = True

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"checkpoint.every = {self.every}: must be >= 0 (0 saves only at the end)")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last = {self.keep_last}: must be >= 1")


@dataclass(kw_only=True, slots=True)
class LogConfig:
    """``[log]``: progress display, metrics files, plots and per-layer statistics.

    ``progress`` is ``"auto"`` (a live bar on a terminal, lines otherwise), ``"bar"``,
    ``"lines"`` or ``"none"`` (quiet: only errors). ``peak_tflops`` is the device's peak for
    MFU (``None``: known GPUs only; MFU is left out where the peak is unknown).
    """

    every: int = 10
    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    tensorboard: bool = True
    plot: bool = True
    layer_stats_every: int = 0
    peak_tflops: float | None = None

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"log.every = {self.every}: must be a positive int")
        if self.layer_stats_every < 0:
            raise ValueError(f"log.layer_stats_every = {self.layer_stats_every}: must be >= 0 (0 is off)")


#: Sections owned by the core, by TOML table name.
CORE_SECTIONS: dict[str, type] = {
    "parallel": ParallelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
}

#: Sections whose implementation is chosen by name: section -> (selector key, kind, default).
SELECTED_SECTIONS: dict[str, tuple[str, str, str]] = {
    "model": ("name", "model", "gpt"),
    "optimizer": ("name", "optimizer", "adamw"),
    "precision": ("recipe", "precision", "fp32"),
}
