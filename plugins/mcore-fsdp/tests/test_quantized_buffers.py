"""What a quantized gather costs a unit: no high-precision buffer room for weights handed over as a
``QuantizedWeight``, and one all-reduce per unit gather for the recipe's global amaxes.

Two toy recipes gather 2-D weights as int8 codes with ONE fp32 scale per weight, the scale from the
global amax (an all-reduce over the shard group, as per-tensor FP8 needs): ``TensorInt8Recipe`` asks for
it per weight (``gather_payload``), ``BatchedTensorInt8Recipe`` for all of a unit's weights at once
(``gather_payloads``: the amaxes stacked, one all-reduce). ``DequantRecipe`` gathers the same payload
but unpacks it into a plain tensor (FSDP copies it into its buffer): the "before" of the buffer size.
On 2 gloo ranks, the pool bytes a unit borrows for a gather are measured by wrapping the pool's
``acquire``; all-reduces are counted by wrapping ``torch.distributed.all_reduce``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from helpers import sgd_steps
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from mcore.precision import quantized
from mcore.precision.quantized import QuantizedWeight
from mcore.protocols.precision import GatherPayload
from mcore_fsdp import fully_shard
from mcore_fsdp.api import _unit_of
from mcore_testing import distributed
from mcore_testing.numerics import assert_rel_close, seeded_randn


def _codes(w: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w (rows, K)`` as int8 codes with the one scale of a weight whose amax is ``amax`` (0-d fp32)."""
    scale = amax.clamp_min(1e-12) / 127.0
    return torch.round(w.detach().float() / scale).to(torch.int8), scale.reshape(1)


