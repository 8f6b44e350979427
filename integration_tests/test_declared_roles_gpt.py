"""``gpt`` (mcore-models) declares its parameters; ``muon`` (mcore-optim) reads the declarations.

Regressions: the optimizers found the head by the name pattern ``lm_head|output``, so gpt's untied
``head`` was orthogonalised by Muon as a hidden matrix; and Muon split a fused QKV weight into
``qkv_groups`` equal row blocks (a per-KV-group ``[q.., k, v]`` layout), while ``Attention`` packs
``[all Q | K | V]``.
"""

from __future__ import annotations

import math

import pytest
import torch

from mcore.mesh import ParallelMesh
from mcore.params import collect_param_specs
from mcore_models.gpt import GPT, GPTConfig
from mcore_optim.muon import MuonFactory
from mcore_optim.newton_schulz import resolve
from mcore_testing.conformance.params import assert_param_specs_valid
from mcore_testing.numerics import assert_rel_close

SINGLE = ParallelMesh((), (), "cpu")
# GQA: 4 query heads, 2 KV heads of 8 dims -> qkv rows [Q 32 | K 16 | V 16]
CONFIG = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 4,
    "num_kv_heads": 2,
    "ffn_hidden_size": 48,
}


def muon(model: GPT, **config: object):
    settings = {"lr": 0.1, "weight_decay": 0.0, "momentum": 0.0, "ns_dtype": "float64", **config}
    return MuonFactory(MuonFactory.Config(**settings)).build(model, mesh=SINGLE, layouts=[])  # type: ignore[arg-type]


def one_step(model: GPT, optimizer) -> dict[str, torch.Tensor]:
    """The gradients of one step, and the step taken."""
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(tokens, labels=tokens).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    return grads


def plain_ns(g: torch.Tensor) -> torch.Tensor:
    x = g / (g.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for a, b, c in resolve("simple"):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("tie", [False, True])
def test_gpt_declares_valid_specs_and_its_head(tie: bool) -> None:
    for extra in ({}, {"attention": "mla", "q_lora_rank": 16, "mtp_num_layers": 1}, {"qkv_bias": True}):
        assert_param_specs_valid(GPT(GPTConfig(**CONFIG, **extra, tie_embeddings=tie)))
    specs = collect_param_specs(GPT(GPTConfig(**CONFIG, tie_embeddings=tie)))
    assert specs["embed.weight"].role == "embedding"
    assert ("head.weight" in specs) is not tie and (tie or specs["head.weight"].role == "head")


def test_muon_leaves_gpts_untied_head_to_adamw() -> None:
    model = GPT(GPTConfig(**CONFIG)).double()
    optimizer = muon(model)
    roles = {name: g["role"] for g in optimizer.param_groups for name in g["names"]}
    assert roles["head.weight"] == "head"  # was "matrix": the pattern lm_head|output misses "head"
    assert "head.weight" not in optimizer.state and "head.weight" in optimizer.adamw.state
    before = model.head.weight.detach().clone()
    grads = one_step(model, optimizer)
    update = before - model.head.weight.detach()
    # AdamW's first step moves every element by ~lr (sign of the gradient), not an orthogonal matrix's
    assert_rel_close(update, 0.1 * grads["head.weight"].sign(), tol=1e-3, name="head.weight")


@pytest.mark.parametrize("split_heads", [False, True])
def test_muon_orthogonalises_gpts_q_k_v_blocks(split_heads: bool) -> None:
    model = GPT(GPTConfig(**CONFIG)).double()
    qkv = model.layers[0].attention.qkv.weight
    before = qkv.detach().clone()
    grads = one_step(model, muon(model, **({"split_heads": True} if split_heads else {})))
    grad = grads["layers.0.attention.qkv.weight"]
    blocks = [(0, 32), (32, 48), (48, 64)]  # [all Q | K | V], sliced by hand
    if split_heads:
        blocks = [(r, r + 8) for lo, hi in blocks for r in range(lo, hi, 8)]
    expected = torch.cat([plain_ns(grad[a:b]) * 0.2 * math.sqrt(max(b - a, 32)) for a, b in blocks])
    assert_rel_close(before - qkv.detach(), 0.1 * expected, tol=1e-10, name="qkv")
