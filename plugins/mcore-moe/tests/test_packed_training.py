"""The training path over packed experts: the gate/up GEMM's forward and backward read ``[gate | up]`` in place (no
``torch.cat`` of the weights), with the reference's output and gradients; state dicts, checkpoints and ``ep``
shards keep their names and values.

Why: ``_GateUpGroupedMM`` concatenated the ``(E_l, 2F, H)`` stack in the forward and again in the backward (0.73 ms
of an 8.1 ms fwd + bwd at the issue's shape, H100); ``GroupedSwiGLU`` now keeps gate and up packed, and these tests
pin that nothing else changed for it. CPU and fp32 (``torch._grouped_mm`` runs there too), plus one CUDA bf16 test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from mcore.checkpoint.load import load_checkpoint
from mcore.checkpoint.store import CheckpointManager
from mcore.precision.grouped import grouped_linear_reference
from mcore.protocols import AuxLosses, BlockContext
from mcore_moe.block import MoE, MoEConfig
from mcore_moe.dispatcher import AllGatherDispatcher
from mcore_moe.ep_experts import shard_experts
from mcore_moe.experts import GroupedSwiGLU
from mcore_moe.gate_up import gate_up_grouped_mm, stacked_gate_up
from mcore_testing.dist import run_distributed
from mcore_testing.numerics import assert_rel_close, seeded_generator, seeded_randn

E, F, H = 4, 8, 16
needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")


def _experts(seed: int = 0) -> GroupedSwiGLU:
    experts = GroupedSwiGLU(E, H, F)
    gen = seeded_generator(seed)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return experts


def _unpacked(experts: GroupedSwiGLU) -> GroupedSwiGLU:
    """The same weights laid out as before packing: separate contiguous ``gate`` and ``up``."""
    old = GroupedSwiGLU(E, H, F)
    old.gate.data, old.up.data = torch.empty(E, F, H), torch.empty(E, F, H)
    old.load_state_dict(experts.state_dict())
    assert stacked_gate_up(old.gate, old.up) is None
    return old


class _CountCats:
    """Counts ``torch.cat`` calls whose inputs are weights of ``shape`` (the stack the packed path must not build)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...]) -> None:
        self.calls, self.shape, self.real = 0, shape, torch.cat
        monkeypatch.setattr(torch, "cat", self)

    def __call__(self, tensors: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += any(tuple(t.shape) == self.shape for t in tensors)
        return self.real(tensors, *args, **kwargs)


@needs_grouped_mm
@pytest.mark.parametrize("packed", [True, False])
def test_gate_up_gemm_forward_and_gradients_equal_the_reference(packed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32: ``[gate | up]`` rows and the gradients of rows, gate and up, packed (no concatenation, forward or
    backward) and unpacked (the fallback: one per pass), against autograd through the per-expert reference."""
    experts = _experts() if packed else _unpacked(_experts())
    sizes = torch.tensor([5, 0, 9, 3])
    rows = seeded_randn(20, H, seed=1)  # (M, H): 3 padding rows past the groups
    grad = seeded_randn(20, 2 * F, seed=2)  # (M, 2F)
    ref_rows, ref_gate, ref_up = (t.detach().clone().requires_grad_() for t in (rows, experts.gate, experts.up))
    want = grouped_linear_reference(ref_rows, torch.cat([ref_gate, ref_up], dim=1), sizes)
    want.backward(grad)
    cats = _CountCats(monkeypatch, (E, F, H))
    x = rows.clone().requires_grad_()
    got = gate_up_grouped_mm(x, experts.gate, experts.up, sizes)
    got.backward(grad)
    assert cats.calls == (0 if packed else 2)
    n = int(sizes.sum())  # rows past the groups: no group's, the reference's zeros
    assert_rel_close(got[:n], want[:n], 1e-5, name="gate_up")
    assert x.grad is not None and experts.gate.grad is not None and experts.up.grad is not None
    assert ref_rows.grad is not None and ref_gate.grad is not None and ref_up.grad is not None
    assert_rel_close(x.grad[:n], ref_rows.grad[:n], 1e-5, name="d rows")
    assert_rel_close(experts.gate.grad, ref_gate.grad, 1e-5, name="d gate")
    assert_rel_close(experts.up.grad, ref_up.grad, 1e-5, name="d up")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_built_experts_converted_on_meta_stay_packed_through_init(dtype: torch.dtype) -> None:
    """``mcore train``'s order: build on meta, the precision recipe converts there (``model.to(dtype)``), then
    ``init_params`` allocates: gate and up come out as views of one buffer, in the recipe's dtype."""
    from mcore.construct import init_params

    with torch.device("meta"):
        block = MoE(MoEConfig(num_experts=8, top_k=2, moe_ffn_hidden_size=24), hidden_size=16)
    block = block.to(dtype=dtype)
    init_params(block, seed=0, device="cpu")
    experts = block.experts
    assert experts.gate.dtype == dtype and not experts.gate.is_meta
    assert stacked_gate_up(experts.gate, experts.up) is not None


def test_a_no_op_conversion_leaves_weights_unpacked_on_purpose_alone() -> None:
    """Weights given contiguous storage of their own (as ``distributed-adamw`` does) stay so through a conversion
    that changes nothing (``.to`` the same device and dtype), and are packed again by one that copies."""
    experts = _experts()
    experts.gate.data, experts.up.data = experts.gate.detach().contiguous(), experts.up.detach().contiguous()
    experts.to("cpu").float()
    assert experts.gate.is_contiguous() and experts.up.is_contiguous()
    packed = _experts()
    packed.to(dtype=torch.float64)
    assert stacked_gate_up(packed.gate, packed.up) is not None and packed.gate.dtype == torch.float64


def test_state_dict_names_and_values_load_both_ways() -> None:
    """Saved by a packed module, loaded into one built the old way (separate tensors), and back."""
    new = _experts(seed=3)
    old = _unpacked(_experts(seed=4))
    state = new.state_dict()
    assert list(state) == ["gate", "up", "down"] and all(state[k].shape == getattr(new, k).shape for k in state)
    old.load_state_dict(state)
    for name in state:
        assert torch.equal(getattr(old, name), state[name]), name
    back = _experts(seed=5)
    back.load_state_dict(old.state_dict())
    assert stacked_gate_up(back.gate, back.up) is not None  # loading copies in place: still packed
    for name in state:
        assert torch.equal(getattr(back, name), state[name]), name


def test_state_dict_file_round_trip(tmp_path: Path) -> None:
    new = _experts(seed=6)
    torch.save(new.state_dict(), tmp_path / "experts.pt")
    loaded = torch.load(tmp_path / "experts.pt", weights_only=True)
    assert list(loaded) == ["gate", "up", "down"]
    old = _unpacked(_experts(seed=7))
    old.load_state_dict(loaded)
    for name, value in new.state_dict().items():
        assert torch.equal(loaded[name], value) and torch.equal(getattr(old, name), value), name


class _Stateless:
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert state == {}


def test_checkpoint_round_trip_keeps_values_names_and_packing(tmp_path: Path) -> None:
    """``mcore.checkpoint`` (DCP): a packed block saved and loaded into a fresh packed block and into one built the
    old way; the names in the checkpoint are the block's parameter names."""
    config = MoEConfig(num_experts=E, top_k=2, moe_ffn_hidden_size=F)
    saved = MoE(config, hidden_size=H)
    saved.reset_parameters(seeded_generator(8))
    manager = CheckpointManager(tmp_path, keep_last=2, async_save=False, rank=0, world_size=1)
    meta = {"format": "mcore-checkpoint-1", "model_name": "moe", "config": {}}
    manager.save(1, model=saved, optimizer=_Stateless(), precision=_Stateless(), meta=meta, rank_extra={})
    path = tmp_path / "step_00000001"
    fresh = MoE(config, hidden_size=H)
    fresh.reset_parameters(seeded_generator(9))
    old = MoE(config, hidden_size=H)
    old.experts.gate.data, old.experts.up.data = torch.zeros(E, F, H), torch.zeros(E, F, H)
    for target in (fresh, old):
        load_checkpoint(path, model=target, optimizer=_Stateless(), precision=_Stateless())
        for name, value in saved.state_dict().items():
            assert torch.equal(target.state_dict()[name], value), name
    assert stacked_gate_up(fresh.experts.gate, fresh.experts.up) is not None


# -- ep: 2 gloo ranks, the experts Shard(0) DTensors whose local gate and up stay packed --------------------------


def _ep_training_matches_one_process() -> None:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    config = MoEConfig(num_experts=E, top_k=2, moe_ffn_hidden_size=F)
    whole = MoE(config, hidden_size=H)
    whole.reset_parameters(seeded_generator(0))
    block = MoE(config, hidden_size=H)
    block.load_state_dict(whole.state_dict())
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    shard_experts(block.experts, mesh, rank, world)
    block.dispatcher = AllGatherDispatcher(dist.group.WORLD, E)
    gate, up = block.experts.gate, block.experts.up
    assert isinstance(gate, DTensor) and isinstance(up, DTensor)
    assert gate.stride() == up.stride() == (F * H, H, 1)  # the whole tensors described as contiguous ones
    stacked = stacked_gate_up(gate.to_local(), up.to_local())
    assert stacked is not None and stacked.data_ptr() == gate.to_local().data_ptr()  # (E_l, 2F, H) in place
    x = [seeded_randn(1, 6, H, seed=10 + q) for q in range(world)]
    g = [seeded_randn(1, 6, H, seed=20 + q) for q in range(world)]
    out = block(x[rank], BlockContext(aux_losses=AuxLosses()))
    (out * g[rank]).sum().backward()
    ref_loss = sum((whole(x[q], BlockContext(aux_losses=AuxLosses())) * g[q]).sum() for q in range(world))
    ref_loss.backward()  # type: ignore[union-attr]
    assert_rel_close(out, whole(x[rank], BlockContext(aux_losses=AuxLosses())), 1e-5)
    local = E // world
    for name in ("gate", "up", "down"):
        grad = getattr(block.experts, name).grad
        ref = getattr(whole.experts, name).grad
        assert isinstance(grad, DTensor) and ref is not None
        assert_rel_close(grad.to_local(), ref[rank * local : (rank + 1) * local], 1e-5, name=name)


def test_ep_shards_keep_gate_and_up_packed_and_train_to_the_one_process_gradients() -> None:
    run_distributed(_ep_training_matches_one_process, 2, timeout=120)


# -- CUDA --------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_bf16_training_path_reads_the_packed_weights_and_matches_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The module as training builds it (``.to("cuda", bf16)``): ``stacked_gate_up`` is a view of the weights, the
    ``torch._grouped_mm`` forward and backward concatenate nothing, and output and gradients are those of the
    unfused reference (two GEMMs, torch SwiGLU) within bf16 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    e, f, h = 8, 256, 512
    sizes = torch.tensor([300, 0, 17, 700, 5, 2, 100, 60], device="cuda")
    rows = seeded_randn(1200, h, seed=1).to("cuda", torch.bfloat16)
    grad = seeded_randn(1200, h, seed=2).to("cuda", torch.bfloat16)

    def run(fused: bool) -> list[torch.Tensor]:
        experts = GroupedSwiGLU(e, h, f)
        gen = seeded_generator(0)
        with torch.no_grad():
            for p in experts.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        experts = experts.to("cuda", torch.bfloat16)
        stacked = stacked_gate_up(experts.gate, experts.up)
        assert stacked is not None and stacked.data_ptr() == experts.gate.data_ptr()
        x = rows.clone().requires_grad_()
        cats = _CountCats(monkeypatch, (e, f, h))
        out = (experts if fused else experts.forward_reference)(x, sizes)
        out.backward(grad)
        monkeypatch.setattr(torch, "cat", cats.real)
        assert cats.calls == 0
        assert x.grad is not None
        return [out[:1184], x.grad[:1184], *(p.grad for p in experts.parameters())]  # type: ignore[list-item]

    for got, ref in zip(run(True), run(False), strict=True):
        assert_rel_close(got.float(), ref.float(), 1e-2)
