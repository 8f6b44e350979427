"""``gpt`` (mcore-models) declares its parameters; ``muon`` (mcore-optim) reads the declarations.

Regressions: the optimizers found the head by the name pattern ``lm_head|output``, so gpt's untied
``head`` was orthogonalised by Muon as a hidden matrix; and Muon split a fused QKV weight into
``qkv_groups`` equal row blocks (a per-KV-group ``[q.., k, v]`` layout), while ``Attention`` packed
``[all Q | K | V]``. ``Attention`` now keeps ``q``, ``k``, ``v`` (and the MLPs ``gate``, ``up``) as
separate parameters, which shard by rows under tensor parallelism; each is one Muon matrix, and
``split_heads`` cuts q, k and v by their declared ``head_rows``.
"""

from __future__ import annotations

import math

import pytest
import torch

from mcore.mesh import ParallelMesh
from mcore.params import collect_param_specs
from mcore_models.blocks.attention import Attention
from mcore_models.blocks.mla import MLA
from mcore_models.blocks.mlp import SwiGLU
from mcore_models.gpt import GPT, GPTConfig
from mcore_optim.muon import MuonFactory
from mcore_optim.newton_schulz import resolve
from mcore_testing.conformance.params import assert_param_specs_valid
from mcore_testing.numerics import assert_rel_close

SINGLE = ParallelMesh((), (), "cpu")
# GQA: 4 query heads, 2 KV heads of 8 dims -> q 32 rows, k and v 16 rows each
CONFIG = {"vocab_size": 64, "hidden_size": 32, "num_layers": 1}
BLOCKS = {"attention": Attention.Config(num_heads=4, num_kv_heads=2), "swiglu": SwiGLU.Config(ffn_hidden_size=48)}


def gpt_config(*, blocks: dict[str, object] | None = None, **keys: object) -> GPTConfig:
    """``CONFIG`` with ``keys`` over it and ``blocks`` tables replacing those of ``BLOCKS``."""
    return GPTConfig(**{**CONFIG, **keys}, blocks={**BLOCKS, **(blocks or {})})  # type: ignore[arg-type]


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
    variants: list[dict[str, object]] = [
        {},
        {"mixer": "mla", "mtp_num_layers": 1, "blocks": {"mla": MLA.Config(num_heads=4, q_lora_rank=16)}},
        {"blocks": {"attention": Attention.Config(num_heads=4, num_kv_heads=2, qkv_bias=True)}},
    ]
    for extra in variants:
        assert_param_specs_valid(GPT(gpt_config(**extra, tie_embeddings=tie)))  # type: ignore[arg-type]
    specs = collect_param_specs(GPT(gpt_config(tie_embeddings=tie)))
    assert specs["embed.weight"].role == "embedding"
    assert ("head.weight" in specs) is not tie and (tie or specs["head.weight"].role == "head")


def test_muon_leaves_gpts_untied_head_to_adamw() -> None:
    model = GPT(gpt_config()).double()
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
def test_muon_orthogonalises_gpts_q_k_v_gate_up_each_on_its_own(split_heads: bool) -> None:
    model = GPT(gpt_config()).double()
    specs = collect_param_specs(model)
    attention = [f"layers.0.attention.{n}.weight" for n in "qkv"]
    mlp = [f"layers.0.mlp.{n}.weight" for n in ("gate", "up")]
    for name in attention + mlp:  # heads of 8 rows in q, k and v; nothing fused
        head_rows = 8 if name in attention else None
        assert (specs[name].role, specs[name].splits, specs[name].head_rows) == ("matrix", (), head_rows), name
    params = dict(model.named_parameters())
    before = {name: params[name].detach().clone() for name in attention + mlp}
    grads = one_step(model, muon(model, **({"split_heads": True} if split_heads else {})))
    for name in attention + mlp:
        grad = grads[name]
        rows, cols = grad.shape  # q (32, 32), k and v (16, 32), gate and up (48, 32)
        step = 8 if split_heads and name in attention else rows
        blocks = [(r, r + step) for r in range(0, rows, step)]  # the whole matrix, or each head, by hand
        expected = torch.cat([plain_ns(grad[a:b]) * 0.2 * math.sqrt(max(b - a, cols)) for a, b in blocks])
        assert_rel_close(before[name] - params[name].detach(), 0.1 * expected, tol=1e-10, name=name)
