"""The reference model and data, and the markers the plugin adds."""

from __future__ import annotations

import pytest
import torch

from mcore_testing.hosts import isolated_host
from mcore_testing.reference import TinyConfig, TinyTransformer, tiny_batches


def test_reference_model_learns_tiny_data() -> None:
    torch.manual_seed(0)
    model = TinyTransformer(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = tiny_batches(30, seed=0)
    losses = []
    for tokens, labels in batches:
        loss = model(tokens, labels=labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_same_seed_same_weights() -> None:
    a, b = TinyTransformer(seed=3), TinyTransformer(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = TinyTransformer(TinyConfig(), seed=4)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_reference_plugin_registers_model_and_optimizer() -> None:
    host = isolated_host("mcore_testing.plugin")
    factory = host.load("model", "reference-tiny")
    model = factory.build(factory.Config(), seed=0, device="cpu")
    assert factory.flops_per_token(factory.Config(), 16) > 0
    tokens, labels = tiny_batches(1)[0]
    assert model(tokens).shape == (4, 16, 64)
    assert host.get("optimizer", "reference-adamw").source.plugin == "mcore_testing.plugin"


@pytest.mark.gpu
def test_gpu_marker_runs_only_with_cuda() -> None:
    assert torch.cuda.is_available()
    x = torch.randn(4, device="cuda")
    assert x.is_cuda
