"""Integration: a ``gpt`` model (mcore-models) with ``moe`` layers (mcore-moe) in its layer pattern trains on
CPU with the loss falling and the expert bias moving. The two plugins never import each other: the model
finds the block by its registered name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from run_helpers import metrics

from mcore.config import resolve_config
from mcore.data.shards import prepare
from mcore.data.sources import iter_documents
from mcore.plugins import load_plugins
from mcore.train import run
from mcore.train.step_hooks import after_optimizer_step, post_step_modules
from mcore_moe.block import MoE
from mcore_testing import run_distributed
from mcore_testing.hosts import isolated_host
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
    assert hooks == [m for moe in moes for m in (moe, moe.router)]
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
    shares = moes[0].step_metrics(lambda t: t)
    assert sum(shares[f"moe/1/load/{e}"] for e in range(4)) == pytest.approx(4.0)  # named by the layer index


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
    load = torch.bincount(table[tokens.reshape(-1)].reshape(-1), minlength=4).float()
    first.after_optimizer_step(lambda t: t, applied=True)
    shares = first.step_metrics(lambda t: t)
    assert [shares[f"moe/0/load/{e}"] for e in range(4)] == pytest.approx((load * 4 / load.sum()).tolist())


def _metrics_config(root: Path, corpus: str, parallel: dict[str, Any]) -> dict[str, Any]:
    """A gpt with a dense layer and a moe layer (capacity 1, aux loss), 3 steps logged at 1, 2 and 3."""
    moe = {"num_experts": 4, "top_k": 2, "moe_ffn_hidden_size": 16, "capacity_factor": 1.0, "aux_loss_coeff": 0.01}
    return {
        "model": {
            "name": "gpt",
            "vocab_size": 257,
            "hidden_size": 32,
            "num_layers": 2,
            "layers": ["1*attention/swiglu", "1*attention/moe"],
            "attention": {"num_heads": 4, "num_kv_heads": 2},
            "swiglu": {"ffn_hidden_size": 64},
            "moe": moe,
        },
        "optimizer": {"name": "reference-adamw", "lr": 3e-3},
        "parallel": parallel,
        "train": {"steps": 3, "seq_len": 16, "global_batch_size": 4, "cpu_threads": 1, "out_dir": str(root / "run")},
        "data": {"source": corpus, "workers": 0},
        "log": {"progress": "none", "tensorboard": False, "plot": False, "every": 2},
        "checkpoint": {"save_final": False},
    }


def test_the_run_loop_logs_expert_loads_per_layer(tmp_path: Path) -> None:
    """``mcore train`` of a gpt with moe layers writes each layer's expert loads, dropped fraction and auxiliary
    losses of the logged steps into ``metrics.jsonl`` (``ReportsStepMetrics``)."""
    corpus = tmp_path / "corpus"
    prepare(iter_documents("stdlib"), corpus, tokenizer_spec="byte", workers=0, max_tokens=5_000)
    host = isolated_host("mcore_testing.plugin", "mcore_models.plugin", "mcore_moe.plugin")
    raw = _metrics_config(tmp_path, str(corpus), {"layouts": ["single"]})
    run(resolve_config(raw, host), host)
    rows = metrics(tmp_path / "run")
    assert sorted(rows) == [1, 2, 3]  # the first, every second and the last step
    for row in rows.values():
        loads = [row[f"moe/1/load/{e}"] for e in range(4)]
        assert sum(loads) == pytest.approx(4.0) and row["moe/1/max_load"] == max(loads)
        assert 0 <= row["moe/1/dropped_fraction"] < 1 and row["moe/1/aux/aux"] > 0
        assert not any(key.startswith("moe/0/") for key in row)  # layer 0 is dense


def _pp_run(root: str, corpus: str) -> None:
    host = isolated_host("mcore_testing.plugin", "mcore_models.plugin", "mcore_moe.plugin", "mcore_parallel.plugin")
    run(resolve_config(_metrics_config(Path(root), corpus, {"layouts": ["pp"]}), host), host)


def test_pipeline_stages_without_moe_layers_join_the_metrics_gather(tmp_path: Path) -> None:
    """pp2 with a dense first stage: rank 0 holds no moe layer but writes the log; the stages' numbers are
    gathered (it hung: only the stage with moe layers entered the gather)."""
    corpus = tmp_path / "corpus"
    prepare(iter_documents("stdlib"), corpus, tokenizer_spec="byte", workers=0, max_tokens=5_000)
    run_distributed(_pp_run, 2, str(tmp_path), str(corpus), timeout=300)
    rows = metrics(tmp_path / "run")
    assert sorted(rows) == [1, 2, 3]
    for row in rows.values():
        assert sum(row[f"moe/1/load/{e}"] for e in range(4)) == pytest.approx(4.0) and "moe/1/aux/aux" in row


def test_mcore_plan_estimates_a_model_with_moe_layers() -> None:
    """``mcore plan`` on storage-less tensors: the moe block's routing has data-dependent shapes, which raised
    a traceback; its static-shape path sizes the experts' activations from the dropless total instead."""
    from mcore.plan.estimate import plan_memory

    host = isolated_host("mcore_testing.plugin", "mcore_models.plugin", "mcore_moe.plugin")
    moe = {"num_experts": 8, "top_k": 2, "moe_ffn_hidden_size": 64}
    model = {"name": "gpt", "vocab_size": 257, "hidden_size": 64, "num_layers": 2}
    model |= {"attention": {"num_heads": 4, "num_kv_heads": 2}}
    raw = {"optimizer": {"name": "reference-adamw"}, "train": {"seq_len": 32, "global_batch_size": 2}}
    swiglu = {"layers": ["2*attention/swiglu"], "swiglu": {"ffn_hidden_size": 128}}
    dense = plan_memory(resolve_config({**raw, "model": model | swiglu}, host), host)
    sparse = plan_memory(
        resolve_config({**raw, "model": model | {"layers": ["2*attention/moe"], "moe": moe}}, host), host
    )
    assert sparse.params > dense.params  # 8 experts of 3 * 64 * 64 against one FFN of 3 * 64 * 128
    moe_layer, dense_layer = sparse.layers[1].activations, dense.layers[1].activations
    assert moe_layer > dense_layer  # K = 2 rows per token through FFN 64, plus routing and permutation
    # ep2: only the experts split (2 layers x 8 experts x 3 x 64 x 64 fp32 elements), the rest stays whole
    experts = 2 * 8 * 3 * 64 * 64
    moe_model = model | {"layers": ["2*attention/moe"], "moe": moe}
    ep2 = {**raw, "model": moe_model, "parallel": {"layouts": ["ep"], "sizes": {"ep": 2}}}
    split = plan_memory(resolve_config(ep2, host), host, world_size=2)
    assert split.params == sparse.params - 4 * experts // 2
    assert any("expert parameters" in note for note in split.assumptions)


