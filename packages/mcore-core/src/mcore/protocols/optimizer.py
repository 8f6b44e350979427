"""Optimizers: built by name for a model that layouts have already transformed.

Which parameter is an embedding, the head, a matrix or a fused ``[q | k | v]`` is declared by
the model (``mcore.params``); optimizers read it with ``collect_param_specs`` rather than
guessing from names. ``mcore plan`` asks the optimizer how much state it keeps
(``OptimizerStateSize``) rather than guessing from its name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mcore.mesh import ParallelMesh
    from mcore.params import ParamSpec
    from mcore.protocols.layout import ParallelLayout


@runtime_checkable
class MeshOptimizer(Protocol):
    """The optimizer object a factory returns; ``torch.optim.Optimizer``-shaped.

    Contract:
        * ``param_groups``: list of dicts with at least ``"lr"`` (schedulers write it) and
          ``"params"``; extra keys (``"role"``: one of ``mcore.params.ROLES``) are allowed.
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
class ScaledStep(Protocol):
    """Optional: a ``MeshOptimizer`` that multiplies the gradients by a factor inside its update.

    Gradient clipping is a multiply of every gradient by ``min(1, max_norm / norm)``: one more pass over all
    gradients before the update. When the optimizer has this method the run loop hands it the factor instead
    (``step_scaled(grad_scale)``; ``grad_scale`` a 0-d fp32 tensor on the gradients' device, read on the device,
    no host sync) and calls it in place of ``step()``; the update must equal ``step()`` after ``.grad`` had been
    multiplied by ``grad_scale`` (fp32 gradients exactly; lower-precision ones may be multiplied after widening,
    which rounds less). ``.grad`` may be left unscaled: nothing reads it after the step. Without the method the
    loop scales ``.grad`` (``mcore.train.grads.clip_grads_``) and calls ``step()``.
    """

    def step_scaled(self, grad_scale: torch.Tensor) -> None: ...


@runtime_checkable
class GuardedStep(Protocol):
    """Optional: a ``MeshOptimizer`` that can skip a bad step on the device.

    The run loop decides whether a step is good (finite loss and gradients on every rank, no loss spike) from
    numbers it must read on the host, and that read waits for the whole backward: the GPU then idles until the
    host has queued the update and the next forward. ``step_guarded(ok, grad_scale)`` lets it queue the update
    first: ``ok`` is the loop's decision as a 0-d bool tensor on the parameters' device; where it is false the
    call must leave every parameter, every state tensor and every step count exactly as they were (read on the
    device: no host sync); where true it is ``step_scaled(grad_scale)`` (``step()`` when ``grad_scale`` is
    ``None``). It returns ``False``, having done nothing, when it cannot guard this step on the device (then
    the loop reads the decision and calls ``step``/``step_scaled`` as without this method).
    """

    def step_guarded(self, ok: torch.Tensor, grad_scale: torch.Tensor | None = None) -> bool: ...


@runtime_checkable
class OptimizerFactory(Protocol):
    """Registered under kind ``"optimizer"`` (``adamw``, ``muon``, ...).

    The registered class has a keyword-only dataclass ``Config`` (the ``[optimizer]``
    section's schema beyond ``name``; at least ``lr`` and ``weight_decay``); it is
    instantiated with that config and ``build`` is called once after all layouts are
    applied. ``build`` sees the layouts so it can find the data-parallel group
    (``layout.data_parallel()``) and whether parameters are DTensors.

    ``build`` may ask the one layout implementing ``GradientShardingLayout``
    (``mcore.protocols.sharded_grads.grad_sharding_layout(layouts)``) for this rank's
    ``GradShards`` and then update only those elements, ending ``step()`` with
    ``layout.gather_params()``; its state is then saved per parameter name as 1-D row-ragged
    ``Shard(0)`` DTensors (local part = the piece), so it reshards under any DP size; such a
    factory answers ``shards_state_over_dp(sharded_params=False)`` with True.
    """

    def build(
        self,
        model: nn.Module,
        *,
        mesh: ParallelMesh,
        layouts: Sequence[ParallelLayout],
    ) -> MeshOptimizer: ...


@runtime_checkable
class OptimizerStateSize(Protocol):
    """Optional: an ``OptimizerFactory`` that says how much state it keeps (``mcore plan`` reads it).

    Contract:
        * ``state_bytes(shape, spec, *, param_dtype)``: bytes of optimizer state (moments,
          master copies, step counts...) this optimizer keeps for one whole parameter of
          ``shape`` (global, unsharded), declared ``spec`` (its role decides e.g. momentum only
          for Muon's matrices) and ``param_dtype``, summed over all ranks as if nothing were
          sharded. Layouts that shard parameters (``dp_shard``, ``tp``, ``pp``, ``ep``) shard
          this state with them; the planner divides by their sizes.
        * ``shards_state_over_dp(*, sharded_params)``: whether each data-parallel replica keeps
          only its share of the state of parameters that are *replicated* over
          ``dp_replicate`` (ZeRO-1, whole parameters bin-packed over ranks). ``sharded_params``
          says whether the layouts shard the parameters (they are ``DTensor``s), which may change
          the answer (``distributed-adamw`` falls back to plain AdamW then). The planner divides
          the state by the ``dp_replicate`` size when it is true.

    A factory without these methods is planned as AdamW-like: two fp32 tensors per parameter
    element, plus an fp32 master copy when parameters are not fp32, not split over
    ``dp_replicate``; the plan says so in its assumptions.
    """

    def state_bytes(self, shape: tuple[int, ...], spec: ParamSpec, *, param_dtype: torch.dtype) -> int: ...

    def shards_state_over_dp(self, *, sharded_params: bool) -> bool: ...
