"""What a layout may ask of a model besides ``forward``: its loss head, and its pipeline stages.

Both are optional parts of a model (``ModelFactory.build``'s result) that layouts read
structurally, so ``tp`` can swap the loss for a vocab-parallel one and ``pp`` can cut the model
into stages without knowing the model's class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mcore.protocols.block import BlockContext


@runtime_checkable
class LossHead(Protocol):
    """The end of a model: final norm, output projection, cross-entropy and MTP heads.

    A model that has one exposes it as the attribute ``loss_head`` (an ``nn.Module`` that owns no
    parameters of its own: it computes with the model's final norm, output weight and MTP layers,
    whose parameter names stay the model's); a layout replaces it with ``model.loss_head = ...``
    (a vocab-parallel loss under ``tp``).

    Contract:
        * ``__call__(hidden, *, tokens, labels, ctx)``: ``hidden (B, T, H)`` the output of the last
          layer, ``tokens (B, T)`` the input ids (MTP heads embed the next tokens), ``labels (B, T)``
          int64 with ``-100`` ignored. Returns logits ``(B, T, V)`` when ``labels`` is ``None``,
          else a 0-d fp32 loss: the sum of the token losses over this call's labels divided by
          ``ctx.label_count(local_count)`` (the count of non-ignored labels over every rank of
          ``ctx.loss_group``: the per-rank losses of a micro-batch a layout split add up to its
          mean), plus the MTP losses likewise. Auxiliary losses are the model's, not the head's.
        * optional ``vocab_parallel(group) -> LossHead``: the same head for an output weight a
          ``tp`` layout has split by rows over ``group`` (a ``Shard(0)`` ``DTensor``, or the
          rank's rows): it computes each token's loss with
          ``mcore.vocab_parallel.vocab_parallel_cross_entropy_sum`` (no rank forms the full
          logits) and, without labels, returns the full logits (gathered over ``group``). The
          layout calls it after sharding; a head without it keeps its output weight whole.
    """

    def __call__(
        self,
        hidden: torch.Tensor,
        *,
        tokens: torch.Tensor,
        labels: torch.Tensor | None,
        ctx: BlockContext,
    ) -> torch.Tensor: ...


@runtime_checkable
class StagedModel(Protocol):
    """A model that can be cut into pipeline stages (``pp``): embedding first, loss head last.

    Contract:
        * ``stage_layers() -> int``: how many layers can be distributed over stages.
        * ``pipeline_stage(layers, *, first, last) -> nn.Module``: a module holding only what the
          stage runs — its ``layers`` (a ``range`` of layer indices), the embedding when ``first``,
          the final norm, output weight and MTP layers when ``last`` (when the output weight is
          tied or the loss head needs the embedding — MTP embeds the next tokens — the last stage
          holds the embedding too, under its name: the layout sums its gradient with the first
          stage's and counts it once in the gradient norm, ``grad_norm_replicas``) — under the FULL model's parameter names
          (``layers.7.mlp.up.weight`` stays that on every stage), so the union of the stages'
          state dicts is the model's and a ``pp2`` checkpoint loads under ``pp1``. The stage
          shares the model's parameters (no copy).
        * The stage's ``forward(inputs, *, tokens, labels=None, ctx)``: ``inputs`` is ``tokens
          (B, T)`` on the first stage, else the previous stage's hidden states ``(B, T, H)``;
          returns hidden states ``(B, T, H)`` except on the last stage, which returns what the
          model returns (loss with labels, logits without). A stage adds to ``ctx.aux_losses``
          (the schedule gives each micro-batch its own collector) and the last stage adds only
          its own entries to its loss; the schedule backpropagates the other stages' entries
          with the same scale as the loss.
    """

    def stage_layers(self) -> int: ...

    def pipeline_stage(self, layers: range, *, first: bool, last: bool) -> nn.Module: ...
