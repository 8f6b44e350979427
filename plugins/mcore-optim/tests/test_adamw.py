"""``adamw`` against ``torch.optim.AdamW``, step for step, and its groups, masters and config errors."""

from __future__ import annotations

import pytest
import torch
from helpers import SINGLE, batches, tiny_model, train

from mcore_optim.adamw import AdamWFactory
from mcore_testing.numerics import assert_rel_close


def build(model, **config):
    return AdamWFactory(AdamWFactory.Config(**config)).build(model, mesh=SINGLE, layouts=[])


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_matches_torch_adamw_step_for_step(impl: str) -> None:
    ours, ref = tiny_model(), tiny_model()
    opt = build(ours, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, no_decay_roles=(), impl=impl)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for batch in batches(6):
        train(ours, opt, [batch])
        train(ref, torch_opt, [batch])
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert_rel_close(p, q, tol=1e-6, name=name)


def test_no_decay_roles_match_torch_param_groups() -> None:
    ours, ref = tiny_model(), tiny_model()
    opt = build(ours, lr=3e-3, weight_decay=0.1, impl="foreach")
    roles = {name: g["role"] for g in opt.param_groups for name in g["names"]}
    decay = [p for n, p in ref.named_parameters() if roles[n] not in ("norm", "bias", "embedding")]
    no_decay = [p for n, p in ref.named_parameters() if roles[n] in ("norm", "bias", "embedding")]
    torch_opt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95)
    )
    data = batches(4)
    train(ours, opt, data)
    train(ref, torch_opt, data)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_rel_close(p, q, tol=1e-6, name=name)


def test_roles_from_module_structure() -> None:
    opt = build(tiny_model())
    roles = {name: g["role"] for g in opt.param_groups for name in g["names"]}
    assert roles["embed.weight"] == "embedding" and roles["pos.weight"] == "embedding"
    assert roles["lm_head.weight"] == "head"
    assert roles["norm.weight"] == "norm"
    assert roles["layers.0.attn.qkv.weight"] == "matrix"
    assert [g["role"] for g in opt.param_groups] == ["embedding", "matrix", "head", "norm"]
    decay = {g["role"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"embedding": 0.0, "matrix": 0.1, "head": 0.1, "norm": 0.0}


def test_mup_scales_matrix_lr_only() -> None:
    opt = build(tiny_model(), lr=1e-2, mup_base_width=8, mup_width=32)
    lrs = {g["role"]: g["lr"] for g in opt.param_groups}
    assert lrs["matrix"] == pytest.approx(1e-2 * 8 / 32)
    assert lrs["embedding"] == lrs["head"] == lrs["norm"] == pytest.approx(1e-2)


def test_bf16_params_keep_fp32_master_weights() -> None:
    """bf16 parameters stepped with fp32 masters follow the fp32 run to bf16 rounding."""
    ref = tiny_model()
    low = tiny_model().to(torch.bfloat16)
    opt_ref = build(ref, lr=1e-3, impl="foreach")
    opt_low = build(low, lr=1e-3, impl="foreach")
    for batch in batches(3):
        opt_ref.zero_grad()
        ref(batch[0], labels=batch[1]).backward()
        # the same (fp32) gradients for both, so only the update path differs
        for p, q in zip(low.parameters(), ref.parameters()):
            p.grad = q.grad.to(torch.bfloat16)
        opt_ref.step()
        opt_low.step()
    for (name, p), q in zip(low.named_parameters(), ref.parameters()):
        master = opt_low.state[name]["master"]
        assert master.dtype == torch.float32
        assert torch.equal(p, master.to(torch.bfloat16)), name
        assert_rel_close(master, q, tol=1e-2, name=name)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("lr", -1.0, "number >= 0"),
        ("betas", (0.9, 1.5), "two numbers in [0, 1)"),
        ("eps", 0.0, "number > 0"),
        ("impl", "cuda", "allowed: ['auto', 'foreach', 'fused', 'triton']"),
        ("no_decay_roles", ("norms",), "allowed roles"),
        ("mup_width", 0, "positive int"),
    ],
)
def test_config_errors_name_key_value_and_allowed(key: str, value: object, allowed: str) -> None:
    extra = {"mup_base_width": 8} if key == "mup_width" else {}
    with pytest.raises(ValueError, match=key) as info:
        AdamWFactory(AdamWFactory.Config(**{key: value}, **extra))
    assert repr(value) in str(info.value) and allowed in str(info.value)
