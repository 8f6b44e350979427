"""The ``gpt`` model's loss head: final norm, output projection, fused cross-entropy and MTP heads.

Shape legend: B rows, T tokens per row, H hidden, V vocabulary.

It exists as a module of its own (``mcore.protocols.model.LossHead``) so that a layout can swap the
end of the model without touching ``GPT.forward``: a vocabulary-parallel loss under ``tp``, the last
stage only under ``pp``. The head owns no parameters and is no child of the model: it computes with
the model's own final norm, output weight, embedding (the tied head and the MTP depths' next-token
embeddings) and MTP layers, held in ``LossHeadParts``, so the model's parameter names and state dict
do not change. ``SwappableLossHead`` makes ``model.loss_head = Other(...)`` store the head as a plain
attribute instead of registering a child module.

Each loss is the sum over this call's labels divided by ``ctx.label_count(local_count)``: the
count over every rank of ``ctx.loss_group``, so the losses of the ranks a layout split a
micro-batch over add up to its mean; with no group it is this call's own count (the mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mcore.protocols.block import AuxLosses, BlockContext
from mcore_models.blocks.mtp import NEXT_EMBEDDINGS
from mcore_models.kernels.linear_ce import IGNORE_INDEX, linear_cross_entropy_sum


def mtp_labels(labels: torch.Tensor, positions: torch.Tensor, depth: int) -> torch.Tensor:
    """Labels for MTP depth ``depth``: ``labels[i + depth]`` where still in the same document, else ignored."""
    shifted = torch.full_like(labels, IGNORE_INDEX)  # (B, T)
    same_doc = positions[:, depth:] == positions[:, :-depth] + depth
    shifted[:, :-depth] = torch.where(same_doc, labels[:, depth:], IGNORE_INDEX)
    return shifted


def add_aux_losses(loss: torch.Tensor, aux_losses: AuxLosses, layers: Any = None, *, divisor: int = 1) -> torch.Tensor:
    """``loss`` plus the collector's entries (fp32) divided by ``divisor`` (the ranks of a split
    micro-batch: ``BlockContext.loss_group_size``), in the collector's order; only those of
    ``layers`` (a container of layer indices) when given."""
    for (layer, _), aux in aux_losses.items():
        if layers is None or layer in layers:
            loss = loss + (aux.float() if divisor == 1 else aux.float() / divisor)
    return loss


@dataclass(frozen=True, eq=False)
class LossHeadParts:
    """What the head computes with: the model's own modules (not copies) and settings.

    ``head`` is ``None`` when the output weight is the embedding's (tied). ``first_mtp_layer`` is
    the layer index of MTP depth 1 (the model's layer count: depths continue the numbering).
    """

    final_norm: nn.Module
    embed: nn.Embedding
    head: nn.Linear | None
    mtp: nn.ModuleList
    mtp_norms: nn.ModuleList
    logit_scale: float
    chunk_size: int
    vocab_chunk_size: int | None
    mtp_loss_weight: float
    first_mtp_layer: int

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight  # (V, H)


class GPTLossHead(nn.Module):
    """``head(hidden (B, T, H), *, tokens (B, T), labels (B, T) | None, ctx)``: logits ``(B, T, V)``
    without labels, else the 0-d fp32 loss (main + ``mtp_loss_weight`` x mean over MTP depths)."""

    def __init__(self, parts: LossHeadParts) -> None:
        super().__init__()
        self.parts = parts  # a plain attribute: the modules stay the model's children, not ours

    def forward(
        self, hidden: torch.Tensor, *, tokens: torch.Tensor, labels: torch.Tensor | None, ctx: BlockContext
    ) -> torch.Tensor:
        p = self.parts
        if labels is None:
            return F.linear(p.final_norm(hidden, ctx), p.output_weight) * p.logit_scale  # (B, T, V)
        loss = self.token_loss(p.final_norm(hidden, ctx), labels, ctx)
        if not len(p.mtp):
            return loss
        batch, seq = tokens.shape
        positions = (
            ctx.positions if ctx.positions is not None else torch.arange(seq, device=tokens.device).expand(batch, seq)
        )
        mtp_total = torch.zeros((), dtype=torch.float32, device=tokens.device)
        for depth, (module, norm) in enumerate(zip(p.mtp, p.mtp_norms, strict=True), start=1):
            next_embeddings = p.embed(tokens.roll(-depth, dims=1))  # (B, T, H): t[i + depth]
            view = ctx.for_layer(p.first_mtp_layer + depth - 1, extra={NEXT_EMBEDDINGS: next_embeddings})
            hidden = module(hidden, view)
            mtp_total = mtp_total + self.token_loss(norm(hidden, view), mtp_labels(labels, positions, depth), ctx)
        return loss + p.mtp_loss_weight / len(p.mtp) * mtp_total

    def token_loss(self, hidden: torch.Tensor, labels: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """Fused output projection + cross-entropy summed over ``labels``, divided by their count over
        ``ctx.loss_group``; the ``(B*T, V)`` logits are never formed."""
        p = self.parts
        flat = hidden.reshape(-1, hidden.shape[-1])  # (B*T, H)
        flat_labels = labels.reshape(-1)  # (B*T,)
        total = linear_cross_entropy_sum(
            flat,
            p.output_weight,
            flat_labels,
            chunk_size=p.chunk_size,
            vocab_chunk_size=p.vocab_chunk_size,
            scale=p.logit_scale,
        )
        return total / ctx.label_count((flat_labels != IGNORE_INDEX).sum())


class SwappableLossHead(nn.Module):
    """A module whose ``loss_head`` is a seam: assigning it stores a plain attribute, never a child,
    so a layout's replacement head (which computes with this module's parameters) adds no names."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "loss_head":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)
