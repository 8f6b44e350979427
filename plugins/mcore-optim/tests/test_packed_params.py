"""Strided parameters (two views of one packed buffer, as the MoE experts keep ``gate`` and ``up``): every optimizer
path updates them to exactly what it gives their contiguous copies, and leaves them packed; ``distributed-adamw``,
whose flat ranges need contiguous parameters, gives them storage of their own instead of refusing them.

Why: ``mcore-moe``'s ``GroupedSwiGLU`` lays ``gate`` and ``up`` ``(E, F, H)`` out as ``buffer[:, 0]`` and
``buffer[:, 1]`` of one ``(E, 2, F, H)`` buffer (so its GEMM reads ``[gate | up]`` without a copy); torch's fused
AdamW kernel and ours (Triton) walk each tensor in flat order. Here a tiny transformer's same-shaped matrices are
packed the same way (no plugin imported).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers import SINGLE, AveragingLayout, batches, tiny_model, train
from torch import nn

from mcore.mesh import ParallelMesh
from mcore_optim.adamw import AdamWFactory
from mcore_optim.distributed_adamw import DistributedAdamW, DistributedAdamWFactory
from mcore_optim.muon import MuonFactory
from mcore_testing import distributed
from mcore_testing.numerics import assert_rel_close

#: same-shaped pairs packed into one buffer, first then second per row (``buffer[:, 0]``, ``buffer[:, 1]``)
PAIRS = (("embed.weight", "lm_head.weight"), ("layers.0.attn.proj.weight", "layers.1.attn.proj.weight"))


def pack_pairs(model: nn.Module) -> nn.Module:
    """``model`` with each of ``PAIRS`` laid out in one ``(R, 2, C)`` buffer (same objects and values)."""
    params = dict(model.named_parameters())
    for a, b in PAIRS:
        buffer = torch.stack([params[a].detach(), params[b].detach()], dim=1)  # (R, 2, C)
        params[a].data, params[b].data = buffer[:, 0], buffer[:, 1]
    assert_packed(model)
    return model


def assert_packed(model: nn.Module) -> None:
    params = dict(model.named_parameters())
    for a, b in PAIRS:
        first, second = params[a], params[b]
        assert not first.is_contiguous() and first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
        assert second.storage_offset() == first.storage_offset() + first.shape[1], (a, b)


def _same(model: nn.Module, ref: nn.Module, tol: float | None = None) -> None:
    """Equal parameters (``tol``: within that relative error instead)."""
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        if tol is None:
            assert torch.equal(p, q), name
        else:
            assert_rel_close(p, q, tol=tol)


def _packed_trains_like_plain(make: Any, factory: Any, tol: float | None = None) -> None:
    """Three steps of ``factory``'s optimizer on a packed model and on the same model unpacked: equal (or within
    ``tol``), still packed."""
    packed, plain = pack_pairs(make()), make()
    data = batches(3)
    for model in (packed, plain):
        train(model, factory.build(model, mesh=SINGLE, layouts=[]), data)
    _same(packed, plain, tol)
    assert_packed(packed)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_updates_packed_parameters_as_contiguous_ones(impl: str, dtype: torch.dtype) -> None:
    """fp32 parameters (the fused kernel on contiguous copies, copied back) and bf16 ones behind fp32 masters."""
    _packed_trains_like_plain(
        lambda: tiny_model().to(dtype), AdamWFactory(AdamWFactory.Config(lr=3e-3, weight_decay=0.1, impl=impl))
    )


def test_fused_adamw_updates_a_transposed_parameter_like_foreach() -> None:
    """A dense but non-contiguous parameter (a transpose) whose gradient and moments share its strides: the fused
    path (contiguous copies of all four, parameter and moments copied back) equals the foreach path."""
    from mcore_optim.adamw_math import adamw_step

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=gen)
    grads = [torch.randn(3, 5, generator=gen).t() for _ in range(3)]  # (5, 3), strides (1, 5)
    results = []
    for fused in (True, False):
        p = base.clone().t()  # (5, 3), strides (1, 5): dense, not contiguous
        m, v, t = torch.zeros_like(p), torch.zeros_like(p), torch.zeros(())
        for g in grads:
            adamw_step([p], [g], [m], [v], [t], fused=fused, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
        results.append((p, m, v))
    for fused_t, foreach_t in zip(*results, strict=True):
        assert fused_t.stride() == (1, 5)
        assert_rel_close(fused_t, foreach_t, tol=1e-6)


def test_muon_updates_packed_parameters_as_contiguous_ones() -> None:
    """fp64 to within fp64 rounding: the model's own forward reads the packed (strided) ``embed`` / ``lm_head`` and
    the BLAS may take another kernel for a strided fp64 matrix, so the gradients (not the optimizer) can differ in
    their last bits on some CPUs (1.3e-15 after 3 steps on the 2026-12-07 machine; exactly equal on others)."""
    config = MuonFactory.Config(lr=0.01, weight_decay=0.1, ns_dtype="float64", adamw_impl="foreach")
    _packed_trains_like_plain(lambda: tiny_model().double(), MuonFactory(config), tol=1e-12)


def _distributed_adamw_unpacks() -> None:
    torch.set_num_threads(1)
    size = dist.get_world_size()
    packed, ref = pack_pairs(tiny_model()), tiny_model()
    layout = AveragingLayout()
    layout.apply(packed)
    config: dict[str, Any] = {"lr": 3e-3, "weight_decay": 0.1, "impl": "foreach"}
    opt = DistributedAdamWFactory(DistributedAdamWFactory.Config(**config)).build(
        packed, mesh=ParallelMesh(("dp",), (size,), "cpu"), layouts=[layout]
    )
    assert isinstance(opt, DistributedAdamW)
    assert all(p.is_contiguous() for p in packed.parameters())  # storage of their own: the flat ranges' views
    data = batches(3)
    train(packed, opt, data, layout=layout, rank=dist.get_rank(), size=size)
    train(ref, AdamWFactory(AdamWFactory.Config(**config)).build(ref, mesh=SINGLE, layouts=[]), data)
    for (name, p), q in zip(packed.named_parameters(), ref.parameters(), strict=True):
        assert_rel_close(p, q, tol=1e-6, name=name)  # the gradients' reduction order differs: not bit for bit


@distributed(world_size=2, timeout=240)
def test_distributed_adamw_gives_packed_parameters_storage_of_their_own() -> None:
    _distributed_adamw_unpacks()


@pytest.mark.gpu
def test_triton_adamw_writes_packed_bf16_parameters() -> None:
    """The Triton kernel updates the fp32 masters and writes the packed (chunked) bf16 parameters where they lie."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    packed, plain = pack_pairs(tiny_model().cuda().bfloat16()), tiny_model().cuda().bfloat16()
    config = AdamWFactory.Config(lr=3e-3, impl="triton")
    opts = [AdamWFactory(config).build(model, mesh=SINGLE, layouts=[]) for model in (packed, plain)]
    assert all(opt.triton for opt in opts)
    for x, y in batches(3):
        for model, opt in zip((packed, plain), opts):
            opt.zero_grad(set_to_none=True)
            model(x.cuda(), labels=y.cuda()).backward()
            opt.step()
    _same(packed, plain)
    assert_packed(packed)
    for name, p in packed.named_parameters():
        assert torch.equal(p, opts[0].state[name]["master"].to(torch.bfloat16)), name
