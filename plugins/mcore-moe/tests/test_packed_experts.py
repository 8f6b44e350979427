"""``GroupedSwiGLU``'s packed layout: gate and up as views of one ``(E_l, 2, F, H)`` buffer, read as ``[gate | up]``
without a copy; the same parameters, names, values, outputs and gradients as unpacked experts.

Why: the one gate/up GEMM concatenated every expert's gate and up weights per call (for ``moe-bench``, 537 MB
read and written per layer and call: in the inference path's decode steps, and twice per training step, forward
and backward). The module is built packed, packs itself again after conversions and meta materialization, and
leaves alone weights that are views of another buffer (a layout's).
"""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch

from mcore.construct import init_params
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


def unpack(experts: GroupedSwiGLU) -> None:
    """The layout before packing: ``gate`` and ``up`` contiguous tensors of their own (same objects, values)."""
    experts.gate.data, experts.up.data = experts.gate.detach().clone(), experts.up.detach().clone()
    assert stacked_gate_up(experts.gate, experts.up) is None


def test_experts_are_built_packed_with_their_names_and_values() -> None:
    experts = _block().experts
    assert [name for name, _ in experts.named_parameters()] == ["gate", "up", "down"]
    assert experts.gate.shape == experts.up.shape == (8, 24, H) and not experts.gate.is_contiguous()
    stacked = stacked_gate_up(experts.gate, experts.up)
    assert stacked is not None and stacked.data_ptr() == experts.gate.data_ptr() and stacked.is_contiguous()
    assert torch.equal(stacked, torch.cat([experts.gate, experts.up], dim=1))  # (E, 2F, H): [gate | up] per expert
    params = dict(experts.named_parameters())
    assert experts.pack() == 1 and experts.pack_for_inference() == 1  # idempotent
    assert dict(experts.named_parameters()) == params and stacked_gate_up(experts.gate, experts.up) is not None


def test_packing_keeps_parameters_and_values_and_views_the_stack() -> None:
    experts = _block().experts
    unpack(experts)
    params = dict(experts.named_parameters())
    gate, up = experts.gate.detach().clone(), experts.up.detach().clone()
    assert experts.pack() == 1
    assert dict(experts.named_parameters()) == params  # the same Parameter objects, same names
    assert torch.equal(experts.gate, gate) and torch.equal(experts.up, up)
    assert stacked_gate_up(experts.gate, experts.up) is not None
    state = experts.state_dict()
    assert list(state) == ["gate", "up", "down"]
    assert torch.equal(state["gate"], gate) and torch.equal(state["up"], up)


def test_stacked_view_refuses_what_is_not_packed() -> None:
    buffer = torch.randn(3, 2, 4, 5)
    assert stacked_gate_up(buffer[:, 0], buffer[:, 1]) is not None
    assert stacked_gate_up(buffer[:, 1], buffer[:, 0]) is None  # up before gate
    assert stacked_gate_up(buffer[:, 0], buffer[:, 0]) is None
    assert stacked_gate_up(buffer[:, 0], buffer.clone()[:, 1]) is None  # another storage, same offsets
    assert stacked_gate_up(buffer[:2, 0], buffer[1:, 1]) is None
    assert stacked_gate_up(torch.randn(3, 4, 5), torch.randn(3, 4, 5)) is None


def test_views_of_another_buffer_are_packed_only_for_inference() -> None:
    """A layout's flat buffer (``ddp``'s sharded values, FSDP's gathered ones) holds the weights: training's
    ``pack`` leaves them where they are (the forward concatenates), the engine's ``pack_for_inference`` moves them."""
    experts = GroupedSwiGLU(2, 4, 3)
    flat = torch.arange(2 * 2 * 3 * 4 + 5, dtype=torch.float32)  # (total,): padding at the end, like a bucket
    with torch.no_grad():
        experts.gate.data = flat[:24].view(2, 3, 4)
        experts.up.data = flat[24:48].view(2, 3, 4)
    assert experts.pack() == 0 and experts.gate.data_ptr() == flat.data_ptr()  # still the buffer's view
    assert experts.pack_for_inference() == 1 and stacked_gate_up(experts.gate, experts.up) is not None
    assert torch.equal(experts.gate, flat[:24].view(2, 3, 4)) and torch.equal(experts.up, flat[24:48].view(2, 3, 4))


@pytest.mark.parametrize("grouped_mm", [True, False])
@torch.no_grad()
def test_packed_inference_path_gives_the_unpacked_output(grouped_mm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not grouped_mm:
        monkeypatch.setattr(inference, "grouped_mm_fits", lambda x, w: False)
    elif not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    block = _block()
    unpack(block.experts)
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
    unpack(plain)
    assert stacked_gate_up(packed.gate, packed.up) is not None
    rows, sizes = seeded_randn(13, H, seed=3), torch.tensor([5, 0, 6, 2])
    packed(rows, sizes).square().sum().backward()
    plain(rows, sizes).square().sum().backward()
    for (name, a), (_, b) in zip(packed.named_parameters(), plain.named_parameters()):
        assert a.grad is not None and b.grad is not None and torch.equal(a.grad, b.grad), name
        assert a.grad.is_contiguous(), name  # each gradient a tensor of its own


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_conversions_keep_the_experts_packed(dtype: torch.dtype) -> None:
    experts = _block().experts
    gate, up = experts.gate.detach().clone(), experts.up.detach().clone()
    experts.to(dtype)  # a new tensor per parameter, packed again by the module
    assert experts.gate.dtype == dtype and stacked_gate_up(experts.gate, experts.up) is not None
    assert torch.equal(experts.gate, gate.to(dtype)) and torch.equal(experts.up, up.to(dtype))
    copy = deepcopy(experts)  # each parameter copied on its own, packed again
    assert stacked_gate_up(copy.gate, copy.up) is not None and copy.gate.data_ptr() != experts.gate.data_ptr()
    assert torch.equal(copy.gate, experts.gate) and torch.equal(copy.up, experts.up)
    experts.to_empty(device="cpu")  # uninitialised storage, packed again
    assert stacked_gate_up(experts.gate, experts.up) is not None


def test_meta_construction_materializes_packed_with_the_same_values() -> None:
    """``mcore.construct.init_params`` (the meta path of ``mcore train``): the experts come out packed, and their
    values are those of the same block materialized unpacked (values keyed by name and element, not storage)."""
    config = MoEConfig(num_experts=4, top_k=2, moe_ffn_hidden_size=8)
    with torch.device("meta"):
        packed, plain = MoE(config, hidden_size=H), MoE(config, hidden_size=H)
    with torch.device("meta"):  # the layout before this change: gate and up separate meta tensors
        plain.experts.gate = torch.nn.Parameter(torch.empty(4, 8, H))
        plain.experts.up = torch.nn.Parameter(torch.empty(4, 8, H))
    init_params(packed, seed=7, device="cpu")
    init_params(plain, seed=7, device="cpu")
    assert stacked_gate_up(packed.experts.gate, packed.experts.up) is not None
    assert stacked_gate_up(plain.experts.gate, plain.experts.up) is None
    for (name, a), (_, b) in zip(packed.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name
