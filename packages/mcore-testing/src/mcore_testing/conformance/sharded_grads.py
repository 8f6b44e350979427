"""Conformance checks for the ZeRO-1 handshake (``mcore.protocols.sharded_grads``), multi-process, gloo.

A layout and an optimizer factory that meet through ``GradientShardingLayout`` train the reference
transformer as the run loop does (micro-batches under ``no_grad_sync``, ``finish_grad_sync``, the
global gradient norm, clipping, a scheduled LR, ``step``). On every rank and after every step:

* the pieces of each parameter tile it in rank order (a parameter is split between two ranks; the
  model's element count is not a multiple of the world);
* ``.grad`` holds each averaged gradient element on exactly one rank (summed over the ranks it is
  the single-process gradient) and the gradient norm counts each element once;
* the parameters equal a single-process ``torch.optim.AdamW`` run on the same global batches
  (fp32, relative error < ``tolerance``);
* the optimizer holds state only for its own elements;
* its state saved through the core's checkpoint code (``CheckpointManager``) on the first world
  size loads (``load_checkpoint``) on the others and on one process, and training continues
  exactly like the single-process run.
"""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mcore.checkpoint.store import CheckpointManager, load_checkpoint, step_dir
from mcore.mesh import build_mesh
from mcore.precision.basic import FP32
from mcore.protocols import OptimizerFactory
from mcore.protocols.sharded_grads import GradientShardingLayout, GradShards, grad_sharding_layout
from mcore.train.grads import clip_grads_, global_grad_norm
from mcore_testing.dist import run_distributed
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyConfig, TinyTransformer, tiny_batches

ROWS = 6  # rows of every micro-batch: split evenly over 1, 2 and 3 ranks


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _reference(suite: ShardedGradsConformance) -> list[dict[str, Any]]:
    """Single-process AdamW on the whole batches: per step the gradients, norm and parameters after it."""
    model = TinyTransformer(suite.model_config(), seed=0)
    hp = suite.adamw
    opt = torch.optim.AdamW(
        list(model.parameters()),
        lr=hp["lr"],
        weight_decay=hp["weight_decay"],
        betas=(hp["beta1"], hp["beta2"]),
        eps=hp["eps"],
        foreach=False,
    )
    out = []
    for step in range(suite.steps):
        opt.zero_grad(set_to_none=True)
        for tokens, labels in suite.batches(step):
            (model(tokens, labels=labels) / suite.micro_batches).backward()
        norm = global_grad_norm(list(model.parameters()))
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        clip_grads_(list(model.parameters()), suite.grad_clip, norm)
        for group in opt.param_groups:
            group["lr"] = suite.lr_at(step)
        opt.step()
        out.append(
            {"norm": norm, "grads": grads, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}
        )
    return out


