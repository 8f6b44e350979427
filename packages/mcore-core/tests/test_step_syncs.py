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
