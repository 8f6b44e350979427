"""A quantized weight reaches the GEMM: a recipe's ``unpack`` answers ``QuantizedWeight`` and FSDP hands
the gathered bytes and scales to the recipe's own linear layers instead of dequantising them into its
buffer (``mcore.precision.quantized``).

The toy recipe keeps int8 weights with one fp32 scale per row; its ``Int8Linear`` multiplies with the
dequantised rows it is given (or, alone on one process, quantises its own weight) and passes the
gradient straight through to the high-precision weight, as fp8 training does. Sharded over 2 gloo
ranks, loss and gradients equal the single-process run of the same modules, every linear of every
step computed from an attached weight, and none stays attached after re-shard.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from helpers import quantize_rows, sgd_steps
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from mcore.precision import quantized
from mcore.precision.quantized import QuantizedWeight
from mcore.protocols.precision import GatherPayload
from mcore_fsdp import fully_shard
from mcore_testing import distributed
from mcore_testing.numerics import assert_rel_close, seeded_randn


class _Int8Matmul(torch.autograd.Function):
    """``x (N, K) @ (q * scale).T``; the weight's gradient straight through (``g.T @ x``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        rows = weight.shape[0]
        dequant = q[:rows].float() * scale[:rows]  # (F, K): the used rows of the payload
        ctx.save_for_backward(x, dequant)
        return x @ dequant.T

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, dequant = ctx.saved_tensors
        return grad @ dequant, grad.T @ x, None, None


class Int8Linear(nn.Linear):
    """A linear layer of the toy recipe; counts where its weights came from."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attached_calls = 0
        self.own_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        given = quantized.compute_weight(self.weight)
        if given is not None:
            assert given.shape == self.weight.shape and given.dtype == torch.float32
            q, scale = given.tensors
            self.attached_calls += 1
        else:
            q, scale = quantize_rows(self.weight)
            self.own_calls += 1
        flat = x.reshape(-1, x.shape[-1])  # (N, K)
        out = _Int8Matmul.apply(flat, self.weight, q, scale).view(*x.shape[:-1], -1)
        return out + self.bias if self.bias is not None else out


class Int8ComputeRecipe:
    """Gathers 2-D weights as int8 rows + scales and hands them over without dequantising."""

    def gather_payload(self, shard: torch.Tensor) -> GatherPayload | None:
        if shard.dim() != 2:
            return None
        q, scale = quantize_rows(shard)
        return GatherPayload(tensors=(q, scale), metadata=shard.dtype)

    def unpack(self, gathered: tuple[torch.Tensor, ...], metadata: Any) -> QuantizedWeight:
        q, scale = gathered  # (N*rows, K) int8, (N*rows, 1) fp32
        return QuantizedWeight(tensors=(q, scale), metadata=None, shape=q.shape, dtype=metadata)

    def dequantize(self, weight: QuantizedWeight) -> torch.Tensor:
        q, scale = weight.tensors
        return (q.float() * scale).to(weight.dtype)


class Net(nn.Module):
    """Rows that do not divide 2 (the last rank's shard padded), a bias (gathered plainly)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Int8Linear(12, 7), Int8Linear(7, 9), Int8Linear(9, 5)])
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                layer.weight.copy_(seeded_randn(*layer.weight.shape, seed=i) * 0.5)
                layer.bias.copy_(seeded_randn(*layer.bias.shape, seed=10 + i) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.tanh(layer(x))
        return x


def _steps(model: Net, rank: int, world: int) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    return sgd_steps(model, rank, world, out_features=5)


@distributed(2, timeout=120)
def test_quantized_weight_reaches_the_gemm() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = Net()
    ref_losses, ref_grads = _steps(reference, 0, 1)
    assert all(layer.own_calls == 3 and layer.attached_calls == 0 for layer in reference.layers)

    model = Net()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, gather_recipe=Int8ComputeRecipe())
    fully_shard(model, mesh=mesh, gather_recipe=Int8ComputeRecipe())
    losses, grads = _steps(model, rank, world)
    for layer in model.layers:  # every forward computed from the gathered int8 rows, none from a buffer
        assert layer.attached_calls == 3 and layer.own_calls == 0, (layer.attached_calls, layer.own_calls)
        assert quantized.compute_weight(layer.weight) is None  # re-sharded: nothing left attached
    for step in range(3):
        assert_rel_close(torch.tensor(losses[step]), torch.tensor(ref_losses[step]), 1e-6, name=f"loss {step}")
        for name, grad in ref_grads[step].items():
            assert_rel_close(grads[step][name], grad, 1e-5, name=f"grad {name} step {step}")


def test_attach_detach_and_plain_tensors() -> None:
    weight = torch.zeros(3, 2)
    assert quantized.compute_weight(weight) is None
    given = QuantizedWeight(
        tensors=(torch.zeros(4, 2, dtype=torch.int8),), metadata=None, shape=torch.Size((3, 2)), dtype=torch.float32
    )
    quantized.attach(weight, given)
    assert quantized.compute_weight(weight) is given
    quantized.detach(weight)
    quantized.detach(weight)  # twice: no error
    assert quantized.compute_weight(weight) is None
