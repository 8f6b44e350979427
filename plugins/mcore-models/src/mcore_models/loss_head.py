"""The ``gpt`` model's loss head: final norm, output projection, fused cross-entropy and MTP heads.

Shape legend: B rows, T tokens per row, H hidden, V vocabulary.

It exists as a module of its own (``mcore.protocols.model.LossHead``) so that a layout can swap the
end of the model without touching ``GPT.forward``: a vocabulary-parallel loss under ``tp``, the last
stage only under ``pp``. The head owns no parameters and is no child of the model: it computes with
the model's own final norm, output weight, embedding (the tied head and the MTP depths' next-token
embeddings) and MTP layers, held in ``LossHeadParts``, so the model's parameter names and state dict
do not change. MTP depth ``d`` reads the row ``d`` tokens ahead; a layout whose ranks hold parts of
each row (``cp``) hands those tokens and labels in ``ctx.extra[MTP_AHEAD]`` (``mcore.protocols.block``),
computed on the whole row. ``SwappableLossHead`` makes ``model.loss_head = Other(...)`` store the head
as a plain attribute instead of registering a child module.

Each loss is the sum over this call's labels divided by ``ctx.label_count(local_count)``: the
count over every rank of ``ctx.loss_group``, so the losses of the ranks a layout split a
micro-batch over add up to its mean; with no group it is this call's own count (the mean).

Under tensor parallelism the layout splits the output weight by rows and swaps in
``head.vocab_parallel(group)`` (``VocabParallelGPTLossHead``): the same losses, each token's computed by
``mcore.vocab_parallel.vocab_parallel_cross_entropy_sum`` (no rank forms the full logits).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mcore.errors import UserError
from mcore.protocols.block import MTP_AHEAD, AuxLosses, BlockContext
from mcore.vocab_parallel import group_size, local_vocab_rows, vocab_parallel_cross_entropy_sum, vocab_parallel_logits
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
            return self.logits(p.final_norm(hidden, ctx))  # (B, T, V)
        loss = self.token_loss(p.final_norm(hidden, ctx), labels, ctx)
        if not len(p.mtp):
            return loss
        mtp_total = torch.zeros((), dtype=torch.float32, device=tokens.device)
        for depth, (module, norm) in enumerate(zip(p.mtp, p.mtp_norms, strict=True), start=1):
            ahead, depth_labels = self.read_ahead(tokens, labels, ctx, depth)  # (B, T) each
            next_embeddings = p.embed(ahead)  # (B, T, H): t[i + depth]
            view = ctx.for_layer(p.first_mtp_layer + depth - 1, extra={NEXT_EMBEDDINGS: next_embeddings})
            hidden = module(hidden, view)
            mtp_total = mtp_total + self.token_loss(norm(hidden, view), depth_labels, ctx)
        return loss + p.mtp_loss_weight / len(p.mtp) * mtp_total

    @staticmethod
    def read_ahead(
        tokens: torch.Tensor, labels: torch.Tensor, ctx: BlockContext, depth: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP depth ``depth``'s inputs ``t[i + depth]`` and labels, ``(B, T)`` each: from ``ctx.extra[MTP_AHEAD]``
        when a layout that splits rows (``cp``) computed them on the whole row, else from this call's row."""
        given = ctx.extra.get(MTP_AHEAD)
        if given is not None:
            assert len(given) >= depth, f"ctx.extra[{MTP_AHEAD!r}] has {len(given)} MTP depths, the model {depth}+"
            return given[depth - 1]  # type: ignore[no-any-return]
        batch, seq = tokens.shape
        positions = (
            ctx.positions if ctx.positions is not None else torch.arange(seq, device=tokens.device).expand(batch, seq)
        )
        return tokens.roll(-depth, dims=1), mtp_labels(labels, positions, depth)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, T, V)`` logits of the final-normed ``hidden (B, T, H)`` (muP's ``logit_scale`` applied)."""
        return F.linear(hidden, self.parts.output_weight) * self.parts.logit_scale

    def vocab_parallel(self, group: Any) -> VocabParallelGPTLossHead:
        """This head for an output weight a ``tp`` layout has split by rows over ``group``
        (``mcore.protocols.model.LossHead``; see ``VocabParallelGPTLossHead``)."""
        return VocabParallelGPTLossHead(self.parts, group)

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


class VocabParallelGPTLossHead(GPTLossHead):
    """``GPTLossHead`` with the output weight (the embedding's when tied) split by rows over ``group``.

    The weight, read at each call, is either a ``DTensor`` placed ``Shard(0)`` over a 1-D mesh of the
    ranks of ``group`` (this rank's rows: ``.to_local()``, starting at ``rank * (V // world)``), or a
    plain tensor holding this rank's ``V // world`` rows (the same start; ``rank``: in ``group``). The
    vocabulary size must divide by the group's size (``UserError`` otherwise, at construction). Every
    rank of ``group`` calls the head with the same ``hidden``, ``tokens`` and ``labels`` (the layout
    gathers sequence shards first); the loss, main and MTP depths, divided as ``GPTLossHead`` divides
    it, is the same on every rank. ``loss_vocab_chunk_size`` is not used (a rank's rows are one block).

    Without labels the logits ``(B, T, V)`` are whole on every rank: each rank's slice gathered over
    ``group``. That path is differentiable, for a loss every rank computes alike from the whole logits
    (as it does from any replicated output under ``tp``): a rank's logit slice gets its slice of the
    gradient, and the gradient of ``hidden`` is summed over the group.
    """

    def __init__(self, parts: LossHeadParts, group: Any) -> None:
        super().__init__(parts)
        self.group = group
        world, vocab = group_size(group), parts.embed.num_embeddings
        if vocab % world:
            raise UserError(
                f"model.vocab_size = {vocab} does not split over the {world} ranks of the tensor-parallel group; "
                f"allowed: a multiple of {world} (pad the vocabulary)"
            )
        if parts.vocab_chunk_size is not None:
            warnings.warn(
                f"model.loss_vocab_chunk_size = {parts.vocab_chunk_size} is not used by the vocab-parallel loss: "
                "each rank's vocabulary rows are one block",
                stacklevel=2,
            )

    def local_weight(self) -> tuple[torch.Tensor, int]:
        """This rank's output-weight rows ``(V / world, H)`` and the vocabulary index of the first."""
        return local_vocab_rows(self.parts.output_weight, self.parts.embed.num_embeddings, self.group)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The whole ``(B, T, V)`` logits on every rank: each rank's ``(B, T, V / world)`` slice, gathered."""
        weight, _ = self.local_weight()
        return vocab_parallel_logits(hidden, weight, group=self.group, scale=self.parts.logit_scale)  # (B, T, V)

    def token_loss(self, hidden: torch.Tensor, labels: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """``GPTLossHead.token_loss`` with each rank's vocabulary rows (``vocab_parallel_cross_entropy_sum``)."""
        p = self.parts
        weight, vocab_start = self.local_weight()
        flat = hidden.reshape(-1, hidden.shape[-1])  # (B*T, H)
        flat_labels = labels.reshape(-1)  # (B*T,)
        total = vocab_parallel_cross_entropy_sum(
            flat,
            weight,
            flat_labels,
            vocab_start=vocab_start,
            group=self.group,
            chunk_size=p.chunk_size,
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
