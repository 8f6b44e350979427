"""Stand-in layouts that split a micro-batch's sequence or the model's stages, for tests of the core.

They exercise the parts of the layout contract that data parallelism does not, with the simplest
correct algorithm (not a fast one), so the core's run loop and the conformance suites have
something real to drive:

* ``SequenceSplitLayout`` (``test-seq``, mesh dim ``cp``): ``shard_batch`` gives rank ``r`` the
  ``r``-th contiguous chunk of every row (positions kept global) and an attention backend that
  all-gathers the keys and values of the whole row (``AllGatherKV``: causal over global
  positions); ``loss_group`` is the ``cp`` group and ``finish_grad_sync`` sums the gradients over
  it (each rank's loss is its part of the micro-batch's). Rows must be one document each.
* ``PipelineLayout`` (``test-pp``, mesh dim ``pp``): ``apply`` cuts a ``StagedModel`` into
  contiguous, near-equal stages and returns this rank's; ``forward_backward`` runs all forwards,
  then all backwards (GPipe order), sending activations and their gradients with blocking
  point-to-point calls; the loss is broadcast from the last stage. Parameters held by two stages
  (a tied embedding) are refused.

``SplitLayoutsPlugin()`` registers both (pass it to ``isolated_host``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mcore.plugins import hookimpl
from mcore.protocols import AuxLosses, BlockContext, DataParallelInfo

# -- sequence split -------------------------------------------------------------------------------


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 1 (tokens) over ``group``; backward sums the gradients and keeps this rank's part."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.rank, ctx.width = group, dist.get_rank(group), x.shape[1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[:, ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width], None


class AllGatherKV:
    """Attention over the whole row from this rank's chunk of queries: keys and values all-gathered."""

    name: ClassVar[str] = "test-allgather-kv"

    def __init__(self, group: Any, rank: int) -> None:
        self.group, self.rank = group, rank

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ctx: BlockContext, scale: float, window: int | None
    ) -> torch.Tensor:
        chunk = q.shape[1]
        k_all, v_all = _GatherRows.apply(k, self.group), _GatherRows.apply(v, self.group)  # (B, S, nkv, hd)
        q_pos = self.rank * chunk + torch.arange(chunk, device=q.device)[:, None]  # (T, 1) global
        k_pos = torch.arange(k_all.shape[1], device=q.device)[None, :]  # (1, S)
        allowed = k_pos <= q_pos
        if window is not None:
            allowed = allowed & (q_pos - k_pos < window)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k_all.transpose(1, 2),
            v_all.transpose(1, 2),
            attn_mask=allowed,
            scale=scale,
            enable_gqa=q.shape[2] != k.shape[2],
        )  # (B, nh, T, hd)
        return out.transpose(1, 2)


