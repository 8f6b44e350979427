"""Stand-in data-parallel layouts for tests of packages that cannot depend on a layout plugin.

* ``AllReduceLayout`` (``test-ddp``): replicated parameters; gradients all-reduced and averaged
  over the ``dp_replicate`` dimension in ``finish_grad_sync``.
* ``TorchShardLayout`` (``test-fsdp``): parameters sharded over ``dp_shard`` by PyTorch's own
  ``fully_shard`` (each child of ``model.layers``, then the root).

``LayoutsPlugin()`` registers both under those names (pass it to ``isolated_host``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar

import torch.distributed as dist
from torch import nn

from mcore.plugins import hookimpl
from mcore.protocols import DataParallelInfo


class AllReduceLayout:
    """Replicated data parallelism; gradients reduced once per step, in ``finish_grad_sync``."""

    name: ClassVar[str] = "test-ddp"
    mesh_dims: ClassVar[tuple[str, ...]] = ("dp_replicate",)

    def __init__(self, config: Any = None) -> None:
        self.mesh: Any = None
        self.model: nn.Module | None = None

    def apply(self, model: nn.Module, mesh: Any, precision: Any = None) -> nn.Module:
        self.mesh, self.model = mesh, model
        return model

    def data_parallel(self) -> DataParallelInfo:
        dim = "dp_replicate"
        return DataParallelInfo(rank=self.mesh.rank(dim), size=self.mesh.size(dim), group=self.mesh.group(dim))

    def no_grad_sync(self) -> AbstractContextManager[None]:
        return nullcontext()  # nothing is reduced before finish_grad_sync anyway

    def finish_grad_sync(self) -> None:
        dp = self.data_parallel()
        if dp.size == 1 or self.model is None:
            return
        for p in self.model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=dp.group)
                p.grad.div_(dp.size)

    def state_dict_options(self) -> dict[str, Any]:
        return {}


class TorchShardLayout:
    """Parameters as ``Shard(0)`` DTensors over ``dp_shard`` through ``torch.distributed.fsdp.fully_shard``."""

    name: ClassVar[str] = "test-fsdp"
    mesh_dims: ClassVar[tuple[str, ...]] = ("dp_shard",)

    def __init__(self, config: Any = None) -> None:
        self.mesh: Any = None

    def apply(self, model: nn.Module, mesh: Any, precision: Any = None) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        self.mesh = mesh
        sub = mesh.submesh(["dp_shard"])
        for block in model.layers:  # type: ignore[union-attr]
            fully_shard(block, mesh=sub)
        fully_shard(model, mesh=sub)
        return model

    def data_parallel(self) -> DataParallelInfo:
        dim = "dp_shard"
        return DataParallelInfo(rank=self.mesh.rank(dim), size=self.mesh.size(dim), group=self.mesh.group(dim))

    def no_grad_sync(self) -> AbstractContextManager[None]:
        return nullcontext()  # fully_shard reduce-scatters in every backward: correct, not frugal

    def finish_grad_sync(self) -> None:
        return None

    def state_dict_options(self) -> dict[str, Any]:
        return {}


class LayoutsPlugin:
    """Registers ``test-ddp`` and ``test-fsdp``."""

    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        registry.add("layout", "test-ddp", "mcore_testing.layouts:AllReduceLayout", summary="tests: all-reduce DP")
        registry.add(
            "layout", "test-fsdp", "mcore_testing.layouts:TorchShardLayout", summary="tests: torch fully_shard"
        )
