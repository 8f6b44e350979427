"""``distributed-adamw`` on a layout's pieces: ZeRO-1 through the core's handshake (``mcore.protocols.sharded_grads``).

Why it exists: ``distributed_adamw.DistributedAdamW`` lays the parameters out in a flat vector of its own and reads
its range of gradients the layout has all-reduced (or reduce-scatters them itself with ``reduce_grads``): the layout
moves twice the bytes it needs to, or the optimizer repeats a reduction the layout knows how to bucket and overlap.
A layout that implements ``GradientShardingLayout`` (``ddp``) reduce-scatters its buckets instead once asked
(``shard_grads()``) and hands back which elements of which parameters this rank owns (``ShardPiece``); this
optimizer updates exactly those and ends each step with the layout's ``gather_params()``. The factory builds it
whenever the layout accepts; a layout that declines (``None``) gets ``DistributedAdamW`` as before.

* The update is ``adamw.AdamW``'s (its ``_update``: the Triton pass on CUDA, torch's fused kernel, or the
  ``foreach`` path of ``adamw_math``), over each piece as a 1-D view: the weight is the piece of an fp32
  parameter itself, or an fp32 master of a low-precision one (written back into ``piece.values()``), the
  gradient ``piece.grad()``, the moments two fp32 tensors of the piece's length. A piece of no element still
  counts the step, so every rank keeps the same step counts (the saved ones).
* ``state_dict()``: ``adamw``'s format (``state.header``, per-name entries) with each moment and master saved
  *flat*: a 1-D row-ragged ``Shard(0)`` DTensor of the parameter's element count over ``GradShards.device_mesh``
  whose local part is the piece (the protocol's checkpoint format; the checkpoint code annotates the real
  chunks). ``load_state_dict`` takes it back under any data-parallel size (a flat DTensor split like ours is
  this rank's piece as is, any other is gathered and sliced), and takes ``adamw``'s, ``DistributedAdamW``'s
  and ``layerwise-distributed``'s parameter-shaped state as well; they load the flat form (``state.unflatten``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.tensor import DTensor, Shard

from mcore_optim import state as state_format
from mcore_optim.adamw import AdamW, GroupTensors
from mcore_optim.dist import counts_of, whole
from mcore_optim.roles import NamedParam

if TYPE_CHECKING:
    from mcore.protocols.sharded_grads import GradientShardingLayout, GradShards, ShardPiece


class PiecesAdamW(AdamW):
    """The ``MeshOptimizer`` of ``distributed-adamw`` when a layout hands it reduce-scattered gradients.

    ``named``: the model's trainable parameters (every one a piece of ``shards``); ``layout``: the layout that
    returned ``shards``, whose ``gather_params()`` ends every update.
    """

    def __init__(
        self,
        named: Sequence[NamedParam],
        *,
        shards: GradShards,
        layout: GradientShardingLayout,
        settings: Mapping[str, Mapping[str, float]],
        betas: tuple[float, float],
        eps: float,
        fused: bool,
        triton: bool,
    ) -> None:
        self.shards, self.layout = shards, layout
        self.pieces: dict[str, ShardPiece] = {piece.name: piece for piece in shards.pieces}
        super().__init__(
            named, settings=settings, betas=betas, eps=eps, fused=fused, master_weights=True, triton=triton
        )

    def _new_state(self, n: NamedParam) -> dict[str, torch.Tensor]:
        """Step count, fp32 moments of the piece's length and, for a low-precision parameter, its fp32 master."""
        piece = self.pieces[n.name]
        values = piece.values()  # (piece.numel,)
        st = {
            "step": torch.zeros((), dtype=torch.float32, device=values.device),
            "exp_avg": torch.zeros(piece.numel, dtype=torch.float32, device=values.device),
            "exp_avg_sq": torch.zeros(piece.numel, dtype=torch.float32, device=values.device),
        }
        if piece.dtype != torch.float32:
            st["master"] = values.to(torch.float32, copy=True)
        return st

    def _group_tensors(self, group: Mapping[str, Any]) -> GroupTensors:
        """A group's pieces, 1-D (those of no element too: their step counts advance with the others')."""
        out = GroupTensors([], [], [], [], [], [])
        weights, grads, exp_avgs, exp_avg_sqs, steps, targets = out
        for name, p in zip(group["names"], group["params"]):
            if p.grad is None:
                continue
            piece, st = self.pieces[name], self.state[name]
            weights.append(st.get("master", piece.values()))
            grads.append(piece.grad())
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
            targets.append(piece.values() if "master" in st else None)
        return out

    def _update(
        self,
        grad_scale: torch.Tensor | None,
        *,
        ok: torch.Tensor | None = None,
        groups: list[GroupTensors] | None = None,
    ) -> None:
        """``AdamW``'s update of the pieces, then every rank's parameters made whole (``gather_params``)."""
        super()._update(grad_scale, ok=ok, groups=groups)
        self.layout.gather_params()

    def schema(self, n: NamedParam) -> dict[str, torch.dtype | None]:
        """State keys and dtypes for ``n``: always fp32 moments, an fp32 master for a parameter that is not fp32."""
        out: dict[str, torch.dtype | None] = {"step": None, "exp_avg": torch.float32, "exp_avg_sq": torch.float32}
        if n.param.dtype != torch.float32:
            out["master"] = torch.float32
        return out

    # -- state: per name, each moment and master flat and sharded as the pieces are -------------------
    def _flat(self, local: torch.Tensor, piece: ShardPiece) -> torch.Tensor:
        """``local`` (this rank's piece of a per-element state) as the parameter's 1-D state: a row-ragged
        ``Shard(0)`` DTensor over the data-parallel mesh (the plain tensor where there is none)."""
        mesh = self.shards.device_mesh
        if mesh is None:
            return local
        numel = math.prod(piece.shape)
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size([numel]), stride=(1,))

    def state_entries(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            n.name: {
                k: (v if k == "step" else self._flat(v, self.pieces[n.name])) for k, v in self.state[n.name].items()
            }
            for n in self._named
        }

    def load_entries(self, saved: Mapping[str, Any]) -> None:
        """Each piece's state from ``saved``: flat or parameter-shaped, a DTensor (split like ours: this rank's piece
        as is; any other split: gathered) or a whole tensor. Every check first, then one batched look-up of the
        row splits (ours among them), then the gathers: every rank passes the same entries."""
        wanted = [(n, key) for n in self._named for key in self.state[n.name] if key != "step"]
        steps = {n.name: state_format.take(saved, n.name, "step", self.state[n.name]["step"]) for n in self._named}
        values = [_checked(saved, n, key) for n, key in wanted]
        ours = [self._flat(self.state[n.name][key], self.pieces[n.name]) for n, key in wanted]
        counts = counts_of([*values, *ours])
        saved_counts, our_counts = counts[: len(values)], counts[len(values) :]
        pieces = []
        for (n, _), value, like, theirs, mine in zip(wanted, values, ours, saved_counts, our_counts, strict=True):
            piece = self.pieces[n.name]
            if (
                isinstance(value, DTensor)
                and isinstance(like, DTensor)
                and value.dim() == 1
                and value.device_mesh == like.device_mesh
                and tuple(value.placements) == (Shard(0),)
                and theirs == mine
            ):
                pieces.append(value.to_local())  # split as ours: this rank's piece
            else:
                pieces.append(whole(value, theirs).reshape(-1)[piece.start : piece.stop])
        with torch.no_grad():
            for (n, key), value in zip(wanted, pieces):
                self.state[n.name][key].copy_(value)
            for name, step in steps.items():
                self.state[name]["step"].copy_(step)


def _checked(saved: Mapping[str, Any], n: NamedParam, key: str) -> torch.Tensor:
    """``saved[n.name][key]``, a tensor of ``n``'s shape or its flat form (else a one-line ``ValueError``)."""
    try:
        value = saved[n.name][key]
    except KeyError:
        raise ValueError(f"saved optimizer state lacks {key!r} for parameter {n.name!r}; refusing to load") from None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"saved optimizer state {n.name!r}.{key!r} is a {type(value).__name__}, expected a tensor")
    if tuple(value.shape) != tuple(n.param.shape) and not state_format.is_flat(value, n.param.shape):
        raise ValueError(
            f"saved optimizer state {n.name!r}.{key!r} has shape {state_format.shape_text(value.shape)}, expected "
            f"{state_format.shape_text(n.param.shape)} (or {math.prod(n.param.shape)} elements flat); refusing to load"
        )
    return value
