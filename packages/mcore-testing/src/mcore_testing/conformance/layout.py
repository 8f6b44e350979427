"""Conformance checks for ``ParallelLayout`` implementations (multi-process, gloo).

The layout is applied to the reference transformer on ``world_size`` ranks; its loss and
every parameter's gradient must equal the single-process run on the same global batch,
with and without gradient accumulation under ``no_grad_sync``.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from mcore.mesh import build_mesh
from mcore.protocols import DataParallelInfo, ParallelLayout
from mcore.ragged import full_tensor as ragged_full_tensor
from mcore_testing.dist import run_distributed
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyTransformer, tiny_batches


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor; a DTensor is gathered (a row-ragged split too: ``mcore.ragged``)."""
    return ragged_full_tensor(t) if hasattr(t, "device_mesh") else t


def _local_rows(batch: torch.Tensor, dp: DataParallelInfo) -> torch.Tensor:
    rows = batch.shape[0] // dp.size
    return batch[dp.rank * rows : (dp.rank + 1) * rows]


def _check_matches_single_process(cls: type[LayoutConformance], micro_batches: int) -> None:
    suite = cls()
    layout = suite.make_layout()
    assert isinstance(layout, ParallelLayout)
    mesh = build_mesh(layout.mesh_dims, suite.mesh_sizes, fill=suite.fill_dim, device_type="cpu")
    reference = TinyTransformer(seed=0)
    model = layout.apply(copy.deepcopy(reference), mesh)
    dp = layout.data_parallel()
    assert 0 <= dp.rank < dp.size

    batches = tiny_batches(micro_batches, batch_size=2 * dp.size, seed=11)
    ref_loss = sum(reference(t, labels=y) for t, y in batches)
    ref_loss.backward()

    local_loss = torch.zeros(())
    for i, (tokens, labels) in enumerate(batches):
        last = i == micro_batches - 1
        context = layout.no_grad_sync() if not last else _null()
        with context:
            loss = model(_local_rows(tokens, dp), labels=_local_rows(labels, dp))
            loss.backward()
        local_loss += loss.detach()
    layout.finish_grad_sync()

    if dp.size > 1:
        dist.all_reduce(local_loss, group=dp.group)
        local_loss /= dp.size
    assert_rel_close(local_loss, ref_loss.detach(), suite.tolerance, name="loss")
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        key = suite.reference_name(name)
        assert p.grad is not None, f"{name} has no gradient after finish_grad_sync"
        ref_grad = ref_params[key].grad
        assert ref_grad is not None
        assert_rel_close(_full(p.grad), ref_grad, suite.tolerance, name=f"grad of {name}")
        assert_rel_close(_full(p.detach()), ref_params[key].detach(), suite.tolerance, name=f"value of {name}")


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class LayoutConformance:
    """Subclass and implement ``make_layout()`` (called inside each rank).

    Class attributes: ``world_size`` (processes), ``mesh_sizes`` (``[parallel] sizes``),
    ``fill_dim`` (dimension that takes the rest of the world), ``tolerance``. Override
    ``reference_name`` if the layout renames parameters (wrapper prefixes).
    """

    world_size: ClassVar[int] = 2
    mesh_sizes: ClassVar[dict[str, int]] = {}
    fill_dim: ClassVar[str | None] = None
    tolerance: ClassVar[float] = 1e-5
    timeout: ClassVar[float] = 180.0

    def make_layout(self) -> Any:
        raise NotImplementedError("subclass must implement make_layout()")

    def reference_name(self, name: str) -> str:
        return name

    def test_declares_name_and_dims(self) -> None:
        layout = self.make_layout()
        assert isinstance(layout.name, str) and layout.name
        assert isinstance(layout.mesh_dims, tuple)

    def test_matches_single_process(self) -> None:
        run_distributed(_check_matches_single_process, self.world_size, type(self), 1, timeout=self.timeout)

    def test_gradient_accumulation_matches_single_process(self) -> None:
        run_distributed(_check_matches_single_process, self.world_size, type(self), 2, timeout=self.timeout)
