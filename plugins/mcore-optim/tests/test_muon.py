"""``muon`` against a plain per-parameter Muon written here, plus routing, QKV blocks and scales."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import SINGLE, batches, tiny_model, train

from mcore_optim.muon import MuonFactory
from mcore_optim.newton_schulz import resolve
from mcore_testing.numerics import assert_rel_close


def build(model, **config):
    return MuonFactory(MuonFactory.Config(**config)).build(model, mesh=SINGLE, layouts=[])


def plain_ns(g: torch.Tensor, triples) -> torch.Tensor:
    """Newton-Schulz on one fp32 matrix, written out."""
    x = g / (g.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for a, b, c in triples:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class PlainMuon:
    """The method, one parameter at a time: matrices by Muon, the rest by torch's AdamW."""

    def __init__(self, model, *, lr, wd, mu, triples, scale, qkv_groups, adamw_lr, betas):
        roles = {g["role"]: g["names"] for g in build(tiny_model()).param_groups}
        params = dict(model.named_parameters())
        self.matrices = [(n, params[n]) for n in roles["matrix"]]
        self.bufs = {n: torch.zeros_like(p) for n, p in self.matrices}
        decay = [params[n] for n in roles["head"]]
        no_decay = [params[n] for r in ("embedding", "norm") for n in roles.get(r, [])]
        self.adamw = torch.optim.AdamW(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=adamw_lr, weight_decay=wd, betas=betas
        )
        self.lr, self.wd, self.mu, self.triples, self.scale, self.k = lr, wd, mu, triples, scale, qkv_groups

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
            k = self.k if ".qkv." in name else 1
            blocks = []
            for block in u.chunk(k, dim=0):
                factor = math.sqrt(max(block.shape)) * (0.2 if self.scale == "match-adamw" else 1.0)
                blocks.append(plain_ns(block, self.triples) * factor)
            p.mul_(1 - self.lr * self.wd).add_(torch.cat(blocks), alpha=-self.lr)
        self.adamw.step()


@pytest.mark.parametrize(
    ("coefficients", "scale", "qkv_groups"),
    [("simple", "match-adamw", 1), ("polar-express", "spectral", 3), ("deepseek-v4", "match-adamw", 2)],
)
def test_matches_plain_muon(coefficients: str, scale: str, qkv_groups: int) -> None:
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
        qkv_groups=qkv_groups,
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
        qkv_groups=qkv_groups,
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


def test_qkv_groups_without_a_matching_weight_warns() -> None:
    with pytest.warns(UserWarning, match=r"qkv_groups = 2 is ignored: no matrix parameter's module path matches"):
        build(tiny_model(), qkv_groups=2, qkv_pattern=r"\.wqkv$")


def test_zero_grad_keeps_zeroed_tensors_when_asked() -> None:
    model = tiny_model()
    opt = build(model)
    data = batches(1)
    model(data[0][0], labels=data[0][1]).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_config_errors() -> None:
    with pytest.raises(ValueError, match=r"qkv_groups = 5 does not divide the 96 rows of 'layers.0.attn.qkv.weight'"):
        build(tiny_model(), qkv_groups=5)
    with pytest.raises(ValueError, match=r"scale = 'rms'; allowed"):
        MuonFactory(MuonFactory.Config(scale="rms"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"momentum = 1.0; allowed"):
        MuonFactory(MuonFactory.Config(momentum=1.0))