def _check_pieces(shards: GradShards, model: torch.nn.Module) -> None:
    """The pieces name every trainable parameter in one order and tile each one in rank order."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(p.name for p in shards.pieces) == sorted(named), "the pieces must name every trainable parameter"
    rank, world = _rank_world()
    assert (shards.rank, shards.size) == (rank, world), f"shards say rank {shards.rank} of {shards.size}"
    mine = [(p.name, p.start, p.stop) for p in shards.pieces]
    every: list[Any] = [mine]
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, mine)
    assert all([n for n, _, _ in e] == [n for n, _, _ in mine] for e in every), "pieces in another order"
    split = 0
    for i, (name, _, _) in enumerate(mine):
        ranges = [(e[i][1], e[i][2]) for e in every if e[i][2] > e[i][1]]
        at = 0
        for start, stop in ranges:
            assert start == at, f"{name}: ranges {ranges} do not follow each other in rank order"
            at = stop
        assert at == named[name].numel(), f"{name}: ranges {ranges} do not cover its {named[name].numel()} elements"
        split += len(ranges) > 1
    if world > 1:
        assert split, "no parameter is split between two ranks: the check proves less than it should"


def _local_state_elements(state: Any) -> int:
    if isinstance(state, DTensor):
        return state.to_local().numel()
    if isinstance(state, torch.Tensor):
        return state.numel()
    if isinstance(state, dict):
        return sum(_local_state_elements(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_local_state_elements(v) for v in state)
    return 0


def _train_step(suite: ShardedGradsConformance, step: int, model: Any, layout: Any, optimizer: Any, mesh: Any) -> None:
    rank, world = _rank_world()
    rows = ROWS // world
    optimizer.zero_grad(set_to_none=True)
    batches = suite.batches(step)
    for i, (tokens, labels) in enumerate(batches):
        sync = i == len(batches) - 1
        local = tokens[rank * rows : (rank + 1) * rows], labels[rank * rows : (rank + 1) * rows]
        with nullcontext() if sync else layout.no_grad_sync():
            (model(local[0], labels=local[1]) / suite.micro_batches).backward()
    layout.finish_grad_sync()
    ref = suite.reference[step]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, p in named:  # each averaged element on exactly one rank: the sum over ranks is the whole gradient
        assert p.grad is not None, f"{name} has no gradient after finish_grad_sync"
        total = p.grad.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        assert_rel_close(total, ref["grads"][name], suite.tolerance, name=f"step {step + 1}: gradient of {name}")
    norm = global_grad_norm(named, mesh, [layout])
    assert_rel_close(norm, ref["norm"], suite.tolerance, name=f"step {step + 1}: gradient norm")
    clip_grads_([p for _, p in named], suite.grad_clip, norm)
    for group in optimizer.param_groups:
        group["lr"] = suite.lr_at(step)
    optimizer.step()
    for name, p in named:
        assert_rel_close(p.detach(), ref["params"][name], suite.tolerance, name=f"step {step + 1}: {name}")


def _build(suite: ShardedGradsConformance) -> tuple[Any, Any, Any, Any, GradShards]:
    layout = suite.make_layout()
    assert isinstance(layout, GradientShardingLayout), f"{type(layout).__name__} is not a GradientShardingLayout"
    mesh = build_mesh(layout.mesh_dims, {}, fill=suite.fill_dim, device_type="cpu")
    model = layout.apply(TinyTransformer(suite.model_config(), seed=0), mesh, FP32())
    factory = suite.make_factory()
    assert isinstance(factory, OptimizerFactory)
    optimizer = factory.build(model, mesh=mesh, layouts=[layout])
    assert grad_sharding_layout([layout]) is layout
    shards = layout.shard_grads()
    assert shards is not None, "the layout declined to shard gradients for the reference model"
    assert layout.shard_grads() == shards, "shard_grads() must return the same shards when asked again"
    _check_pieces(shards, model)
    return layout, mesh, model, optimizer, shards


def _check_state_is_sharded(suite: ShardedGradsConformance, optimizer: Any, shards: GradShards) -> None:
    held = _local_state_elements(optimizer.state_dict())
    allowed = suite.state_per_element * shards.numel + suite.state_per_parameter * len(shards.pieces)
    assert held <= allowed, (
        f"rank {shards.rank} holds {held} optimizer state elements for the {shards.numel} parameter elements it owns "
        f"(allowed {allowed}): state of elements it does not own"
    )


def _first_run(cls: type[ShardedGradsConformance], root: str) -> None:
    """Train every step, checking each; save after ``save_after`` steps."""
    suite = cls()
    layout, mesh, model, optimizer, shards = _build(suite)
    rank, world = _rank_world()
    manager = CheckpointManager(Path(root), keep_last=1, async_save=False, rank=rank, world_size=world)
    for step in range(suite.steps):
        _train_step(suite, step, model, layout, optimizer, mesh)
        _check_state_is_sharded(suite, optimizer, shards)
        if step + 1 == suite.save_after:
            meta = {"config": {}, "model_name": "reference-tiny"}
            manager.save(step + 1, model=model, optimizer=optimizer, precision=FP32(), meta=meta, rank_extra={})
    manager.wait()


def _resumed_run(cls: type[ShardedGradsConformance], root: str) -> None:
    """Load the first run's checkpoint on another world size and train the remaining steps."""
    suite = cls()
    layout, mesh, model, optimizer, shards = _build(suite)
    rank, world = _rank_world()
    path = step_dir(Path(root), suite.save_after)
    load_checkpoint(path, model=model, optimizer=optimizer, precision=FP32(), rank=rank, world_size=world)
    _check_state_is_sharded(suite, optimizer, shards)
    for step in range(suite.save_after, suite.steps):
        _train_step(suite, step, model, layout, optimizer, mesh)


