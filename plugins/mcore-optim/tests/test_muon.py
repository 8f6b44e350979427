"""``muon`` against a plain per-parameter Muon written here, plus routing, declared splits and scales."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import SINGLE, batches, plain_ns, tiny_model, train

from mcore.params import ParamSpec
from mcore_optim.muon import MuonFactory
from mcore_optim.newton_schulz import resolve
from mcore_testing.numerics import assert_rel_close


def build(model, **config):
    return MuonFactory(MuonFactory.Config(**config)).build(model, mesh=SINGLE, layouts=[])


def plain_blocks(name: str, rows: int, *, split_fused: bool, split_heads: bool, head_rows: int = 8) -> list[slice]:
    """The reference model's fused layouts, written out: ``qkv`` rows ``[all Q | K | V]`` (``head_rows``
    per head), ``gate_up`` rows ``[gate | up]``."""
    parts = 3 if ".qkv." in name else 2 if ".gate_up." in name else 1
    if not split_fused:
        parts = 1
    size = rows // parts
    out = [slice(i * size, (i + 1) * size) for i in range(parts)]
    if split_heads and ".qkv." in name:
        out = [slice(s.start + h, s.start + h + head_rows) for s in out for h in range(0, s.stop - s.start, head_rows)]
    return out


class PlainMuon:
    """The method, one parameter at a time: matrices by Muon, the rest by torch's AdamW."""

    def __init__(self, model, *, lr, wd, mu, triples, scale, adamw_lr, betas, split_fused=True, split_heads=False):
        roles = {g["role"]: g["names"] for g in build(tiny_model()).param_groups}
        params = dict(model.named_parameters())
        self.matrices = [(n, params[n]) for n in roles["matrix"]]
        self.bufs = {n: torch.zeros_like(p) for n, p in self.matrices}
        decay = [params[n] for n in roles["head"]]
        no_decay = [params[n] for r in ("embedding", "norm") for n in roles.get(r, [])]
        self.adamw = torch.optim.AdamW(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=adamw_lr, weight_decay=wd, betas=betas
        )
        self.lr, self.wd, self.mu, self.triples, self.scale = lr, wd, mu, triples, scale
        self.split_fused, self.split_heads = split_fused, split_heads

    def zero_grad(self, set_to_none=True):
        for _, p in self.matrices:
            p.grad = None
        self.adamw.zero_grad()

    @torch.no_grad()
    def step(self):
        for name, p in self.matrices:
            buf = self.bufs[name]
            buf.mul_(self.mu).add_(p.grad)
            u = p.grad + self.mu * buf
            out = torch.empty_like(u)
            for rows in plain_blocks(name, u.shape[0], split_fused=self.split_fused, split_heads=self.split_heads):
                block = u[rows]
                factor = math.sqrt(max(block.shape)) * (0.2 if self.scale == "match-adamw" else 1.0)
                out[rows] = plain_ns(block, self.triples) * factor
            p.mul_(1 - self.lr * self.wd).add_(out, alpha=-self.lr)
        self.adamw.step()


@pytest.mark.parametrize(
    ("coefficients", "scale", "split_fused", "split_heads"),
    [
        ("simple", "match-adamw", False, False),
        ("polar-express", "spectral", True, False),
        ("deepseek-v4", "match-adamw", True, True),
    ],
)
def test_matches_plain_muon(coefficients: str, scale: str, split_fused: bool, split_heads: bool) -> None:
    # In fp64: the two evaluate Newton-Schulz in different op orders (batched vs. written
    # out) and its polynomial amplifies rounding in directions of small singular values
    # (slope up to a^steps, ~1000 for polar-express), which in fp32 reaches ~1e-5.
    ours, ref = tiny_model().double(), tiny_model().double()
    opt = build(
        ours,
        lr=0.01,
        weight_decay=0.1,
        ns_coefficients=coefficients,
        ns_dtype="float64",
        scale=scale,
        split_fused=split_fused,
        split_heads=split_heads,
        adamw_lr=3e-3,
        adamw_impl="foreach",
    )
    plain = PlainMuon(
        ref,
        lr=0.01,
        wd=0.1,
        mu=0.95,
        triples=resolve(coefficients),
        scale=scale,
        split_fused=split_fused,
        split_heads=split_heads,
        adamw_lr=3e-3,
        betas=(0.9, 0.95),
    )
    data = batches(5)
    train(ours, opt, data)
    train(ref, plain, data)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_rel_close(p, q, tol=1e-12, name=name)


def test_groups_route_non_matrix_params_to_adamw() -> None:
    opt = build(tiny_model(), lr=0.02, adamw_lr=1e-3)
    groups = {g["role"]: g for g in opt.param_groups}
    assert groups["matrix"]["lr"] == 0.02
    assert {groups[r]["lr"] for r in ("embedding", "head", "norm")} == {1e-3}
    assert set(opt.adamw.state) == set(groups["embedding"]["names"] + groups["head"]["names"] + groups["norm"]["names"])
    assert set(opt.state) == set(groups["matrix"]["names"])


def test_bf16_update_learns() -> None:
    model = tiny_model()
    opt = build(model, lr=0.02)
    data = batches(1) * 15
    first = model(data[0][0], labels=data[0][1]).item()
    train(model, opt, data)
    assert model(data[0][0], labels=data[0][1]).item() < 0.8 * first


def test_zero_grad_keeps_zeroed_tensors_when_asked() -> None:
    model = tiny_model()
    opt = build(model)
    data = batches(1)
    model(data[0][0], labels=data[0][1]).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_config_errors() -> None:
    model = tiny_model()
    model.layers[0].attn.param_specs = lambda: {"qkv.weight": ParamSpec("matrix", splits=(("q", 32), ("kv", 63)))}
    with pytest.raises(
        ValueError, match=r"'layers.0.attn.qkv.weight': splits .* sum to 95 rows, but the parameter has 96"
    ):
        build(model)
    with pytest.raises(ValueError, match=r"scale = 'rms'; allowed"):
        MuonFactory(MuonFactory.Config(scale="rms"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"momentum = 1.0; allowed"):
        MuonFactory(MuonFactory.Config(momentum=1.0))