def _local_amax(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().abs().amax()


class TensorInt8Recipe:
    """Per weight: its global amax by one all-reduce, then its codes."""

    def gather_payload(self, shard: torch.Tensor) -> GatherPayload | None:
        if shard.dim() != 2:
            return None
        amax = _local_amax(shard)
        if dist.is_initialized():
            dist.all_reduce(amax, op=dist.ReduceOp.MAX)
        return GatherPayload(tensors=_codes(shard, amax), metadata=shard.dtype)

    def unpack(self, gathered: tuple[torch.Tensor, ...], metadata: Any) -> Any:
        q, scale = gathered  # (N*rows, K) int8, (N,) fp32: every rank's copy of the one scale
        return QuantizedWeight(tensors=(q, scale[:1]), metadata=None, shape=q.shape, dtype=metadata)


class BatchedTensorInt8Recipe(TensorInt8Recipe):
    """The same payloads; a unit's amaxes in one all-reduce (``gather_payloads``)."""

    def gather_payloads(self, shards: list[torch.Tensor], asks: list[dict[str, Any]]) -> list[GatherPayload | None]:
        assert all(s.dim() == 2 for s in shards) and asks == [{}] * len(shards)
        amaxes = torch.stack([_local_amax(s) for s in shards])  # (M,)
        dist.all_reduce(amaxes, op=dist.ReduceOp.MAX)
        return [GatherPayload(tensors=_codes(s, a), metadata=s.dtype) for s, a in zip(shards, amaxes)]


class DequantRecipe(TensorInt8Recipe):
    """The same payloads, unpacked into the high-precision weight (copied into FSDP's buffer)."""

    def unpack(self, gathered: tuple[torch.Tensor, ...], metadata: Any) -> Any:
        q, scale = gathered
        return (q.float() * scale[0]).to(metadata)


class _Matmul(torch.autograd.Function):
    """``x (N, K) @ w.T`` with ``w`` the dequantised codes; the gradient straight through to ``weight``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return x @ w.T

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, w = ctx.saved_tensors
        return grad @ w, grad.T @ x, None


class TensorInt8Linear(nn.Linear):
    """Computes with the gathered codes, or (one process, or a plain tensor gathered) quantises its weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        given = quantized.compute_weight(self.weight)
        if given is not None:
            q, scale = given.tensors
            w = q[: self.weight.shape[0]].float() * scale  # (F, K)
        else:
            q, scale = _codes(self.weight, _local_amax(self.weight))
            w = q.float() * scale
        flat = x.reshape(-1, x.shape[-1])  # (N, K)
        out = _Matmul.apply(flat, self.weight, w).view(*x.shape[:-1], -1)
        return out + self.bias


class Block(nn.Module):
    """Two quantized linears (rows 7 and 9: the last rank's shard padded) and their biases (gathered plainly)."""

    def __init__(self, k: int, seed: int) -> None:
        super().__init__()
        self.up, self.down = TensorInt8Linear(k, 7), TensorInt8Linear(7, 9)
        with torch.no_grad():
            for j, lin in enumerate((self.up, self.down)):
                lin.weight.copy_(seeded_randn(*lin.weight.shape, seed=seed + j) * (0.5 + j))
                lin.bias.copy_(seeded_randn(*lin.bias.shape, seed=seed + 10 + j) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(12, 0), Block(9, 100)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _sharded(recipe: Any) -> Net:
    model = Net()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, gather_recipe=recipe)
    fully_shard(model, mesh=mesh, gather_recipe=recipe)
    return model


def _steps(model: Net, rank: int, world: int) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    return sgd_steps(model, rank, world, out_features=9)


@contextmanager
def _borrowed(model: Net) -> Iterator[list[tuple[str, int]]]:
    """Record (kind, bytes) of every pool buffer borrowed meanwhile."""
    pool = model._ensure_init().pool  # type: ignore[operator]
    original, seen = pool.acquire, []

    def acquire(kind: str, dtype: torch.dtype, numel: int, stream: Any = None) -> Any:
        seen.append((kind, numel * dtype.itemsize))
        return original(kind, dtype, numel, stream)

    pool.acquire = acquire  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        pool.acquire = original  # type: ignore[method-assign]


@contextmanager
def _all_reduces() -> Iterator[list[int]]:
    """Count ``torch.distributed.all_reduce`` calls meanwhile."""
    original, calls = dist.all_reduce, []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counted
    try:
        yield calls
    finally:
        dist.all_reduce = original


def _gather_cost(model: Net, layer: Block) -> tuple[dict[str, int], int]:
    """One gather of ``layer``: the pooled bytes it borrowed per kind, and the payload bytes it received."""
    with _borrowed(model) as seen:
        layer.unshard()  # type: ignore[operator]
    store = _unit_of(layer).store
    payload = sum(
        store.geometry.world * shape.numel() * dtype.itemsize
        for spec in store.payload_specs.values()
        for shape, dtype in spec.tensors
    )
    kinds: dict[str, int] = {}
    for kind, nbytes in seen:
        kinds[kind] = kinds.get(kind, 0) + nbytes
    return kinds, payload


@distributed(2, timeout=120)
def test_quantized_weights_take_no_high_precision_buffer() -> None:
    torch.set_num_threads(1)
    world = dist.get_world_size()
    x = seeded_randn(4, 12, seed=7)
    costs = {}
    for name, recipe in (("attached", BatchedTensorInt8Recipe()), ("dequantised", DequantRecipe())):
        model = _sharded(recipe)
        model(x)  # lazy init, and every unit gathered and re-sharded once
        layer: Any = model.layers[0]
        costs[name] = _gather_cost(model, layer)
        if name == "attached":  # the weights point at one NaN element, their codes are attached
            for lin in (layer.up, layer.down):
                w = lin.weight
                assert w.shape == (lin.out_features, lin.in_features) and w.untyped_storage().nbytes() == 4
                assert torch.isnan(w).all() and quantized.compute_weight(w) is not None
        layer.reshard()  # type: ignore[operator]
        out = model(x)
        assert torch.isfinite(out).all()
    bias = world * (4 + 5) * 4  # the biases (7 and 9 rows: 4 and 5 per rank), fp32, gathered plainly
    weights = world * (4 * 12 + 5 * 7) * 4  # the two weights' padded rows in fp32
    (attached, payload), (dequantised, payload_before) = costs["attached"], costs["dequantised"]
    assert payload == payload_before == world * (4 * 12 + 5 * 7 + 2 * 4)  # int8 codes + one fp32 scale each
    assert attached["param"] == bias, attached  # the un-sharded buffer: the plainly gathered biases only
    assert dequantised["param"] == bias + weights, dequantised  # before: room for the dequantised weights too
    assert attached["gather"] == dequantised["gather"] == bias
    peak_after, peak_before = sum(attached.values()) + payload, sum(dequantised.values()) + payload
    print(f"unit gather peak bytes: {peak_after} with no buffer room for quantised weights, {peak_before} without")
    assert peak_before - peak_after == weights


@distributed(2, timeout=120)
def test_one_amax_all_reduce_per_unit_gather() -> None:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = Net()
    ref_losses, ref_grads = _steps(reference, 0, 1)
    runs = {}
    for name, recipe in (("per weight", TensorInt8Recipe()), ("batched", BatchedTensorInt8Recipe())):
        model = _sharded(recipe)
        model(seeded_randn(4, 12, seed=7))  # lazy init
        for layer in model.layers:
            with _all_reduces() as calls:
                layer.unshard()  # type: ignore[operator]
            assert len(calls) == (1 if name == "batched" else 2), (name, len(calls))
            layer.reshard()  # type: ignore[operator]
        runs[name] = _steps(model, rank, world)
    (losses, grads), (per_losses, per_grads) = runs["batched"], runs["per weight"]
    assert losses == per_losses
    for step in range(3):
        assert_rel_close(torch.tensor(losses[step]), torch.tensor(ref_losses[step]), 1e-6, name=f"loss {step}")
        for key, grad in ref_grads[step].items():
            assert torch.equal(grads[step][key], per_grads[step][key]), f"{key} step {step}: batched differs"
            assert_rel_close(grads[step][key], grad, 1e-5, name=f"grad {key} step {step}")
