"""``GroupedSwiGLU.pack_for_inference``: gate and up in one ``(E_l, 2, F, H)`` buffer, read as ``[gate | up]``
without a copy; the same parameters, values, outputs and gradients as unpacked experts.

Why: the inference path's one gate/up GEMM concatenated every expert's gate and up weights per call (for
``moe-bench``, 537 MB read and written per layer and decode step, more than the step's own weight reads).
"""

from __future__ import annotations

import pytest
import torch

from mcore.protocols import BlockContext
from mcore_moe import inference
from mcore_moe.block import MoE, MoEConfig
from mcore_moe.experts import GroupedSwiGLU
from mcore_moe.gate_up import stacked_gate_up
from mcore_testing.numerics import seeded_generator, seeded_randn

H = 16


def _block() -> MoE:
    block = MoE(MoEConfig(num_experts=8, top_k=2, moe_ffn_hidden_size=24), hidden_size=H)
    block.reset_parameters(seeded_generator(0))
    return block.eval()


def test_packing_keeps_parameters_and_values_and_views_the_stack() -> None:
    experts = _block().experts
    params = dict(experts.named_parameters())
    gate, up = experts.gate.detach().clone(), experts.up.detach().clone()
    assert stacked_gate_up(experts.gate, experts.up) is None  # separate tensors: callers concatenate
    assert experts.pack_for_inference() == 1
    assert dict(experts.named_parameters()) == params  # the same Parameter objects, same names
    assert torch.equal(experts.gate, gate) and torch.equal(experts.up, up)
    stacked = stacked_gate_up(experts.gate, experts.up)
    assert stacked is not None and stacked.data_ptr() == experts.gate.data_ptr() and stacked.is_contiguous()
    assert torch.equal(stacked, torch.cat([gate, up], dim=1))  # (E, 2F, H): [gate | up] per expert
    assert experts.pack_for_inference() == 1 and stacked_gate_up(experts.gate, experts.up) is not None  # idempotent
    state = experts.state_dict()
    assert torch.equal(state["gate"], gate) and torch.equal(state["up"], up)


def test_stacked_view_refuses_what_is_not_packed() -> None:
    buffer = torch.randn(3, 2, 4, 5)
    assert stacked_gate_up(buffer[:, 0], buffer[:, 1]) is not None
    assert stacked_gate_up(buffer[:, 1], buffer[:, 0]) is None  # up before gate
    assert stacked_gate_up(buffer[:, 0], buffer[:, 0]) is None
    assert stacked_gate_up(buffer[:, 0], buffer.clone()[:, 1]) is None  # another storage, same offsets
    assert stacked_gate_up(buffer[:2, 0], buffer[1:, 1]) is None
    assert stacked_gate_up(torch.randn(3, 4, 5), torch.randn(3, 4, 5)) is None


@pytest.mark.parametrize("grouped_mm", [True, False])
@torch.no_grad()
def test_packed_inference_path_gives_the_unpacked_output(grouped_mm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not grouped_mm:
        monkeypatch.setattr(inference, "grouped_mm_fits", lambda x, w: False)
    elif not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    block = _block()
    hidden = seeded_randn(1, 11, H, seed=1)
    ctx = BlockContext(kv_cache=object())  # type: ignore[arg-type]  # the inference path
    want = block(hidden, ctx)
    calls: list[torch.Tensor] = []
    real = inference.static_grouped_linear
    monkeypatch.setattr(
        inference, "static_grouped_linear", lambda x, w, *a, **k: calls.append(w) or real(x, w, *a, **k)
    )
    block.experts.pack_for_inference()
    got = block(hidden, ctx)
    assert torch.equal(got, want)
    assert calls[0].data_ptr() == block.experts.gate.data_ptr()  # the stack is the packed weights themselves


def test_packed_experts_train_to_the_same_gradients() -> None:
    packed, plain = GroupedSwiGLU(4, H, 8), GroupedSwiGLU(4, H, 8)
    gen = seeded_generator(2)
    with torch.no_grad():
        for a, b in zip(packed.parameters(), plain.parameters()):
            a.copy_(torch.randn(a.shape, generator=gen))
            b.copy_(a)
    packed.pack_for_inference()
    rows, sizes = seeded_randn(13, H, seed=3), torch.tensor([5, 0, 6, 2])
    packed(rows, sizes).square().sum().backward()
    plain(rows, sizes).square().sum().backward()
    for (name, a), (_, b) in zip(packed.named_parameters(), plain.named_parameters()):
        assert a.grad is not None and b.grad is not None and torch.equal(a.grad, b.grad), name


def test_to_dtype_unpacks_and_packing_again_restores_the_view() -> None:
    experts = _block().experts
    experts.pack_for_inference()
    experts.to(torch.bfloat16)  # new tensors per parameter: separate again, still correct (concatenated per call)
    assert stacked_gate_up(experts.gate, experts.up) is None
    assert experts.pack_for_inference() == 1 and stacked_gate_up(experts.gate, experts.up) is not None
