"""Integration: a ``gpt`` model (mcore-models) with ``moe`` layers (mcore-moe) in its layer pattern trains on
CPU with the loss falling and the expert bias moving. The two plugins never import each other: the model
finds the block by its registered name.
"""

from __future__ import annotations

import torch

from mcore.plugins import load_plugins
from mcore.train.step_hooks import after_optimizer_step, post_step_modules
from mcore_moe.block import MoE
from mcore_testing.numerics import seeded_tokens


def _host():  # type: ignore[no-untyped-def]
    return load_plugins(
        entry_points=False, env=False, unpackaged=False, extra=["mcore_models.plugin", "mcore_moe.plugin"]
    )


def test_gpt_with_moe_layers_trains_and_moves_the_bias() -> None:
    host = _host()
    gpt = host.load("model", "gpt")
    moe = {
        "num_experts": 4,
        "top_k": 2,
        "moe_ffn_hidden_size": 32,
        "num_shared_experts": 1,
        "score_function": "sigmoid",
        "expert_bias": True,
        "bias_update_rate": 0.01,
        "seq_aux_loss_coeff": 0.001,
    }
    config = gpt.Config.from_values(
        {
            "vocab_size": 64,
            "hidden_size": 32,
            "num_layers": 3,
            "layers": ["1*attention/swiglu", "2*attention/moe"],
            "attention": {"num_heads": 4, "num_kv_heads": 2},
            "swiglu": {"ffn_hidden_size": 64},
            "moe": moe,
        }
    )
    model = gpt.build(config, seed=0, device="cpu", block_lookup=lambda name: host.load("block", name))
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) == 2
    hooks = post_step_modules(model)
    assert hooks == [m.router for m in moes]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = seeded_tokens((4, 16), vocab_size=64, seed=1)
    losses = []
    for _ in range(8):
        loss = model(tokens, labels=tokens.roll(-1, 1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        after_optimizer_step(hooks, lambda t: t, applied=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    bias = moes[0].router.expert_bias
    assert bias.abs().sum() > 0 and "layers.1.mlp.router.expert_bias" in model.state_dict()
    assert sum(moes[0].metrics()[f"load/expert_{e}"] for e in range(4)) == 4 * 16 * 2


def test_gpt_hands_token_ids_to_a_hash_routed_moe() -> None:
    """The hash router reads ``BlockContext.token_ids``: the model puts its input ids there (it did not)."""
    host = _host()
    gpt = host.load("model", "gpt")
    moe = {"num_experts": 4, "top_k": 2, "moe_ffn_hidden_size": 32, "router": "hash", "hash_vocab_size": 64}
    config = gpt.Config.from_values(
        {
            "vocab_size": 64,
            "hidden_size": 32,
            "num_layers": 2,
            "layers": ["2*attention/moe"],
            "attention": {"num_heads": 4, "num_kv_heads": 2},
            "moe": moe,
        }
    )
    model = gpt.build(config, seed=0, device="cpu", block_lookup=lambda name: host.load("block", name))
    tokens = seeded_tokens((2, 16), vocab_size=64, seed=2)
    loss = model(tokens, labels=tokens.roll(-1, 1))
    loss.backward()
    assert torch.isfinite(loss)
    first = next(m for m in model.modules() if isinstance(m, MoE))
    table = first.router.table  # (V, K): the experts each token id is sent to
    load = torch.bincount(table[tokens.reshape(-1)].reshape(-1), minlength=4)
    assert [first.metrics()[f"load/expert_{e}"] for e in range(4)] == load.tolist()
