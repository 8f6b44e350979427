"""Shared pieces of the tests: models, a reference training loop, a toy quantizing recipe."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mcore.protocols.precision import GatherPayload
from mcore.ragged import full_tensor
from mcore_fsdp import fully_shard
from mcore_testing.numerics import seeded_randn
from mcore_testing.reference import TinyConfig, TinyTransformer, tiny_batches

#: Dimensions that do not divide 2 or 4: vocab 61 rows, hidden 36 -> qkv 108 rows, ffn 50.
UNEVEN = TinyConfig(vocab_size=61, hidden_size=36, num_heads=4, ffn_size=50, num_layers=4)
BATCH = 4
STEPS = 3


def batches(vocab: int = UNEVEN.vocab_size) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return tiny_batches(STEPS, batch_size=BATCH, vocab_size=vocab, seed=3)


def local_rows(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    rows = t.shape[0] // size
    return t[rank * rows : (rank + 1) * rows]


def shard_model(model: nn.Module, mesh: Any, **kwargs: Any) -> nn.Module:
    for block in model.layers:
        fully_shard(block, mesh=mesh, **kwargs)
    return fully_shard(model, mesh=mesh, **kwargs)


@dataclass
class Trace:
    losses: list[float]
    grads: list[dict[str, torch.Tensor]]  # full gradients after each step's backward
    params: dict[str, torch.Tensor]  # full parameters after the last step


def full(t: torch.Tensor) -> torch.Tensor:
    return full_tensor(t.detach())  # ragged-aware (parameters kept whole on one rank)


def train(
    model: nn.Module, *, dp_rank: int = 0, dp_size: int = 1, group: Any = None, steps: int = STEPS, lr: float = 1e-2
) -> Trace:
    """``steps`` AdamW steps on this rank's rows of the shared batches; the loss averaged over DP ranks."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    trace = Trace([], [], {})
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    for tokens, labels in batches(vocab)[:steps]:
        tokens, labels = (
            local_rows(tokens, dp_rank, dp_size).to(device),
            local_rows(labels, dp_rank, dp_size).to(device),
        )
        loss = model(tokens, labels=labels)
        loss.backward()
        value = loss.detach().clone()
        if dp_size > 1:
            dist.all_reduce(value, group=group)
            value /= dp_size
        trace.losses.append(value.item())
        trace.grads.append({n: full(p.grad) for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    trace.params = {n: full(p) for n, p in model.named_parameters()}
    return trace


def reference_trace(cfg: TinyConfig = UNEVEN, steps: int = STEPS) -> Trace:
    torch.manual_seed(0)
    return train(TinyTransformer(copy.deepcopy(cfg), seed=0), steps=steps)


class RowInt8Recipe:
    """Toy precision recipe: gathers 2-D weights as int8 with one fp32 scale per row."""

    def gather_payload(self, shard: torch.Tensor) -> GatherPayload | None:
        if shard.dim() != 2:
            return None
        q, scale = quantize_rows(shard)
        return GatherPayload(tensors=(q, scale), metadata=shard.dtype)

    def unpack(self, gathered: tuple[torch.Tensor, ...], metadata: Any) -> torch.Tensor:
        q, scale = gathered  # (N*rows, cols) int8, (N*rows, 1) fp32
        return (q.float() * scale).to(metadata)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.detach().float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0  # (rows, 1)
    return torch.round(w.detach().float() / scale).to(torch.int8), scale


def dequantized(model: nn.Module) -> nn.Module:
    """``model`` with every 2-D weight replaced by its ``RowInt8Recipe`` round trip (the reference
    for a quantized gather)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                q, scale = quantize_rows(p)
                p.copy_(q.float() * scale)
    return model


def sgd_steps(
    model: nn.Module, rank: int, world: int, out_features: int
) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """Three SGD steps of ``model (12 -> out_features)`` on seeded MSE batches split by rows over ``world`` ranks:
    the mean loss and every full gradient of each step (what the quantised-gather tests compare with one rank)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, grads = [], []
    for step in range(3):
        x, y = seeded_randn(8, 12, seed=20 + step), seeded_randn(8, out_features, seed=30 + step)
        loss = F.mse_loss(model(local_rows(x, rank, world)), local_rows(y, rank, world))
        loss.backward()
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
        losses.append(value.item() / world)
        grads.append({n: getattr(p.grad, "full_tensor", lambda g=p.grad: g)() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    return losses, grads
