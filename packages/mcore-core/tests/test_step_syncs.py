"""The step's host syncs: the micro-batches' loss share and the gradients' finiteness stay on the device
(one ``float()`` per micro-batch stopped the host until the GPU caught up; the GPU then idled while the next
micro-batch was launched). The run loop reads them in its one all-reduce of the step, and hands a recipe whose
``update`` takes it the finiteness agreed over the ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from test_train_loop import make_config, make_corpus

from mcore.plugins import hookimpl
from mcore.precision.basic import FP32
from mcore.train import run
from mcore.train.microbatch import classify, forward_backward, forward_only
from mcore_testing.hosts import isolated_host
from mcore_testing.reference import TinyTransformer, tiny_batches


def _micro(device: str) -> list:
    return [(t.to(device), y.to(device), None) for t, y in tiny_batches(3, seed=2)]


def _run(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model = TinyTransformer(seed=0).to(device)
    steps = classify([], [])
    micro = _micro(device)
    share = forward_backward(model, micro, steps, FP32())
    finite = FP32().unscale_grads(model)
    with torch.no_grad():
        evaluated = forward_only(model, micro, steps, FP32())
    return share, finite, evaluated


def test_loss_share_and_finiteness_are_device_tensors() -> None:
    share, finite, evaluated = _run("cpu")
    model = TinyTransformer(seed=0)
    want = sum(model(t, labels=y).detach().double() for t, y, _ in _micro("cpu")) / 3
    assert share.dtype == torch.float64 and share.shape == () and torch.allclose(share, want)
    assert finite.dtype == torch.bool and bool(finite) and torch.allclose(evaluated, want)


@pytest.mark.gpu
def test_forward_backward_and_finiteness_make_no_host_sync() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _run("cuda")  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        share, finite, _ = _run("cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert share.is_cuda and finite.is_cuda and bool(finite)


class AgreedUpdate(FP32):
    """fp32 whose ``update`` takes the step's agreed finiteness (what a loss-scaling recipe needs)."""

    name = "agreed-update"
    seen: ClassVar[list[bool]] = []

    def update(self, finite: bool | None = None) -> None:
        AgreedUpdate.seen.append(finite)  # type: ignore[arg-type]


class AgreedUpdatePlugin:
    MCORE_PLUGIN_API = 1

    @hookimpl
    def mcore_register(self, registry: Any) -> None:
        registry.add("precision", "agreed-update", f"{__name__}:AgreedUpdate", summary="tests: update(finite=)")


def test_the_loop_hands_update_the_agreed_finiteness(tmp_path: Path) -> None:
    host = isolated_host("mcore_testing.plugin", AgreedUpdatePlugin())
    AgreedUpdate.seen.clear()
    update = {"precision": {"recipe": "agreed-update"}, "train": {"steps": 2}}
    run(make_config(host, tmp_path / "run", make_corpus(tmp_path), update), host)
    assert AgreedUpdate.seen == [True, True]  # one call per step, with the all-reduced answer


def _old_clip(grads: list[torch.Tensor], max_norm: float, total: float) -> list[torch.Tensor]:
    """Clipping as the loop did it before it stayed on the device: the factor read on the host."""
    out = [g.clone() for g in grads]
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(out, coef)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("max_norm", [0.37, 1.0, 1e6])
def test_clipping_from_the_norm_tensor_equals_the_host_factor(dtype: torch.dtype, max_norm: float) -> None:
    from mcore.train.grads import clip_grads_, global_grad_norm

    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dtype)) for n in (1000, 37, 1)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(dtype) * 3
    params.append(torch.nn.Parameter(torch.zeros(4)))  # no gradient: skipped
    norm = global_grad_norm(params)
    want = _old_clip([p.grad for p in params[:3]], max_norm, float(norm))  # type: ignore[misc]
    clip_grads_(params, max_norm, norm)
    for p, w in zip(params[:3], want, strict=True):
        assert p.grad is not None and torch.equal(p.grad, w)  # the same bits, clipped or not


@pytest.mark.gpu
def test_clipping_fp32_gradients_makes_no_host_sync() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mcore.train.grads import clip_grads_, global_grad_norm

    params = [torch.nn.Parameter(torch.zeros(n, device="cuda")) for n in (4096, 33)]
    for p in params:
        p.grad = torch.randn_like(p) * 5
    clip_grads_(params, 1.0, global_grad_norm(params))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        clip_grads_(params, 1.0, global_grad_norm(params))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    total = torch.cat([p.grad.flatten() for p in params if p.grad is not None]).norm()
    assert abs(float(total) - 1.0) < 1e-4