class ShardedGradsConformance:
    """Subclass; implement ``make_layout()`` and ``make_factory()`` (called inside each rank).

    ``make_factory()`` returns an AdamW factory configured with ``self.adamw`` (lr, weight_decay,
    beta1, beta2, eps). Class attributes: ``world_sizes`` (the first trains and saves, each other
    one — and one process — loads and continues), ``fill_dim`` (the layout's data-parallel
    dimension), ``steps``/``save_after``/``micro_batches``, ``grad_clip`` (small enough to clip),
    ``state_per_element`` (optimizer state elements per owned parameter element: moments and an
    fp32 master) and ``state_per_parameter`` (scalars such as step counts).
    """

    world_sizes: ClassVar[tuple[int, ...]] = (2, 3)
    fill_dim: ClassVar[str | None] = "dp_replicate"
    steps: ClassVar[int] = 4
    save_after: ClassVar[int] = 2
    micro_batches: ClassVar[int] = 2
    seq_len: ClassVar[int] = 16
    grad_clip: ClassVar[float] = 0.75
    tolerance: ClassVar[float] = 1e-5
    state_per_element: ClassVar[int] = 3
    state_per_parameter: ClassVar[int] = 1
    timeout: ClassVar[float] = 180.0
    adamw: ClassVar[dict[str, float]] = {"lr": 1e-2, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}

    def make_layout(self) -> Any:
        raise NotImplementedError("subclass must implement make_layout()")

    def make_factory(self) -> Any:
        raise NotImplementedError("subclass must implement make_factory()")

    def model_config(self) -> TinyConfig:
        """1 layer, hidden 35: 12,145 parameter elements, a multiple of neither 2 nor 3."""
        return TinyConfig(vocab_size=61, hidden_size=35, num_heads=5, ffn_size=22, num_layers=1, max_seq_len=16)

    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The whole micro-batches of ``step`` (``ROWS`` rows each)."""
        vocab = self.model_config().vocab_size
        return tiny_batches(self.micro_batches, batch_size=ROWS, seq_len=self.seq_len, vocab_size=vocab, seed=step)

    def lr_at(self, step: int) -> float:
        """A changing learning rate, written into ``param_groups`` as the run loop's schedule does."""
        return self.adamw["lr"] * (1.0 - 0.5 * step / max(self.steps, 1))

    @cached_property
    def reference(self) -> list[dict[str, Any]]:
        """The single-process run, computed once per suite instance (each rank computes its own)."""
        return _reference(self)

    def test_declares_the_handshake(self) -> None:
        layout = self.make_layout()
        assert isinstance(layout, GradientShardingLayout)
        assert isinstance(self.make_factory(), OptimizerFactory)
        numel = sum(p.numel() for p in TinyTransformer(self.model_config()).parameters())
        assert all(numel % w for w in self.world_sizes if w > 1), f"{numel} elements split evenly: uneven case untested"
        norms = [float(r["norm"]) for r in self.reference]
        assert max(norms) > self.grad_clip, f"grad_clip = {self.grad_clip} never clips (norms {norms})"

    def test_matches_single_process_and_reshards(self) -> None:
        first, *others = self.world_sizes
        with tempfile.TemporaryDirectory(prefix="mcore-zero-") as root:
            run_distributed(_first_run, first, type(self), root, timeout=self.timeout)
            for world in (*others, 1):
                run_distributed(_resumed_run, world, type(self), root, timeout=self.timeout)
