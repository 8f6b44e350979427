"""Conformance checks for ``ParallelLayout`` implementations (multi-process, gloo).

The layout is applied to the reference transformer on ``world_size`` ranks and driven as the run
loop drives it (``mcore.train.microbatch``: ``shard_batch`` for layouts that split the sequence,
``forward_backward`` for layouts that run a schedule over stages, the plain loop otherwise); its
loss, every parameter's gradient and the global gradient norm must equal the single-process run
on the same global batch, with and without gradient accumulation under ``no_grad_sync``. Layouts
that split batch rows, the sequence, heads (``DTensor`` parameters) or stages are all checked.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from mcore.mesh import build_mesh
from mcore.precision.basic import FP32
from mcore.protocols import BlockContext, DataParallelInfo, ParallelLayout
from mcore.ragged import full_tensor as ragged_full_tensor
from mcore.train.grads import global_grad_norm
from mcore.train.microbatch import classify, forward_backward, shard
from mcore_testing.dist import run_distributed
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyConfig, TinyTransformer, tiny_batches


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor; a DTensor is gathered (a row-ragged split too: ``mcore.ragged``)."""
    return ragged_full_tensor(t) if hasattr(t, "device_mesh") else t


def _local_rows(batch: torch.Tensor, dp: DataParallelInfo) -> torch.Tensor:
    rows = batch.shape[0] // dp.size
    return batch[dp.rank * rows : (dp.rank + 1) * rows]


def _check_matches_single_process(cls: type[LayoutConformance], micro_batches: int) -> None:
    """The layout driven as the run loop drives it (``mcore.train.microbatch``): every micro-batch
    through ``shard_batch`` when it has one, its schedule when it has one, else the plain loop."""
    suite = cls()
    layout = suite.make_layout()
    assert isinstance(layout, ParallelLayout)
    mesh = build_mesh(layout.mesh_dims, suite.mesh_sizes, fill=suite.fill_dim, device_type="cpu")
    reference = TinyTransformer(suite.model_config(), seed=0)
    model = layout.apply(copy.deepcopy(reference), mesh)
    dp = layout.data_parallel()
    assert 0 <= dp.rank < dp.size
    steps = classify([layout], [layout.name])

    batches = tiny_batches(micro_batches, batch_size=2 * dp.size, seq_len=suite.seq_len, seed=11)
    ref_loss = sum(reference(t, labels=y) for t, y in batches) / micro_batches
    ref_loss.backward()  # type: ignore[union-attr]

    micro = [shard((_local_rows(t, dp), _local_rows(y, dp), BlockContext(mesh=mesh)), steps) for t, y in batches]
    share = forward_backward(model, micro, steps, FP32()).reshape(1).cpu()  # (1,) fp64
    layout.finish_grad_sync()
    if dist.is_initialized():
        dist.all_reduce(share)
    loss = share * steps.loss_group_size() / mesh.world_size
    assert_rel_close(loss.float()[0], ref_loss.detach(), suite.tolerance, name="loss")  # type: ignore[union-attr]
    ref_params = dict(reference.named_parameters())
    named = list(model.named_parameters())
    assert named, "the layout's model holds no parameters on this rank"
    for name, p in named:
        key = suite.reference_name(name)
        assert p.grad is not None, f"{name} has no gradient after finish_grad_sync"
        ref_grad = ref_params[key].grad
        assert ref_grad is not None
        assert_rel_close(_full(p.grad), ref_grad, suite.tolerance, name=f"grad of {name}")
        assert_rel_close(_full(p.detach()), ref_params[key].detach(), suite.tolerance, name=f"value of {name}")
    # every gradient element counted once in the norm, however the layout spreads it
    norm = global_grad_norm(named, mesh, [layout])
    ref_norm = global_grad_norm(list(reference.parameters()))
    assert_rel_close(norm, ref_norm, suite.tolerance, name="gradient norm")
    names = {suite.reference_name(n) for n, _ in named}
    if dist.is_initialized():  # a stage holds part of the model; together the ranks hold all of it
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, sorted(names))
        names = names.union(*every)
    assert names == set(ref_params), f"parameters no rank holds: {sorted(set(ref_params) - names)}"


class LayoutConformance:
    """Subclass and implement ``make_layout()`` (called inside each rank).

    Class attributes: ``world_size`` (processes), ``mesh_sizes`` (``[parallel] sizes``),
    ``fill_dim`` (dimension that takes the rest of the world), ``tolerance``, ``seq_len`` (tokens
    per row: a multiple of a sequence split). Override ``reference_name`` if the layout renames
    parameters (wrapper prefixes) and ``model_config`` for another reference model.
    """

    world_size: ClassVar[int] = 2
    seq_len: ClassVar[int] = 16
    mesh_sizes: ClassVar[dict[str, int]] = {}
    fill_dim: ClassVar[str | None] = None
    tolerance: ClassVar[float] = 1e-5
    timeout: ClassVar[float] = 180.0

    def make_layout(self) -> Any:
        raise NotImplementedError("subclass must implement make_layout()")

    def reference_name(self, name: str) -> str:
        return name

    def model_config(self) -> TinyConfig:
        """The reference model's config (override: more layers for a layout that cuts stages)."""
        return TinyConfig()

    def test_declares_name_and_dims(self) -> None:
        layout = self.make_layout()
        assert isinstance(layout.name, str) and layout.name
        assert isinstance(layout.mesh_dims, tuple)

    def test_matches_single_process(self) -> None:
        run_distributed(_check_matches_single_process, self.world_size, type(self), 1, timeout=self.timeout)

    def test_gradient_accumulation_matches_single_process(self) -> None:
        run_distributed(_check_matches_single_process, self.world_size, type(self), 2, timeout=self.timeout)
