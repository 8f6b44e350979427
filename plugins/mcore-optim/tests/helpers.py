"""Test-only pieces the harness does not provide: a data-parallel layout and training loops.

``AveragingLayout`` stands in for mcore's ``ddp`` (a plugin we may not depend on): it
leaves the model replicated and, in ``finish_grad_sync``, averages gradients over the group
with one all-reduce per parameter (or leaves them un-reduced, for ``reduce_grads``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from mcore.mesh import ParallelMesh
from mcore.protocols.layout import DataParallelInfo
from mcore_testing.reference import TinyConfig, TinyTransformer, tiny_batches

SINGLE = ParallelMesh((), (), "cpu")


class AveragingLayout:
    """Replicated data parallelism over the default group (a test stand-in for ``ddp``)."""

    name: ClassVar[str] = "test-ddp"
    mesh_dims: ClassVar[tuple[str, ...]] = ("dp_replicate",)

    def __init__(self, *, average: bool = True) -> None:
        self.average = average
        self.model: nn.Module | None = None

    def apply(self, model: nn.Module, mesh: Any = None, precision: Any = None) -> nn.Module:
        self.model = model
        return model

    def data_parallel(self) -> DataParallelInfo:
        return DataParallelInfo(rank=dist.get_rank(), size=dist.get_world_size(), group=dist.group.WORLD)

    def no_grad_sync(self) -> AbstractContextManager[None]:
        return nullcontext()

    def finish_grad_sync(self) -> None:
        if not self.average:
            return
        assert self.model is not None
        for p in self.model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(dist.get_world_size())

    def state_dict_options(self) -> dict[str, Any]:
        return {}


class FSDPLayout:
    """torch's ``fully_shard`` on every block and the root: parameters become Shard(0) DTensors."""

    name: ClassVar[str] = "test-fsdp"
    mesh_dims: ClassVar[tuple[str, ...]] = ("dp_shard",)

    def apply(self, model: nn.Module, mesh: Any = None, precision: Any = None) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp_shard",))
        for layer in model.layers:
            fully_shard(layer, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        return model

    def data_parallel(self) -> DataParallelInfo:
        return DataParallelInfo(rank=dist.get_rank(), size=dist.get_world_size(), group=dist.group.WORLD)

    def no_grad_sync(self) -> AbstractContextManager[None]:
        return nullcontext()

    def finish_grad_sync(self) -> None:
        return None

    def state_dict_options(self) -> dict[str, Any]:
        return {}


def tiny_model(seed: int = 0, cfg: TinyConfig | None = None) -> TinyTransformer:
    return TinyTransformer(cfg or TinyConfig(), seed=seed)


def batches(steps: int, seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return tiny_batches(steps, batch_size=8, seed=seed)


def train(
    model: nn.Module, optimizer: Any, data: list[Any], *, layout: Any = None, rank: int = 0, size: int = 1
) -> None:
    """One optimizer step per batch; under data parallelism each rank takes its rows of the batch."""
    for tokens, labels in data:
        rows = tokens.shape[0] // size
        part = slice(rank * rows, (rank + 1) * rows)
        optimizer.zero_grad(set_to_none=True)
        model(tokens[part], labels=labels[part]).backward()
        if layout is not None:
            layout.finish_grad_sync()
        optimizer.step()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a full tensor (gathering DTensors), by name."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        out[name] = t.full_tensor() if hasattr(t, "full_tensor") else t.clone()
    return out


def plain_ns(g: torch.Tensor, triples) -> torch.Tensor:
    """Newton-Schulz on one fp32 matrix, written out."""
    x = g / (g.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for a, b, c in triples:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x
