"""Pipeline stages of the ``gpt`` model (``mcore.protocols.model.StagedModel``).

Shape legend: B rows, T tokens per row, H hidden, V vocabulary.

A ``pp`` layout runs a consecutive run of layers on each rank: the embedding on the first stage,
the loss head on the last. ``GPTStage`` holds exactly what one stage runs, the model's own modules
(no copies), under the FULL model's names: its layers sit in an ``nn.ModuleDict`` keyed by their
index in the model, so ``layers.7.mlp.up.weight`` is that on every stage, the union of the stages'
state dicts is the model's, and a checkpoint saved by ``pp2`` loads under ``pp1`` (and the other
way). Each layer still gets ``ctx.for_layer(its model index)``, so KV-cache slices and
auxiliary-loss keys do not depend on the cut.

Shared weights: the last stage also holds ``embed`` when the output weight is tied to it or when
MTP is on (MTP depths embed the next tokens). On separate ranks these are two copies of one
parameter: the ``pp`` layout must sum ``embed.weight``'s gradient over the first and the last
stage (and count it once when clipping); in one process they are the same ``Parameter``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mcore.params import ParamSpec
from mcore.protocols.block import LOGIT_ROWS, BlockContext
from mcore.protocols.model import LossHead
from mcore_models.gpt import GPT, batch_context, logit_rows
from mcore_models.loss_head import SwappableLossHead, add_aux_losses


class GPTStage(SwappableLossHead):
    """``forward(inputs, *, tokens (B, T), labels=None, ctx=None)``: ``inputs`` is ``tokens`` on the
    first stage, else the previous stage's hidden states ``(B, T, H)``; returns ``(B, T, H)``, or on
    the last stage what ``GPT.forward`` returns (logits, or the loss plus the auxiliary losses of this
    stage's own layers and MTP depths: the schedule backpropagates the other stages' entries)."""

    embed: nn.Embedding
    final_norm: Any
    head: nn.Linear
    mtp: nn.ModuleList
    mtp_norms: nn.ModuleList
    #: The last stage's end: the model's loss head when cut (its modules are this stage's); a layout swaps it.
    loss_head: LossHead

    def __init__(self, model: GPT, layers: range, *, first: bool, last: bool) -> None:
        super().__init__()
        count = model.stage_layers()
        if not isinstance(layers, range) or layers.step != 1 or not 0 <= layers.start <= layers.stop <= count:
            raise ValueError(
                f"pipeline_stage(layers={layers!r}): expected range(start, stop) of consecutive layer indices "
                f"with 0 <= start <= stop <= {count}"
            )
        self.first, self.last, self.layer_range = first, last, layers
        self.attention_backend = model.attention_backend
        if first or (last and (model.head is None or len(model.mtp))):
            self.embed = model.embed
        self.layers = nn.ModuleDict({str(index): model.layers[index] for index in layers})
        self.own_layers: frozenset[int] = frozenset(layers)  # whose auxiliary losses this stage adds
        if last:
            self.final_norm = model.final_norm
            if model.head is not None:
                self.head = model.head
            self.mtp, self.mtp_norms = model.mtp, model.mtp_norms
            self.own_layers |= frozenset(range(count, count + len(model.mtp)))
            self.loss_head = model.loss_head
        names = dict(self.named_parameters())
        self._specs = {name: spec for name, spec in model.param_specs().items() if name in names}

    def param_specs(self) -> dict[str, ParamSpec]:
        """The model's declarations of the embedding and head this stage holds (blocks declare their own)."""
        return dict(self._specs)

    def forward(
        self,
        inputs: torch.Tensor,
        *,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        ctx: BlockContext | None = None,
    ) -> torch.Tensor:
        ctx = batch_context(tokens, ctx, self.attention_backend)  # every stage needs the documents' positions
        hidden = self.embed(inputs) if self.first else inputs  # (B, T, H)
        for index, layer in self.layers.items():
            hidden = layer(hidden, ctx.for_layer(int(index)))  # the layer's index in the whole model
        if not self.last:
            return hidden
        if labels is None and LOGIT_ROWS in ctx.extra:  # the engine's rows only: logits (1, R, V)
            hidden, tokens = logit_rows(hidden, tokens, ctx.extra[LOGIT_ROWS])
        out = self.loss_head(hidden, tokens=tokens, labels=labels, ctx=ctx)  # logits (B, T, V), or the loss
        if labels is None:
            return out
        assert ctx.aux_losses is not None
        return add_aux_losses(out, ctx.aux_losses, self.own_layers, divisor=ctx.loss_group_size())
