"""Roles come from the model's declarations (``mcore.params``), not from name patterns; Muon reads the
declared fused layouts (splits, heads, experts)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import SINGLE, plain_ns, tiny_model
from torch import nn

from mcore.params import ParamSpec
from mcore_optim.adamw import AdamWFactory
from mcore_optim.distributed_adamw import DistributedAdamWFactory
from mcore_optim.layerwise import LayerwiseFactory
from mcore_optim.muon import MuonFactory
from mcore_optim.newton_schulz import resolve
from mcore_testing.numerics import assert_rel_close

FACTORIES = {
    "adamw": lambda **c: AdamWFactory(AdamWFactory.Config(**c)),
    "distributed-adamw": lambda **c: DistributedAdamWFactory(DistributedAdamWFactory.Config(**c)),
    "muon": lambda **c: MuonFactory(MuonFactory.Config(**c)),
    "layerwise-distributed": lambda **c: LayerwiseFactory(
        LayerwiseFactory.Config(lr=1e-3, inner="muon", options={"role_overrides": c["role_overrides"]})
        if c
        else LayerwiseFactory.Config(lr=1e-3, inner="muon")
    ),
}


class MoEish(nn.Module):
    """A GQA-style fused ``[all Q | K | V]`` projection (Q wider than K, V), a head named ``head``, a
    router and stacked experts ``(E, out, in)``, all declared."""

    def __init__(self, hidden: int = 16, q: int = 16, kv: int = 8, head_dim: int = 4, experts: int = 3) -> None:
        super().__init__()
        self.q, self.kv, self.head_dim = q, kv, head_dim
        self.embed = nn.Embedding(11, hidden)
        self.qkv = nn.Linear(hidden, q + 2 * kv, bias=False)
        self.proj = nn.Linear(q, hidden, bias=False)
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.Parameter(
            torch.randn(experts, 2 * hidden, hidden, generator=torch.Generator().manual_seed(1))
        )
        self.norm = nn.Parameter(torch.ones(hidden))
        self.head = nn.Linear(hidden, 11, bias=False)

    def param_specs(self) -> dict[str, ParamSpec]:
        splits = (("q", self.q), ("k", self.kv), ("v", self.kv))
        return {
            "qkv.weight": ParamSpec("matrix", splits=splits, head_rows=self.head_dim),
            "router.weight": ParamSpec("router"),
            "experts": ParamSpec("expert"),
            "head.weight": ParamSpec("head"),
        }

    def forward(self, tokens: torch.Tensor, *, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # (B, T, H)
        q, k, v = self.qkv(x).split([self.q, self.kv, self.kv], dim=-1)
        x = x + self.proj(q * (k * v).sum(-1, keepdim=True))
        weights = self.router(x).softmax(-1)  # (B, T, E)
        x = x + torch.einsum("bte,eoh,bth->bto", weights, self.experts, x)[..., : x.shape[-1]]
        logits = self.head(x * self.norm)
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def roles_of(optimizer) -> dict[str, str]:
    return {name: g["role"] for g in optimizer.param_groups for name in g["names"]}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_declared_roles_reach_every_optimizer(name: str) -> None:
    """A head named ``head`` is the head (the old name pattern ``lm_head|output`` made it a matrix, and
    Muon orthogonalised it); routers and experts get their own roles."""
    roles = roles_of(FACTORIES[name]().build(MoEish(), mesh=SINGLE, layouts=[]))
    assert roles == {
        "embed.weight": "embedding",
        "qkv.weight": "matrix",
        "proj.weight": "matrix",
        "router.weight": "router",
        "experts": "expert",
        "norm": "norm",
        "head.weight": "head",
    }


@pytest.mark.parametrize("name", list(FACTORIES))
def test_role_overrides_replace_declarations(name: str) -> None:
    factory = FACTORIES[name](role_overrides={r"^head\.": "matrix", r"^norm$": "bias"})
    roles = roles_of(factory.build(MoEish(), mesh=SINGLE, layouts=[]))
    assert roles["head.weight"] == "matrix" and roles["norm"] == "bias" and roles["router.weight"] == "router"


def test_muon_leaves_the_head_and_router_to_adamw_and_orthogonalises_each_expert() -> None:
    model = MoEish().double()
    opt = MuonFactory(MuonFactory.Config(lr=0.1, weight_decay=0.0, momentum=0.0, ns_dtype="float64")).build(
        model, mesh=SINGLE, layouts=[]
    )
    assert set(opt.state) == {"qkv.weight", "proj.weight", "experts"}
    assert {"head.weight", "router.weight"} <= set(opt.adamw.state)
    before = model.experts.detach().clone()
    tokens = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    model(tokens, labels=tokens).backward()
    grad = model.experts.grad.clone()
    opt.step()
    triples = resolve("simple")
    for e in range(3):  # each expert's (out, in) matrix on its own, scaled by its own shape
        expected = plain_ns(grad[e], triples) * 0.2 * math.sqrt(32)
        assert_rel_close(before[e] - model.experts.detach()[e], 0.1 * expected, tol=1e-10, name=f"expert {e}")


@pytest.mark.parametrize("split_heads", [False, True])
def test_muon_splits_gqa_qkv_by_declared_rows(split_heads: bool) -> None:
    """Q (16 rows), K and V (8 rows each) of ``[all Q | K | V]``, each orthogonalised and scaled by its own
    shape (and per head of 4 rows when asked), against blocks sliced by hand."""
    model = MoEish().double()
    opt = MuonFactory(
        MuonFactory.Config(lr=0.1, weight_decay=0.0, momentum=0.0, ns_dtype="float64", split_heads=split_heads)
    ).build(model, mesh=SINGLE, layouts=[])
    before = model.qkv.weight.detach().clone()
    tokens = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    model(tokens, labels=tokens).backward()
    grad = model.qkv.weight.grad.clone()
    opt.step()
    rows = [(0, 16), (16, 24), (24, 32)]  # q, k, v
    if split_heads:
        rows = [(r, r + 4) for lo, hi in rows for r in range(lo, hi, 4)]
    expected = torch.cat([plain_ns(grad[a:b], resolve("simple")) * 0.2 * math.sqrt(max(b - a, 16)) for a, b in rows])
    assert_rel_close(before - model.qkv.weight.detach(), 0.1 * expected, tol=1e-10, name="qkv")


def test_reference_model_roles_are_unchanged() -> None:
    """The reference model declares ``lm_head`` as its head: groups as before declarations existed."""
    roles = roles_of(AdamWFactory().build(tiny_model(), mesh=SINGLE, layouts=[]))
    assert roles["lm_head.weight"] == "head" and roles["pos.weight"] == "embedding"
    assert {r for r in roles.values()} == {"embedding", "matrix", "head", "norm"}


def test_a_model_without_declarations_warns_and_overrides_fix_it() -> None:
    class Undeclared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(11, 8)
            self.lm_head = nn.Linear(8, 11, bias=False)

    with pytest.warns(UserWarning, match=r"model Undeclared declares no parameter roles .* treated as a hidden matrix"):
        roles = roles_of(AdamWFactory().build(Undeclared(), mesh=SINGLE, layouts=[]))
    assert roles == {"embed.weight": "embedding", "lm_head.weight": "matrix"}
    fixed = AdamWFactory(AdamWFactory.Config(role_overrides={r"^lm_head\.": "head"}))
    assert roles_of(fixed.build(Undeclared(), mesh=SINGLE, layouts=[]))["lm_head.weight"] == "head"