class SequenceSplitLayout:
    """Each rank of ``cp`` computes one contiguous chunk of every row (module docstring)."""

    name: ClassVar[str] = "test-seq"
    mesh_dims: ClassVar[tuple[str, ...]] = ("cp",)

    def __init__(self, config: Any = None) -> None:
        self.mesh: Any = None
        self.model: nn.Module | None = None

    def apply(self, model: nn.Module, mesh: Any, precision: Any = None) -> nn.Module:
        self.mesh, self.model = mesh, model
        return model

    def data_parallel(self) -> DataParallelInfo:
        return DataParallelInfo(rank=0, size=1)  # every cp rank reads the same batch

    def shard_batch(
        self, tokens: torch.Tensor, labels: torch.Tensor, ctx: BlockContext
    ) -> tuple[torch.Tensor, torch.Tensor, BlockContext]:
        size, rank = self.mesh.size("cp"), self.mesh.rank("cp")
        seq = tokens.shape[1]
        if seq % size:
            raise ValueError(f"test-seq: {seq} tokens per row do not split into {size} equal chunks")
        if ctx.cu_seqlens is not None:
            raise ValueError("test-seq: rows must be one document each (data.packing = 'concat')")
        part = slice(rank * (seq // size), (rank + 1) * (seq // size))
        positions = ctx.positions if ctx.positions is not None else torch.arange(seq, device=tokens.device)
        positions = positions.expand(tokens.shape[0], seq)[:, part]  # (B, T / cp), global
        group = self.loss_group()
        view = dataclasses.replace(
            ctx,
            positions=positions,
            token_ids=tokens[:, part],
            attention=AllGatherKV(group, rank) if group is not None else ctx.attention,
        )
        return tokens[:, part], labels[:, part], view

    def loss_group(self) -> Any:
        return self.mesh.group("cp")

    def no_grad_sync(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()  # nothing is reduced before finish_grad_sync

    def finish_grad_sync(self) -> None:
        group = self.loss_group()
        if group is None or self.model is None:
            return
        for p in self.model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)  # the ranks' parts of one loss: summed

    def state_dict_options(self) -> dict[str, Any]:
        return {}


# -- pipeline stages ------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def stage_ranges(layers: int, stages: int) -> list[range]:
    """Contiguous layer ranges, the first ``layers % stages`` stages one layer longer."""
    if layers < stages:
        raise ValueError(f"test-pp: {layers} layers cannot fill {stages} stages")
    base, extra = divmod(layers, stages)
    out, start = [], 0
    for s in range(stages):
        end = start + base + (1 if s < extra else 0)
        out.append(range(start, end))
        start = end
    return out


class PipelineLayout:
    """This rank runs one stage of the model; GPipe order, blocking sends (module docstring)."""

    name: ClassVar[str] = "test-pp"
    mesh_dims: ClassVar[tuple[str, ...]] = ("pp",)

    def __init__(self, config: Any = None) -> None:
        self.mesh: Any = None
        self.stage: nn.Module | None = None

    @property
    def _rank(self) -> int:
        return int(self.mesh.rank("pp"))

    @property
    def _size(self) -> int:
        return int(self.mesh.size("pp"))

    def _peer(self, offset: int) -> int:
        """Global rank of the stage ``offset`` away along ``pp``."""
        return dist.get_global_rank(self.mesh.group("pp"), self._rank + offset)

    def apply(self, model: nn.Module, mesh: Any, precision: Any = None) -> nn.Module:
        self.mesh = mesh
        if not callable(getattr(model, "pipeline_stage", None)):
            raise ValueError(f"test-pp: model {type(model).__name__} cannot be cut into stages (no pipeline_stage)")
        ranges = stage_ranges(model.stage_layers(), self._size)  # type: ignore[operator]
        rank = self._rank
        self.stage = model.pipeline_stage(ranges[rank], first=rank == 0, last=rank == self._size - 1)  # type: ignore[operator]
        if self._size > 1:
            names = [None] * self._size
            dist.all_gather_object(names, sorted(n for n, _ in self.stage.named_parameters()), group=mesh.group("pp"))
            seen: set[str] = set()
            for stage_names in names:
                shared = seen.intersection(stage_names or ())
                if shared:
                    raise ValueError(f"test-pp: parameter {sorted(shared)[0]!r} is on two stages (tied): not supported")
                seen.update(stage_names or ())
        return self.stage

    def data_parallel(self) -> DataParallelInfo:
        return DataParallelInfo(rank=0, size=1)  # every stage reads the same micro-batches

    def grad_norm_replicas(self, name: str, param: torch.Tensor) -> int:
        return 1  # each parameter lives on one stage

    def _send(self, tensor: torch.Tensor, offset: int) -> None:
        """``tensor`` to the stage ``offset`` away: a header (dims, shape, dtype), then the values."""
        tensor = tensor.detach().contiguous()
        dtype = _DTYPES.index(tensor.dtype)
        header = torch.tensor([tensor.dim(), *tensor.shape, *[0] * (4 - tensor.dim()), dtype], dtype=torch.int64)
        dist.send(header.to(tensor.device), self._peer(offset))
        dist.send(tensor, self._peer(offset))

    def _recv(self, offset: int, device: torch.device) -> torch.Tensor:
        header = torch.zeros(6, dtype=torch.int64, device=device)
        dist.recv(header, self._peer(offset))
        dims, *rest = header.tolist()
        buffer = torch.empty(rest[:dims], dtype=_DTYPES[rest[4]], device=device)
        dist.recv(buffer, self._peer(offset))
        return buffer

    def _run(
        self,
        model: nn.Module,
        micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor, BlockContext]],
        precision: Any,
        backward: bool,
        no_grad_sync: Callable[[], AbstractContextManager[None]] | None = None,
    ) -> torch.Tensor:
        first, last, n = self._rank == 0, self._rank == self._size - 1, len(micro_batches)
        outputs: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        total = torch.zeros((), dtype=torch.float32, device=micro_batches[0][0].device)
        for tokens, labels, ctx in micro_batches:  # all forwards
            view = dataclasses.replace(ctx, aux_losses=AuxLosses())
            inputs: torch.Tensor = tokens
            if not first:
                inputs = self._recv(-1, tokens.device).requires_grad_(backward)
            with precision.autocast(), torch.set_grad_enabled(backward):
                out = model(inputs, tokens=tokens, labels=labels if last else None, ctx=view)
            aux = sum(view.aux_losses.values(), torch.zeros(())) if view.aux_losses else None  # type: ignore[union-attr]
            if last:
                total += out.detach().float() / n
            else:
                self._send(out, 1)
            outputs.append((inputs, aux, out))
        if backward:
            for i, (inputs, aux, out) in enumerate(outputs):  # all backwards, in order
                grads_in: list[torch.Tensor] = []
                roots: list[torch.Tensor] = []
                if last:
                    roots.append(precision.scale_loss(out / n))
                    grads_in.append(torch.ones_like(out))
                else:
                    roots.append(out)
                    grads_in.append(self._recv(1, out.device))
                if aux is not None and not last:  # the last stage's model adds its own to the loss
                    roots.append(precision.scale_loss(aux / n))
                    grads_in.append(torch.ones_like(aux))
                held = no_grad_sync() if no_grad_sync is not None and i < n - 1 else contextlib.nullcontext()
                with held:
                    torch.autograd.backward(roots, grads_in)
                if not first:
                    assert inputs.grad is not None
                    self._send(inputs.grad, -1)
        if self._size > 1:
            group = self.mesh.group("pp")
            dist.broadcast(total, dist.get_global_rank(group, self._size - 1), group=group)
        return total

    def forward_backward(
        self,
        model: nn.Module,
        micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor, BlockContext]],
        *,
        precision: Any,
        no_grad_sync: Callable[[], AbstractContextManager[None]],
    ) -> torch.Tensor:
        return self._run(model, micro_batches, precision, True, no_grad_sync)

    def forward_only(
        self,
        model: nn.Module,
        micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor, BlockContext]],
        *,
        precision: Any,
    ) -> torch.Tensor:
        return self._run(model, micro_batches, precision, False)

    def no_grad_sync(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()  # stages reduce nothing across pp

    def finish_grad_sync(self) -> None:
        return None

    def state_dict_options(self) -> dict[str, Any]:
        return {}


class SplitLayoutsPlugin:
    """Registers ``test-seq`` and ``test-pp``."""

    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        registry.add(
            "layout", "test-seq", "mcore_testing.split_layouts:SequenceSplitLayout", summary="tests: sequence split"
        )
        registry.add(
            "layout", "test-pp", "mcore_testing.split_layouts:PipelineLayout", summary="tests: pipeline stages"
        )
