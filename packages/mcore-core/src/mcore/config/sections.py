"""Schemas of the sections the core itself owns (``[train]``, ``[data]``, ``[parallel]``...).

Implementation-specific sections (``[model]`` beyond ``name``, ``[optimizer]`` beyond
``name``, ``[precision]`` beyond ``recipe``, ``[parallel.<layout>]``) take their schema from
the chosen implementation's ``Config`` dataclass.

Every field carries a one-line docstring (the string right after it): ``mcore train --help``
prints them. Float fields are finite (``coerce`` refuses NaN and inf); ``__post_init__`` checks
each field's type first (an int field takes no NaN, 2.5 or bool) and then ranges with comparisons
that are false for NaN, so a config built in Python is held to the same rules. Directory paths
expand '~' and are never empty (which would silently mean the current directory).
"""

from __future__ import annotations

import math
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from mcore.config.coerce import describe_type, field_types

#: Most CPU threads or tokenizer processes a run may ask for: a typo (100000) would crash torch or fork for minutes.
MAX_PROCESSES = 1024


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    """``ValueError("<key> = <value>: <allowed>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{key} = {value!r}: {allowed}")


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of the field type ``tp`` (an int field takes no bool or 2.5; a float field no str)."""
    origin = get_origin(tp)
    if origin is Literal:
        return value in get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, option) for option in get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is Path:
        return isinstance(value, (str, os.PathLike))
    if origin is list:
        return isinstance(value, list) and all(_matches(v, get_args(tp)[0]) for v in value)
    if origin is dict:
        key_tp, val_tp = get_args(tp)
        return isinstance(value, dict) and all(_matches(k, key_tp) and _matches(v, val_tp) for k, v in value.items())
    return not isinstance(tp, type) or isinstance(value, tp)


def _check_types(config: Any, section: str) -> None:
    """``ValueError`` naming the first field whose value is not of its declared type (a config built in Python
    skips ``coerce``: ``steps=2.5`` or ``steps=nan`` must not pass the range checks)."""
    for name, tp in field_types(type(config)).items():
        value = getattr(config, name)
        if not _matches(value, tp):
            raise ValueError(f"{section}.{name} = {value!r}: expected {describe_type(tp)}")


def _path(key: str, value: Path | str) -> Path:
    """``value`` as a directory path, '~' expanded; an empty one (which would mean the current directory) refused."""
    _require(str(value).strip() != "", key, str(value), "must name a directory (e.g. '.' for the current one)")
    path = Path(value).expanduser()
    _directory_path(key, path)
    return path