def test_mcore_plan_counts_routed_experts_whole_under_tp_unless_expert_tp() -> None:
    """Under ``["tp", "ep"]`` the routed experts stay whole on each tp rank (ep splits them) unless
    ``[parallel.tp] expert_tp`` splits their FFN too; the plan's tp split follows that choice."""
    from mcore.plan.estimate import tp_split_numel

    host = isolated_host("mcore_testing.plugin", "mcore_models.plugin", "mcore_moe.plugin", "mcore_parallel.plugin")
    moe = {"num_experts": 4, "top_k": 2, "moe_ffn_hidden_size": 32}
    model = {"name": "gpt", "vocab_size": 257, "hidden_size": 64, "num_layers": 2, "layers": ["2*attention/moe"]}
    model |= {"attention": {"num_heads": 4, "num_kv_heads": 2}, "moe": moe}
    raw = {"optimizer": {"name": "reference-adamw"}, "train": {"seq_len": 32, "global_batch_size": 2}, "model": model}
    experts = 2 * 4 * 3 * 64 * 32  # 2 layers x 4 experts x (gate, up, down) of 64 x 32
    parallel = {"layouts": ["tp", "ep"], "sizes": {"tp": 2, "ep": 1}}
    split_whole, whole_whole = tp_split_numel(resolve_config({**raw, "parallel": parallel}, host), host)
    split_tp, whole_tp = tp_split_numel(
        resolve_config({**raw, "parallel": parallel | {"tp": {"expert_tp": True}}}, host), host
    )
    assert split_tp - split_whole == experts and whole_whole - whole_tp == experts
