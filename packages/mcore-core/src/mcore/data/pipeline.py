"""The data side of a run: ``[data]`` + ``[train]`` -> this rank's micro-batches for each step.

Raw sources are tokenized once (by worker processes, streamed) into a memory-mapped cache
keyed by the source's fingerprint and the tokenizer, then read like any prepared dataset;
prepared directories (``mcore data prepare``) are used as they are. Every dataset is checked
against the model's vocabulary when it is opened, before the run starts: a token id the
embedding cannot look up is refused here, not found mid-run. A fraction of each dataset's
rows at its end is held out for evaluation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcore.config.sections import DataConfig, TrainConfig
from mcore.data.packing import PackedRows, RowDataset, pack
from mcore.data.sampler import BlendedSampler
from mcore.data.shards import TokenShards, is_prepared, prepare
from mcore.data.sources import fingerprint, iter_documents
from mcore.data.tokenizer import Tokenizer
from mcore.errors import ConfigError, UserError


def split_sources(data: DataConfig) -> tuple[list[str], list[float]]:
    """The comma-separated ``data.source`` list and its weights (equal if not given)."""
    specs = [s.strip() for s in data.source.split(",") if s.strip()]
    if not specs:
        raise ConfigError(f"data.source = {data.source!r}: name at least one source ('stdlib', a file or a directory)")
    weights = list(data.weights) or [1.0] * len(specs)
    if len(weights) != len(specs):
        raise ConfigError(
            f"data.weights = {data.weights}: {len(weights)} weight(s) for {len(specs)} source(s) in data.source; "
            "give one weight per source"
        )
    return specs, weights


def _same_tokenizer(a: dict, b: dict) -> bool:
    return (
        a.get("kind") == b.get("kind")
        and a.get("vocab_size") == b.get("vocab_size")
        and a.get("eos_id") == b.get("eos_id")
    )


def cache_key(spec: str, data: DataConfig, tokenizer: Tokenizer) -> str:
    """What the tokenized cache of a raw source depends on (the files, the tokenizer and the settings)."""
    parts = [fingerprint(spec), tokenizer.describe(), data.max_tokens, data.text_field]
    if data.invalid_utf8 != "warn":  # a cache made while replacing bytes must not pass for a checked one
        parts.append(data.invalid_utf8)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def open_source(
    spec: str,
    data: DataConfig,
    tokenizer: Tokenizer,
    cache_dir: Path,
    *,
    is_writer: bool,
    barrier: Callable[[], None],
    vocab_size: int | None = None,
) -> TokenShards:
    """A prepared dataset for ``spec``: the directory itself, or the tokenized cache of a raw source.

    A cache whose ``index.json`` is there was made from the same files and settings (its name
    holds ``cache_key``) and is reused; the writer rank makes a missing one. With ``vocab_size``
    (the model's), data holding a larger token id is refused.
    """
    path = Path(spec).expanduser()
    if spec != "stdlib" and path.is_dir() and is_prepared(path):
        shards = TokenShards.open(path)
    else:
        target = Path(cache_dir) / f"{Path(spec).name or 'source'}-{cache_key(spec, data, tokenizer)}"
        if is_writer and not is_prepared(target):
            prepare(
                iter_documents(spec, text_field=data.text_field, invalid_utf8=data.invalid_utf8),
                target,
                tokenizer_spec=data.tokenizer,
                workers=data.workers,
                max_tokens=data.max_tokens,
                source=spec,
                overwrite=True,  # only ever a cache of ours: publish_dir refuses a directory holding anything else
            )
        barrier()
        shards = TokenShards.open(target)
    if not _same_tokenizer(shards.tokenizer_info, tokenizer.describe()):
        raise UserError(
            f"data.source {spec!r} was tokenized with {shards.tokenizer_info}, but data.tokenizer = {data.tokenizer!r} "
            f"is {tokenizer.describe()}; set data.tokenizer to the one the data was prepared with, or prepare it again"
        )
    if vocab_size is not None and shards.max_id >= vocab_size:
        raise UserError(
            f"data.source {spec!r}: the shards in {shards.path} hold token id {shards.max_id}, but the model's "
            f"vocabulary has {vocab_size} ids (0..{vocab_size - 1}); set --model.vocab_size={shards.max_id + 1} or "
            "larger, or prepare the data again with the model's tokenizer"
        )
    return shards


@dataclass
class TrainData:
    """Rows of every source, the train sampler, and the held-out evaluation rows."""

    datasets: list[RowDataset]
    train_rows: list[int]
    sampler: BlendedSampler
    eval_slots: list[tuple[int, int]]
    micro_batch: int
    thd: bool

    def micro_batches(self, step: int) -> list[PackedRows]:
        """This rank's micro-batches of optimizer step ``step``."""
        slots = self.sampler.local_slots(step)
        return [self._pack(slots[i : i + self.micro_batch]) for i in range(0, len(slots), self.micro_batch)]

    def eval_batches(self, count: int, dp_rank: int, dp_size: int) -> list[PackedRows]:
        """Up to ``count`` fixed micro-batches of held-out rows for this rank."""
        per_step = self.micro_batch * dp_size
        out = []
        for b in range(count):
            chunk = self.eval_slots[b * per_step : (b + 1) * per_step]
            mine = chunk[dp_rank * self.micro_batch : (dp_rank + 1) * self.micro_batch]
            if len(mine) < self.micro_batch:
                break
            out.append(self._pack(mine))
        return out

    def _pack(self, slots: list[tuple[int, int]]) -> PackedRows:
        rows = [self.datasets[d].row(r) for d, r in slots]
        return pack(rows, self.datasets[0].seq_len, thd=self.thd)


def build_train_data(
    data: DataConfig,
    train: TrainConfig,
    tokenizer: Tokenizer,
    *,
    dp_rank: int,
    dp_size: int,
    is_writer: bool = True,
    barrier: Callable[[], None] = lambda: None,
    vocab_size: int | None = None,
) -> TrainData:
    """Open (tokenizing if needed) every source and build the sampler for this rank.

    ``vocab_size`` is the model's: a dataset holding a token id it cannot embed is refused here.
    """
    gbs, given = train.global_batch_size, train.micro_batch_size
    unit = dp_size * (given or 1)  # every data-parallel rank reads whole micro-batches
    if gbs < unit or gbs % unit:
        what = f" x train.micro_batch_size = {given}" if given else ""
        raise ConfigError(
            f"train.global_batch_size = {gbs} does not split over the data-parallel size {dp_size}{what}; "
            f"allowed: a multiple of {unit} (e.g. {max(unit, gbs // unit * unit)})"
        )
    micro = given or gbs // dp_size
    cache_dir = data.cache_dir or (Path(train.out_dir) / "data")
    specs, weights = split_sources(data)
    datasets, train_rows, eval_slots = [], [], []
    for d, spec in enumerate(specs):
        shards = open_source(
            spec, data, tokenizer, cache_dir, is_writer=is_writer, barrier=barrier, vocab_size=vocab_size
        )
        rows = RowDataset(shards, train.seq_len)
        n_eval = int(len(rows) * data.eval_fraction) if len(rows) > 1 else 0
        if data.eval_fraction > 0 and len(rows) > 1:
            n_eval = max(1, n_eval)
        if len(rows) - n_eval < 1:
            raise UserError(
                f"data.source {spec!r} has {rows.shards.num_tokens} tokens: too few for one row of train.seq_len = "
                f"{train.seq_len} (+ held-out rows); give more text or a shorter train.seq_len"
            )
        datasets.append(rows)
        train_rows.append(len(rows) - n_eval)
        eval_slots += [(d, r) for r in range(len(rows) - n_eval, len(rows))]
    rng = np.random.default_rng([train.seed, 7])
    eval_slots = [eval_slots[i] for i in rng.permutation(len(eval_slots))]
    sampler = BlendedSampler(
        train_rows, weights, global_batch=train.global_batch_size, seed=train.seed, dp_rank=dp_rank, dp_size=dp_size
    )
    return TrainData(datasets, train_rows, sampler, eval_slots, micro, data.packing == "thd")
