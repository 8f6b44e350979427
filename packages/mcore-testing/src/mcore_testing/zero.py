"""Reference ZeRO-1 pair for ``mcore.protocols.sharded_grads``: a layout and an optimizer that meet only there.

* ``FlatZeroLayout`` (``test-zero``): replicated data parallelism over ``dp_replicate``. Until an
  optimizer asks (``shard_grads``) it all-reduces like ``test-ddp``. Once asked, every parameter
  is a view into one flat parameter buffer (one bucket, in ``named_parameters`` order, padded to a
  multiple of the group size); rank ``r`` owns the ``r``-th equal range of it, which may end
  inside a parameter. ``finish_grad_sync`` copies the gradients into a flat buffer of the reduce
  dtype, reduce-scatters it (gloo has ``reduce_scatter_tensor`` in the torch we test on: a real
  reduce-scatter, not an all-reduce and a slice), divides by the group size and leaves in ``.grad``
  this rank's range, zeros elsewhere. ``gather_params`` all-gathers the flat parameter buffer.
* ``ShardedAdamW`` (optimizer ``test-zero-adamw``): AdamW on this rank's pieces only, with fp32
  master values (the parameter itself when it is fp32) and fp32 moments; ``step()`` ends with the
  layout's ``gather_params()``. Its state is saved per parameter name as 1-D row-ragged
  ``Shard(0)`` DTensors over the data-parallel group (local part: the piece), so it reshards under
  any data-parallel size through ``torch.distributed.checkpoint``.

Small and synchronous on purpose (no bucketing, no overlap with backward or the next forward):
the reference that conformance suites and the run loop's tests compare against.
``ZeroPlugin()`` registers both (pass it to ``isolated_host``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from mcore.errors import UserError
from mcore.params import ParamSpec
from mcore.plugins import hookimpl
from mcore.protocols import DataParallelInfo
from mcore.protocols.sharded_grads import GradShards, ShardPiece, grad_sharding_layout

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class FlatZeroLayout:
    """``test-zero``: all-reduce data parallelism that switches to reduce-scatter when an optimizer asks."""

    name: ClassVar[str] = "test-zero"
    mesh_dims: ClassVar[tuple[str, ...]] = ("dp_replicate",)

    def __init__(self, config: Any = None) -> None:
        self.mesh: Any = None
        self.model: nn.Module | None = None
        self.reduce_dtype = torch.float32
        self.shards: GradShards | None = None
        self.offsets: dict[str, int] = {}  # parameter name -> first element in the flat buffers
        self.params_flat: torch.Tensor | None = None  # (size * per,) every parameter's values
        self.per = 0  # elements per rank

    def apply(self, model: nn.Module, mesh: Any, precision: Any = None) -> nn.Module:
        self.mesh, self.model = mesh, model
        self.reduce_dtype = getattr(precision, "reduce_dtype", torch.float32)
        return model

    def data_parallel(self) -> DataParallelInfo:
        dim = "dp_replicate"
        return DataParallelInfo(rank=self.mesh.rank(dim), size=self.mesh.size(dim), group=self.mesh.group(dim))

    def no_grad_sync(self) -> AbstractContextManager[None]:
        return nullcontext()  # nothing is reduced before finish_grad_sync anyway

    def state_dict_options(self) -> dict[str, Any]:
        return {}

    def named(self) -> list[tuple[str, nn.Parameter]]:
        assert self.model is not None, "apply() first"
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    # -- the handshake ----------------------------------------------------------------------
    def shard_grads(self) -> GradShards | None:
        if self.shards is not None:
            return self.shards
        named = self.named()
        if any(isinstance(p, DTensor) for _, p in named):
            return None  # parameters sharded by another layout: not covered by the protocol yet
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            return None  # one flat buffer holds one dtype
        dp = self.data_parallel()
        total = sum(p.numel() for _, p in named)
        self.per = -(-total // dp.size)  # ceil: padding at the end of the last rank's range
        flat = torch.zeros(self.per * dp.size, dtype=dtypes.pop(), device=named[0][1].device)
        lo, hi = dp.rank * self.per, (dp.rank + 1) * self.per
        pieces, at = [], 0
        for name, p in named:
            view = flat[at : at + p.numel()]
            view.copy_(p.detach().reshape(-1))
            p.data = view.view_as(p)  # the parameter now lives in the flat buffer
            self.offsets[name] = at
            start, stop = max(lo, at) - at, min(hi, at + p.numel()) - at
            start, stop = (start, stop) if start < stop else (0, 0)
            pieces.append(ShardPiece(name=name, shape=tuple(p.shape), dtype=p.dtype, start=start, stop=stop, param=p))
            at += p.numel()
        self.params_flat = flat
        self.shards = GradShards(
            pieces=tuple(pieces),
            rank=dp.rank,
            size=dp.size,
            group=dp.group,
            device_mesh=self.mesh.submesh(["dp_replicate"]) if dp.size > 1 else None,
            reduce_dtype=self.reduce_dtype,
        )
        return self.shards

    def finish_grad_sync(self) -> None:
        dp = self.data_parallel()
        if self.shards is None:  # plain data parallelism
            if dp.size > 1:
                for _, p in self.named():
                    if p.grad is not None:
                        dist.all_reduce(p.grad, group=dp.group)
                        p.grad.div_(dp.size)
            return
        assert self.params_flat is not None
        grads = torch.zeros(self.params_flat.numel(), dtype=self.reduce_dtype, device=self.params_flat.device)
        for piece in self.shards.pieces:
            if piece.param.grad is not None:
                at = self.offsets[piece.name]
                grads[at : at + piece.param.numel()].copy_(piece.param.grad.reshape(-1))
        mine = torch.empty(self.per, dtype=self.reduce_dtype, device=grads.device)
        if dp.size > 1:
            _reduce_scatter(mine, grads, op=dist.ReduceOp.SUM, group=dp.group)
            mine.div_(dp.size)
        else:
            mine.copy_(grads)
        base = dp.rank * self.per
        for piece in self.shards.pieces:
            p = piece.param
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
            at = self.offsets[piece.name] + piece.start - base  # where the piece sits in ``mine``
            piece.grad().copy_(mine[at : at + piece.numel])

    def grad_norm_replicas(self, name: str, param: torch.Tensor) -> int | None:
        return 1 if self.shards is not None else None

    def gather_params(self) -> None:
        assert self.shards is not None and self.params_flat is not None, "shard_grads() first"
        if self.shards.size == 1:
            return
        lo = self.shards.rank * self.per
        mine = self.params_flat[lo : lo + self.per].clone()  # the input may not alias the output
        _all_gather(self.params_flat, mine, group=self.shards.group)


# -- the optimizer ------------------------------------------------------------------------------
def flat_state(local: torch.Tensor, piece: ShardPiece, shards: GradShards) -> torch.Tensor:
    """``local`` (this rank's piece of a per-element state) as the whole parameter's 1-D state:
    a row-ragged ``Shard(0)`` DTensor over the data-parallel mesh, or the plain tensor on one rank."""
    if shards.device_mesh is None:
        return local
    numel = math.prod(piece.shape)
    return DTensor.from_local(
        local, shards.device_mesh, [Shard(0)], run_check=False, shape=torch.Size([numel]), stride=(1,)
    )


def local_state(value: torch.Tensor, piece: ShardPiece) -> torch.Tensor:
    """This rank's piece of a loaded 1-D state: the DTensor's local part, or a slice of a whole tensor."""
    if isinstance(value, DTensor):
        value = value.to_local()
    value = value.reshape(-1)
    if value.numel() == math.prod(piece.shape) and value.numel() != piece.numel:
        value = value[piece.start : piece.stop]
    if value.numel() != piece.numel:
        raise ValueError(
            f"optimizer state for {piece.name!r} has {value.numel()} elements here, expected {piece.numel}"
        )
    return value


class ShardedAdamW:
    """A ``MeshOptimizer``: AdamW (``torch.optim.AdamW``'s math) on this rank's pieces only."""

    def __init__(
        self, shards: GradShards, layout: Any, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
    ) -> None:
        self.shards, self.layout = shards, layout
        self.betas, self.eps = betas, eps
        self.param_groups: list[dict[str, Any]] = [
            {"params": [p.param for p in shards.pieces], "lr": lr, "weight_decay": weight_decay, "role": "all"}
        ]
        self.step_count = 0
        self.exp_avg = {p.name: torch.zeros(p.numel, dtype=torch.float32, device=p.param.device) for p in shards.pieces}
        self.exp_avg_sq = {n: torch.zeros_like(t) for n, t in self.exp_avg.items()}
        # fp32 values this rank updates: the parameter's own piece when fp32, else a master copy
        self.master = {
            p.name: p.values() if p.dtype == torch.float32 else p.values().to(torch.float32, copy=True)
            for p in shards.pieces
        }

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        beta1, beta2 = self.betas
        self.step_count += 1
        bias1, bias2 = 1 - beta1**self.step_count, 1 - beta2**self.step_count
        for piece in self.shards.owned():
            grad = piece.grad().to(torch.float32)
            w, m, v = self.master[piece.name], self.exp_avg[piece.name], self.exp_avg_sq[piece.name]
            w.mul_(1 - lr * wd)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            w.addcdiv_(m, (v.sqrt() / math.sqrt(bias2)).add_(self.eps), value=-lr / bias1)
            if piece.dtype != torch.float32:
                piece.values().copy_(w)
        self.layout.gather_params()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for piece in self.shards.pieces:
            if set_to_none:
                piece.param.grad = None
            elif piece.param.grad is not None:
                piece.param.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for piece in self.shards.pieces:
            entry = {"exp_avg": self.exp_avg[piece.name], "exp_avg_sq": self.exp_avg_sq[piece.name]}
            if piece.dtype != torch.float32:
                entry["master"] = self.master[piece.name]
            state[piece.name] = {k: flat_state(v.clone(), piece, self.shards) for k, v in entry.items()}
        return {
            "state": state,
            "step": self.step_count,
            "shapes": {p.name: list(p.shape) for p in self.shards.pieces},
            "lr": [g["lr"] for g in self.param_groups],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        shapes = state_dict["shapes"]
        for piece in self.shards.pieces:
            if piece.name not in shapes:
                raise ValueError(f"optimizer state has no entry for parameter {piece.name!r}")
            if list(shapes[piece.name]) != list(piece.shape):
                raise ValueError(
                    f"optimizer state for {piece.name!r} has shape {shapes[piece.name]}, parameter has {list(piece.shape)}"
                )
        extra = set(shapes) - {p.name for p in self.shards.pieces}
        if extra:
            raise ValueError(f"optimizer state has parameters the model lacks: {sorted(extra)[:3]}")
        with torch.no_grad():
            for piece in self.shards.pieces:
                saved = state_dict["state"][piece.name]
                self.exp_avg[piece.name].copy_(local_state(saved["exp_avg"], piece))
                self.exp_avg_sq[piece.name].copy_(local_state(saved["exp_avg_sq"], piece))
                if piece.dtype != torch.float32:
                    self.master[piece.name].copy_(local_state(saved["master"], piece))
        self.step_count = int(state_dict["step"])
        for group, lr in zip(self.param_groups, state_dict["lr"]):
            group["lr"] = lr


class ShardedAdamWFactory:
    """Optimizer ``test-zero-adamw``: needs a layout that offers reduce-scattered gradients (``test-zero``)."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        lr: float = 1e-3
        weight_decay: float = 0.0
        beta1: float = 0.9
        beta2: float = 0.95
        eps: float = 1e-8

    def __init__(self, config: ShardedAdamWFactory.Config | None = None) -> None:
        self.config = config or ShardedAdamWFactory.Config()

    def build(self, model: nn.Module, *, mesh: Any, layouts: Sequence[Any]) -> ShardedAdamW:
        layout = grad_sharding_layout(layouts)
        shards = layout.shard_grads() if layout is not None else None
        if layout is None or shards is None:
            names = [getattr(x, "name", type(x).__name__) for x in layouts]
            raise UserError(
                f"optimizer 'test-zero-adamw' needs a layout that hands it reduce-scattered gradients; layouts "
                f"{names} do not (use 'test-zero' with plain, single-dtype parameters)"
            )
        c = self.config
        return ShardedAdamW(shards, layout, lr=c.lr, weight_decay=c.weight_decay, betas=(c.beta1, c.beta2), eps=c.eps)

    def state_bytes(self, shape: tuple[int, ...], spec: ParamSpec, *, param_dtype: torch.dtype) -> int:
        """Two fp32 moments per element, plus an fp32 master copy when the parameter is not fp32."""
        master = 4 if param_dtype != torch.float32 else 0
        return math.prod(shape) * (8 + master)

    def shards_state_over_dp(self, *, sharded_params: bool) -> bool:
        return not sharded_params


class ZeroPlugin:
    """Registers layout ``test-zero`` and optimizer ``test-zero-adamw``."""

    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        registry.add("layout", "test-zero", "mcore_testing.zero:FlatZeroLayout", summary="tests: ZeRO-1 DP")
        registry.add(
            "optimizer", "test-zero-adamw", "mcore_testing.zero:ShardedAdamWFactory", summary="tests: sharded AdamW"
        )
