"""``gpt`` under activation recompute: every layer call sees its own context (issue 13).

A probe attention block, registered under a test name, records the layer index of each call and
adds an auxiliary loss that depends on its input; its output depends on the index too, so a
recomputed layer that saw another layer's index would change the gradients.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from mcore.plugins import hookimpl
from mcore.protocols.block import AuxLosses, BlockContext, FlopsShape
from mcore.train.recompute import apply_recompute
from mcore_models.gpt import GPT, GPTConfig
from mcore_testing.hosts import isolated_host


class ContextProbe(nn.Module):
    """Attention stand-in: ``tanh(proj(h)) * (1 + layer_index)``; aux loss ``probe`` from its output."""

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config:
        init_std: float = 0.02

    def __init__(self, config: Config, *, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.seen: list[int] = []

    def forward(self, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        self.seen.append(ctx.layer_index)
        out = torch.tanh(self.proj(hidden)) * (1 + ctx.layer_index)  # (B, T, H)
        ctx.add_aux_loss("probe", 0.1 * (1 + ctx.layer_index) * out.float().square().mean())
        return out

    def num_parameters(self) -> int:
        return self.proj.weight.numel()

    def flops(self, shape: FlopsShape) -> int:
        return 2 * shape.tokens * self.proj.weight.numel()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.proj.weight, std=10 * self.config.init_std, generator=generator)


class ProbePlugin:
    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry) -> None:  # type: ignore[no-untyped-def]
        registry.add("block", "test-context-probe", ContextProbe, summary="records what each call sees")


def build(mtp_num_layers: int = 1) -> GPT:
    host = isolated_host("mcore_models.plugin", ProbePlugin())
    cfg = GPTConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=3,
        mixer="test-context-probe",
        blocks={"swiglu": {"ffn_hidden_size": 48}},
        mtp_num_layers=mtp_num_layers,
    )
    return GPT.build(cfg, seed=0, device="cpu", block_lookup=lambda name: host.load("block", name))


def step(mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], GPT, AuxLosses]:
    model = build()
    apply_recompute(model, mode)  # as the run loop does, from outside the model
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    aux = AuxLosses()
    loss = model(tokens, labels=tokens.roll(-1, 1), ctx=BlockContext(aux_losses=aux))
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, model, aux


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_sees_the_same_layer_index_and_counts_aux_losses_once(mode: str) -> None:
    loss, grads, model, aux = step("none")
    loss_rc, grads_rc, model_rc, aux_rc = step(mode)
    assert torch.equal(loss_rc, loss)
    assert grads_rc.keys() == grads.keys() == {n for n, _ in model.named_parameters()}
    for name, grad in grads.items():
        assert torch.equal(grads_rc[name], grad), f"grad of {name} changed under recompute {mode!r}"
    assert [layer.attention.seen for layer in model.layers] == [[0], [1], [2]]
    assert [layer.attention.seen for layer in model_rc.layers] == [[0, 0], [1, 1], [2, 2]]  # + the recompute
    assert model_rc.mtp[0].layer.attention.seen == [3]  # MTP depths continue the numbering
    keys = [(0, "probe"), (1, "probe"), (2, "probe"), (3, "probe")]
    assert list(aux_rc) == list(aux) == keys  # one per layer after backward: counted once


def test_the_callers_context_is_left_unchanged() -> None:
    model = build()
    tokens = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(4))
    embeddings = torch.zeros(1, 6, 32)
    ctx = BlockContext(extra={"test.key": embeddings})
    model(tokens, labels=tokens, ctx=ctx).backward()
    assert ctx.layer_index == 0 and ctx.aux_losses is None
    assert dict(ctx.extra) == {"test.key": embeddings}
    # each call makes its own collector: two calls add their own losses, not each other's
    assert torch.equal(model(tokens, labels=tokens, ctx=ctx), model(tokens, labels=tokens, ctx=ctx))
