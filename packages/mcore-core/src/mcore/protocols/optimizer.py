"""Optimizers: built by name for a model that layouts have already transformed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import nn

    from mcore.mesh import ParallelMesh
    from mcore.protocols.layout import ParallelLayout


@runtime_checkable
class MeshOptimizer(Protocol):
    """The optimizer object a factory returns; ``torch.optim.Optimizer``-shaped.

    Contract:
        * ``param_groups``: list of dicts with at least ``"lr"`` (schedulers write it) and
          ``"params"``; extra keys (``"role"``: ``"matrix" | "embedding" | "head" | "norm" |
          "bias"``) are allowed.
        * ``step()``: one update from the gradients currently in ``.grad`` (already
          averaged over data-parallel ranks by the layouts). For distributed variants,
          all ranks call it; afterwards every rank's parameters are up to date.
        * ``zero_grad(set_to_none=True)``.
        * ``state_dict()``: a nested dict whose tensors ``torch.distributed.checkpoint`` can
          save: per-parameter state keyed by the parameter's fully qualified name (never by
          position), sharded as ``DTensor`` where the state is sharded, so it reshards on load
          under another data-parallel size. It records the parameter names and shapes it was
          saved for; ``load_state_dict`` refuses state that does not match the model's
          parameters (names or shapes) with an error naming the first mismatch.
    """

    param_groups: list[dict[str, Any]]

    def step(self) -> None: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@runtime_checkable
class OptimizerFactory(Protocol):
    """Registered under kind ``"optimizer"`` (``adamw``, ``muon``, ...).

    The registered class has a keyword-only dataclass ``Config`` (the ``[optimizer]``
    section's schema beyond ``name``; at least ``lr`` and ``weight_decay``); it is
    instantiated with that config and ``build`` is called once after all layouts are
    applied. ``build`` sees the layouts so it can find the data-parallel group
    (``layout.data_parallel()``) and whether parameters are DTensors.
    """

    def build(
        self,
        model: nn.Module,
        *,
        mesh: ParallelMesh,
        layouts: Sequence[ParallelLayout],
    ) -> MeshOptimizer: ...
