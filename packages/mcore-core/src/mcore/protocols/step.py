"""State a module updates after the optimizer step, from what the step's forward passes saw.

Some state is not trained by gradients: DeepSeek-V3's auxiliary-loss-free MoE balancing moves
each expert's routing bias by the sign of its load error after every step. The counts behind it
must be summed over every rank that saw different tokens of the step (data-parallel ranks, the
ranks of a split sequence) and over no rank that saw the same tokens (tensor- or pipeline-parallel
copies), or the bias would move by a different amount on each replica. The run loop knows those
groups; the block does not import ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class AfterOptimizerStep(Protocol):
    """A module (any module of the model) with state to update once per optimizer step.

    Contract:
        * ``after_optimizer_step(reduce, *, applied)``: called by the run loop once per step on
          every module of the (parallelized) model that has it (found once when the run starts), after ``optimizer.step()`` and
          before the precision recipe's ``after_step``, in ``model.modules()`` order, on every rank.
          ``reduce(tensor)`` sums ``tensor`` in place over the ranks that saw distinct tokens of
          this step (every layout's data-parallel group and the loss group of a split sequence)
          and returns it; each rank holding the module must call it the same number of times
          with tensors of the same shape (it is a collective). ``applied`` is ``False`` when the
          step was skipped (non-finite gradients, a loss spike): the module drops what it counted
          for the step and changes nothing, and must still make the same ``reduce`` calls as on
          other ranks (all ranks agree on ``applied``).
        * What the module counts during forward (e.g. tokens per expert) it keeps in buffers it
          owns; recompute must not count twice (count in a forward that runs with grad enabled
          once per micro-batch, or key by micro-batch) and evaluation must not count (``not
          self.training``).
    """

    def after_optimizer_step(self, reduce: Callable[[torch.Tensor], torch.Tensor], *, applied: bool) -> None: ...


@runtime_checkable
class ReportsStepMetrics(Protocol):
    """A module (any module of the model) with numbers to log about the last optimizer step.

    Contract:
        * ``step_metrics(reduce)``: called by the run loop on the steps it logs (``log.every``, the
          first and last step, a stop), on every rank, after ``after_optimizer_step``, in
          ``model.modules()`` order. It describes the step that just ended (what the module counted
          during that step's training forward passes, summed over its micro-batches): a module that
          also has ``after_optimizer_step`` keeps a copy of the finished step's counts there, because
          it starts counting the next step afresh. ``reduce`` is the same collective sum as
          ``after_optimizer_step``'s (every rank holding the module calls it the same number of times
          with the same shapes, whether or not it writes the log).
        * Returns ``{name: value}`` of plain floats, names unique across the model (the layer index in
          them, ``"moe/3/dropped_fraction"``); they go into ``metrics.jsonl`` and TensorBoard as
          they are. Empty before the first step. Ranks holding different layers (pipeline stages)
          report their own; the loop gathers them for the writer.
    """

    def step_metrics(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]: ...
