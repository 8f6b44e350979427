"""Integration: a ``gpt`` model (mcore-models) with ``moe`` layers (mcore-moe) under mcore-precision's
``fp8-current`` and ``fp8-blockwise`` recipes. The MoE experts reach the recipe's grouped GEMM only through
``BlockContext.precision`` and ``mcore.precision.grouped`` (the plugins never import each other): every
expert GEMM of every MoE layer goes through the recipe, the loss and the expert gradients stay close to the
fp32 model's, and a few steps of training lower the loss."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from mcore.plugins import load_plugins
from mcore.protocols.block import BlockContext
from mcore_moe.block import MoE
from mcore_testing.numerics import seeded_tokens


def _host() -> Any:
    plugins = ["mcore_models.plugin", "mcore_moe.plugin", "mcore_precision.plugin"]
    return load_plugins(entry_points=False, env=False, unpackaged=False, extra=plugins)


def _model(host: Any) -> torch.nn.Module:
    gpt = host.load("model", "gpt")
    config = gpt.Config.from_values(
        {
            "vocab_size": 64,
            "hidden_size": 32,
            "num_layers": 2,
            "layers": ["1*attention/swiglu", "1*attention/moe"],
            "attention": {"num_heads": 4, "num_kv_heads": 2},
            "swiglu": {"ffn_hidden_size": 64},
            "moe": {"num_experts": 4, "top_k": 2, "moe_ffn_hidden_size": 32},
        }
    )
    return gpt.build(config, seed=0, device="cpu", block_lookup=lambda name: host.load("block", name))


@pytest.mark.parametrize("name", ["fp8-current", "fp8-blockwise"])
def test_moe_experts_run_the_recipes_grouped_gemm(name: str) -> None:
    host = _host()
    cls = host.load("precision", name)
    recipe = cls(cls.Config(params="fp32"))
    reference = _model(host)
    model = recipe.prepare(copy.deepcopy(reference))
    calls: list[tuple[int, ...]] = []
    take = recipe.grouped_linear

    def counted(x: torch.Tensor, weight: torch.Tensor, sizes: torch.Tensor) -> Any:
        calls.append(tuple(weight.shape))
        return take(x, weight, sizes)

    recipe.grouped_linear = counted  # this recipe object only: counts what the experts hand it
    tokens = seeded_tokens((4, 16), vocab_size=64, seed=1)
    labels = tokens.roll(-1, 1)
    loss = model(tokens, labels=labels, ctx=BlockContext(precision=recipe))
    loss.backward()
    assert len(calls) == 3  # the one MoE layer's gate, up and down grouped GEMMs
    ref = reference(tokens, labels=labels)
    ref.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 2e-2
    # the experts' own rounding: the same quantised model with the experts' GEMMs in high precision
    unquantised_experts = copy.copy(recipe)
    unquantised_experts.grouped_linear = None  # type: ignore[assignment,method-assign]
    twin = copy.deepcopy(model)
    twin.zero_grad()
    twin(tokens, labels=labels, ctx=BlockContext(precision=unquantised_experts)).backward()
    (moe,) = [m for m in model.modules() if isinstance(m, MoE)]
    (twin_moe,) = [m for m in twin.modules() if isinstance(m, MoE)]
    for (pname, p), q in zip(moe.experts.named_parameters(), twin_moe.experts.parameters()):
        assert p.grad is not None and q.grad is not None
        rel = float((p.grad - q.grad).norm() / q.grad.norm())
        assert 0 < rel < 0.15, pname  # FP8 rounding of the expert GEMMs (and nothing else: the twin is not exact)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        step_loss = model(tokens, labels=labels, ctx=BlockContext(precision=recipe))
        step_loss.backward()
        optimizer.step()
        losses.append(step_loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