def _directory_path(key: str, path: Path) -> None:
    """Refuse a path that is a file, or lies under one (the run could not create it as a directory)."""
    for existing in (path, *path.parents):
        try:
            found, is_dir = existing.exists(), existing.is_dir()
        except OSError:  # not ours to look into (permissions): the run reports it when it gets there
            return
        if found:
            if not is_dir:
                where = "is a file" if existing == path else f"lies under the file '{existing}'"
                raise ValueError(f"{key} = '{path}' {where}; choose a directory (it is created if missing)")
            return


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """``[parallel]``: which layouts to apply, in order, and the size of each mesh dimension."""

    layouts: list[str] = field(default_factory=lambda: ["single"])
    """Layouts applied to the model in this order (e.g. ``tp,fsdp``; ``single``: one process, no parallelism)."""
    sizes: dict[str, int] = field(default_factory=dict)
    """Mesh dimension sizes (dp_replicate, dp_shard, cp, tp, pp, ep); one may be -1 (or left out) to take the rest."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device to run on: 'auto' (CUDA when torch sees a GPU, else CPU), 'cpu' or 'cuda'."""
    timeout_s: float = 600.0
    """Seconds a collective may wait for the other ranks before every rank stops with a message (> 0, finite)."""

    def __post_init__(self) -> None:
        _check_types(self, "parallel")
        if not self.layouts:
            raise ValueError("parallel.layouts must name at least one layout (use 'single' for none)")
        if len(set(self.layouts)) != len(self.layouts):
            raise ValueError(f"parallel.layouts = {self.layouts!r} names a layout twice")
        _require(
            self.timeout_s > 0 and _finite(self.timeout_s),
            "parallel.timeout_s",
            self.timeout_s,
            "must be finite and > 0",
        )


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """``[train]``: the run loop.

    ``global_batch_size`` rows per optimizer step are split over the data-parallel ranks and
    then into micro-batches of ``micro_batch_size`` rows (gradient accumulation covers the rest).
    """

    steps: int = 1000
    """Optimizer steps of the whole run (a resumed run continues up to this step)."""
    seq_len: int = 128
    """Tokens per row (at most the model's longest supported sequence)."""
    global_batch_size: int = 16
    """Rows per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int | None = None
    """Rows per forward/backward on one rank (none: the rank's whole share at once; must divide the global batch)."""
    seed: int = 1234
    """Seed of the weights' init, the data order and dropout."""
    out_dir: Path = Path("runs/default")
    """Directory of the run: checkpoints, metrics, tokenizer, prepared data (created if missing; not a file)."""
    resume: str | None = "auto"
    """'auto' (default: continue from the newest complete checkpoint in out_dir when it was made by the same model config, refuse when not), 'latest', 'none' (always start at step 1; refused if out_dir already holds a run unless train.overwrite), or a checkpoint directory (one of this run: its later checkpoints move to out_dir/previous/; another run's: refused where a run already is unless train.overwrite)"""
    overwrite: bool = False
    """start at step 1 in an out_dir that holds another run; its checkpoints and metrics are moved to out_dir/previous/<time> (nothing is deleted)"""
    allow_model_change: bool = False
    """resume even when the checkpoint was made with a different model config (shapes must still fit)"""
    lr_schedule: str = "cosine"
    """Learning-rate schedule by name: 'cosine', 'wsd' (warmup-stable-decay), 'constant', or a plugin's."""
    warmup_steps: int = 20
    """Steps of linear warmup from lr / warmup_steps to the peak lr (0: none)."""
    min_lr_ratio: float = 0.1
    """Final lr as a fraction of the peak lr, in [0, 1] (cosine and wsd)."""
    decay_fraction: float = 0.2
    """Fraction of the steps over which wsd decays the lr at the end, in [0, 1]."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (finite, >= 0; 0 disables clipping)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute: 'none', 'selective' (attention only) or 'full' (every block)."""
    compile: Literal["none", "blocks"] = "none"
    """torch.compile each block of the model ('blocks', applied from outside like recompute and composing with it, the layouts and the precision recipe) or nothing ('none')."""
    compile_backend: str = "inductor"
    """torch.compile backend for train.compile (e.g. 'inductor', 'aot_eager')."""
    attention: str = "auto"
    """Attention kernel by name ('auto': each attention block's default; 'sdpa', 'flex', or a plugin's registered attention)."""
    deterministic: bool = False
    """Make torch use deterministic kernels (on CUDA it also sets CUBLAS_WORKSPACE_CONFIG)."""
    nan_policy: Literal["skip", "stop"] = "skip"
    """On a NaN/Inf or spiking loss: 'skip' the update (with a warning) or 'stop' the run."""
    spike_factor: float = 0.0
    """A loss above this times its running mean is a bad step (0: off; else finite and > 1)."""
    spike_warmup_steps: int = 20
    """Good steps before loss spikes are looked for."""
    max_skipped_steps: int = 10
    """Bad steps in a row that are skipped before the run stops."""
    eval_every: int = 0
    """Compute the held-out loss every this many steps (0: never)."""
    eval_batches: int = 2
    """Global batches of held-out rows per evaluation."""
    cpu_threads: int = 0
    """Torch intra-op threads of a CPU run (0: torch's default; 1 is fastest for tiny models on a busy machine)."""

    def __post_init__(self) -> None:
        _check_types(self, "train")
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
        _require(0 <= self.seed < 1 << 63, "train.seed", self.seed, "must be an integer in [0, 2**63)")
        _require(  # torch crashes (a segmentation fault) on far more threads than any machine has cores
            self.cpu_threads <= MAX_PROCESSES, "train.cpu_threads", self.cpu_threads, f"must be at most {MAX_PROCESSES}"
        )
        _require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _require(0.0 <= self.decay_fraction <= 1.0, "train.decay_fraction", self.decay_fraction, "must be in [0, 1]")
        _require(
            self.grad_clip >= 0 and _finite(self.grad_clip),
            "train.grad_clip",
            self.grad_clip,
            "must be a finite number >= 0 (0 disables clipping)",
        )
        _require(
            self.spike_factor == 0.0 or (self.spike_factor > 1.0 and _finite(self.spike_factor)),
            "train.spike_factor",
            self.spike_factor,
            "must be 0 (off) or a finite number > 1",
        )
        self.out_dir = _path("train.out_dir", self.out_dir)


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """``[data]``: where tokens come from and how they become rows.

    Raw sources are tokenized once, by ``workers`` processes, into memory-mapped shards under
    ``cache_dir``; a directory written by ``mcore data prepare`` is used as it is.
    """

    source: str = "stdlib"
    """'stdlib' (this Python's standard library), text/.jsonl/.parquet files, a directory of them or of prepared shards; comma-separate several to blend."""
    tokenizer: str = "byte"
    """'byte' (256 byte tokens + end of text), a tokenizer.json file, or a directory holding one."""
    weights: list[float] = field(default_factory=list)
    """Blend weight of each source (each finite and > 0; empty: equal weights)."""
    text_field: str = "text"
    """Field holding the text in .jsonl and .parquet sources."""
    packing: Literal["thd", "concat"] = "thd"
    """'thd': attention stays within each document of a row (cu_seqlens); 'concat': it runs across documents."""
    workers: int = 2
    """Processes that tokenize raw sources (0: the main process)."""
    max_tokens: int | None = None
    """Tokenize at most this many tokens of the sources (none: all)."""
    cache_dir: Path | None = None
    """Where prepared shards are written (none: <train.out_dir>/data; not a file)."""
    eval_fraction: float = 0.02
    """Fraction of each source's rows, at its end, held out for evaluation, in [0, 1)."""
    invalid_utf8: Literal["warn", "error"] = "warn"
    """Text that is not valid UTF-8: 'warn' (replace the bad bytes, count them and warn) or 'error' (refuse the source)."""

    def __post_init__(self) -> None:
        _check_types(self, "data")
        if not 0 <= self.workers <= MAX_PROCESSES:
            raise ValueError(
                f"data.workers = {self.workers}: must be in [0, {MAX_PROCESSES}] (0 tokenizes in the main process)"
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"data.max_tokens = {self.max_tokens}: must be a positive int or none")
        _require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction, "must be in [0, 1)")
        _require(
            all(w > 0 and _finite(w) for w in self.weights),
            "data.weights",
            self.weights,
            "every weight must be finite and > 0",
        )
        if self.cache_dir is not None:
            self.cache_dir = _path("data.cache_dir", self.cache_dir)


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """``[checkpoint]``: when and how checkpoints are written under ``<train.out_dir>/checkpoints``."""

    every: int = 0
    """Save a checkpoint every this many steps (0: only at the end)."""
    keep_last: int = 2
    """Newest checkpoints kept; older ones are removed (>= 1)."""
    async_save: bool = True
    """Write checkpoints in the background while training goes on."""
    save_final: bool = True
    """Save a checkpoint after the last step."""

    def __post_init__(self) -> None:
        _check_types(self, "checkpoint")
        if self.every < 0:
            raise ValueError(f"checkpoint.every = {self.every}: must be >= 0 (0 saves only at the end)")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last = {self.keep_last}: must be >= 1")


