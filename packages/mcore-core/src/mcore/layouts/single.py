"""Layout ``single``: one process, the model as it is. The identity of the layout protocol."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar

from mcore.protocols.layout import DataParallelInfo

if TYPE_CHECKING:
    from torch import nn

    from mcore.mesh import ParallelMesh
    from mcore.protocols.precision import PrecisionRecipe


class SingleLayout:
    """Leaves the model untouched; valid only when the world size is 1."""

    name: ClassVar[str] = "single"
    mesh_dims: ClassVar[tuple[str, ...]] = ()
    #: ``apply`` works on a model on the meta device (it touches nothing; see ``mcore.train.build``)
    supports_meta_init: ClassVar[bool] = True

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def apply(self, model: nn.Module, mesh: ParallelMesh, precision: PrecisionRecipe | None = None) -> nn.Module:
        if mesh.world_size != 1:
            raise ValueError(
                f"layout 'single' runs on one process but the mesh spans {mesh.world_size}; "
                "add a data-parallel layout (e.g. parallel.layouts = ['ddp'] or ['fsdp'])"
            )
        return model

    def data_parallel(self) -> DataParallelInfo:
        return DataParallelInfo(rank=0, size=1, group=None)

    def no_grad_sync(self) -> AbstractContextManager[None]:
        return nullcontext()

    def finish_grad_sync(self) -> None:
        return None

    def state_dict_options(self) -> dict[str, Any]:
        return {}
