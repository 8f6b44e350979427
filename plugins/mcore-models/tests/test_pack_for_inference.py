"""``GPT.pack_for_inference``: jointly projected weights laid out back to back, read without a copy under no_grad.

A decode step is bound by weight reads; a concatenated copy of q/k/v and gate/up per call doubled them.
"""

from __future__ import annotations

import torch

from mcore_models.blocks import base
from mcore_models.gpt import GPT, GPTConfig


def _model() -> GPT:
    torch.manual_seed(0)
    config = GPTConfig.from_values(
        {
            "vocab_size": 64,
            "hidden_size": 32,
            "num_layers": 2,
            "attention": {"num_heads": 4, "num_kv_heads": 2},
            "swiglu": {"ffn_hidden_size": 48},
        }
    )
    return GPT(config).eval()


def test_packed_model_gives_the_same_logits_and_projects_without_a_copy(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model = _model()
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        before = model(tokens)
    params = {name: p for name, p in model.named_parameters()}
    assert model.pack_for_inference() == 4  # 2 layers x (q/k/v, gate/up)
    assert {name: p for name, p in model.named_parameters()} == params  # the same Parameter objects
    attn = model.layers[0].attention
    q, k, v = attn.q.weight, attn.k.weight, attn.v.weight
    assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()
    assert v.data_ptr() == k.data_ptr() + k.numel() * k.element_size()

    views = []
    real = base._adjacent_view
    monkeypatch.setattr(base, "_adjacent_view", lambda ts: views.append(real(ts)) or views[-1])
    with torch.no_grad():
        after = model(tokens)
    assert len(views) == 4 and all(view is not None for view in views)  # every joint projection: a view, no copy
    assert torch.equal(after, before)


def test_training_still_concatenates_and_gets_every_gradient() -> None:
    model = _model().train()
    model.pack_for_inference()
    tokens = torch.randint(0, 64, (2, 9))
    model(tokens).sum().backward()  # with grad wanted, no storage view: gradients reach each parameter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    reference = _model().train()
    reference(tokens).sum().backward()
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6), name


def test_packing_again_leaves_packed_weights_where_they_are() -> None:
    """A second engine on one model packs it again: the weights a first engine's CUDA graphs read by address must
    stay put (moving them left those graphs replaying over freed memory: wrong tokens, illegal accesses)."""
    model = _model()
    assert model.pack_for_inference() == 4
    where = {name: p.data_ptr() for name, p in model.named_parameters()}
    storages = {name: p.untyped_storage().data_ptr() for name, p in model.named_parameters()}
    assert model.pack_for_inference() == 4  # still reported packed
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == where
    assert {name: p.untyped_storage().data_ptr() for name, p in model.named_parameters()} == storages
    attn = model.layers[1].attention
    attn.k.weight.data = attn.k.weight.data.clone()  # one weight moved (a load): that group is packed anew
    assert model.pack_for_inference() == 4
    q, k = attn.q.weight, attn.k.weight
    assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()
    assert q.data_ptr() != where["layers.1.attention.q.weight"]
    assert model.layers[0].attention.q.weight.data_ptr() == where["layers.0.attention.q.weight"]  # untouched group