@dataclass(kw_only=True, slots=True)
class LogConfig:
    """``[log]``: progress display, metrics files, plots and per-layer statistics."""

    every: int = 10
    """Write metrics and progress every this many steps."""
    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    """'auto' (a live bar on a terminal, lines otherwise), 'bar', 'lines' or 'none' (only errors)."""
    tensorboard: bool = True
    """Also write TensorBoard event files under out_dir."""
    plot: bool = True
    """Plot loss and learning rate to out_dir at the end of the run."""
    layer_stats_every: int = 0
    """Record per-layer statistics every this many steps (0: off)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for MFU (none: known GPUs only; finite and > 0)."""
    profile_from: int = 0
    """Record steps profile_from .. profile_from + profile_steps - 1 with torch.profiler into
    out_dir/profile/rank<r>/ (trace.json, top_ops.txt); 0: off."""
    profile_steps: int = 2
    """How many steps the profile records (>= 1)."""

    def __post_init__(self) -> None:
        _check_types(self, "log")
        if self.every < 1:
            raise ValueError(f"log.every = {self.every}: must be a positive int")
        if self.profile_from < 0:
            raise ValueError(f"log.profile_from = {self.profile_from}: must be >= 0 (0 is off)")
        if self.profile_steps < 1:
            raise ValueError(f"log.profile_steps = {self.profile_steps}: must be >= 1")
        if self.layer_stats_every < 0:
            raise ValueError(f"log.layer_stats_every = {self.layer_stats_every}: must be >= 0 (0 is off)")
        if self.peak_tflops is not None:
            _require(
                self.peak_tflops > 0 and _finite(self.peak_tflops),
                "log.peak_tflops",
                self.peak_tflops,
                "must be finite and > 0, or none",
            )


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
