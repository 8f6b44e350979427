"""The plugin's registrations, and a small model of this test's own (the ``moe`` block looked up by name in
the registry, as a model plugin does) training on CPU: the loss falls and the expert bias moves."""

from __future__ import annotations

import torch
from torch import nn

from mcore.plugins import load_plugins
from mcore.protocols import AuxLosses, BlockContext
from mcore.train.step_hooks import after_optimizer_step, post_step_modules
from mcore_moe.block import MoE
from mcore_moe.router import TopKRouter
from mcore_testing.numerics import seeded_tokens


def _host():  # type: ignore[no-untyped-def]
    return load_plugins(entry_points=False, env=False, unpackaged=False, extra=["mcore_moe.plugin"])


def test_registers_router_dispatchers_and_block() -> None:
    host = _host()
    assert host.load("router", "topk") is TopKRouter
    assert host.load("block", "moe") is MoE
    names = {host.load("dispatcher", n).__name__ for n in ("allgather", "alltoall")}
    assert names == {"AllGatherDispatcher", "AllToAllDispatcher"}


class _TinyMoEModel(nn.Module):
    """Embedding -> ``layers`` x (h + moe(norm(h))) -> norm -> head; aux losses added to the loss."""

    def __init__(self, block_cls: type, config: object, *, vocab: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(layers))
        self.moes = nn.ModuleList(block_cls(config, hidden_size=hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ctx = BlockContext(aux_losses=AuxLosses(), token_ids=tokens)
        h = self.embed(tokens)  # (B, T, H)
        for i, (norm, moe) in enumerate(zip(self.norms, self.moes)):
            h = h + moe(norm(h), ctx.for_layer(i))
        loss = nn.functional.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())
        assert ctx.aux_losses is not None
        return loss + sum(ctx.aux_losses.values(), torch.zeros(()))


def test_a_model_with_moe_layers_trains_and_moves_the_bias() -> None:
    host = _host()
    block_cls = host.load("block", "moe")
    config = block_cls.Config(
        num_experts=4,
        top_k=2,
        moe_ffn_hidden_size=32,
        num_shared_experts=1,
        score_function="sigmoid",
        expert_bias=True,
        bias_update_rate=0.01,
        aux_loss_coeff=0.001,
        chunk_tokens=48,
    )
    torch.manual_seed(0)
    model = _TinyMoEModel(block_cls, config, vocab=64, hidden=32, layers=2)
    hooks = post_step_modules(model)
    assert hooks == [m for moe in model.moes for m in (moe, moe.router)]  # type: ignore[union-attr]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = seeded_tokens((4, 16), vocab_size=64, seed=1)
    losses = []
    for _ in range(8):
        loss = model(tokens, tokens.roll(-1, 1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        after_optimizer_step(hooks, lambda t: t, applied=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    router = model.moes[0].router  # type: ignore[union-attr]
    assert router.expert_bias.abs().sum() > 0 and "moes.0.router.expert_bias" in model.state_dict()
    assert all(p is not router.expert_bias for p in model.parameters())
