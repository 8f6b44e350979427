"""The kernels' CPU side: references, the fused linear cross-entropy, and dispatch choices."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mcore_models.kernels.linear_ce import ce_chunk, linear_cross_entropy_sum, linear_cross_entropy_unfused
from mcore_models.kernels.rmsnorm import rms_norm, rms_norm_reference
from mcore_models.kernels.rope import apply_rope, apply_rope_reference
from mcore_models.kernels.swiglu import swiglu, swiglu_reference
from mcore_testing.numerics import assert_rel_close, seeded_randn


@pytest.mark.parametrize(("chunk", "scale"), [(5, 1.0), (64, 0.5), (3, 2.0)])
def test_linear_cross_entropy_equals_unfused(chunk: int, scale: float) -> None:
    hidden = seeded_randn(23, 16, seed=0).requires_grad_()
    weight = seeded_randn(40, 16, seed=1).requires_grad_()
    labels = torch.randint(0, 40, (23,), generator=torch.Generator().manual_seed(2))
    labels[[0, 7, 22]] = -100
    loss = linear_cross_entropy_sum(hidden, weight, labels, chunk_size=chunk, scale=scale)
    (loss * 0.7).backward()
    ref_h, ref_w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = linear_cross_entropy_unfused(ref_h, ref_w, labels, scale=scale)
    (ref * 0.7).backward()
    assert_rel_close(loss, ref)
    assert_rel_close(hidden.grad, ref_h.grad)
    assert_rel_close(weight.grad, ref_w.grad)


@pytest.mark.parametrize(("chunk", "vocab_chunk", "scale"), [(5, 7, 1.0), (64, 16, 0.5), (3, 39, 2.0)])
def test_vocab_blocked_linear_cross_entropy_equals_unfused(chunk: int, vocab_chunk: int, scale: float) -> None:
    hidden = seeded_randn(23, 16, seed=0).requires_grad_()
    weight = seeded_randn(40, 16, seed=1).requires_grad_()
    labels = torch.randint(0, 40, (23,), generator=torch.Generator().manual_seed(2))
    labels[[0, 7, 22]] = -100
    labels[1], labels[2] = 39, 0  # first and last vocabulary block
    loss = linear_cross_entropy_sum(hidden, weight, labels, chunk_size=chunk, vocab_chunk_size=vocab_chunk, scale=scale)
    (loss * 0.7).backward()
    ref_h, ref_w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = linear_cross_entropy_unfused(ref_h, ref_w, labels, scale=scale)
    (ref * 0.7).backward()
    assert_rel_close(loss, ref)
    assert_rel_close(hidden.grad, ref_h.grad)
    assert_rel_close(weight.grad, ref_w.grad)


def test_linear_cross_entropy_all_ignored_is_zero() -> None:
    hidden = seeded_randn(4, 8, seed=0).requires_grad_()
    weight = seeded_randn(10, 8, seed=1)
    loss = linear_cross_entropy_sum(hidden, weight, torch.full((4,), -100), chunk_size=2)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


def test_ce_chunk_gradient_is_softmax_minus_onehot() -> None:
    logits = seeded_randn(3, 7, seed=4)
    labels = torch.tensor([1, -100, 6])
    z = logits.clone().requires_grad_()
    F.cross_entropy(z, labels, ignore_index=-100, reduction="sum").backward()
    loss = ce_chunk(logits, labels, 1.0)
    assert_rel_close(loss.sum(), F.cross_entropy(z.detach(), labels, ignore_index=-100, reduction="sum"))
    assert_rel_close(logits, z.grad)


def test_cpu_dispatch_uses_references_and_never_imports_triton() -> None:
    assert rms_norm.implementation("cpu") is rms_norm_reference
    assert apply_rope.implementation("cpu") is apply_rope_reference
    assert swiglu.implementation("cpu") is swiglu_reference
    # a fresh process (another test may have imported a kernel module here): a CPU forward of a model imports none
    # of our Triton modules (torch itself imports ``triton`` where it is installed, so that name proves nothing)
    script = (
        "import sys, torch\n"
        "from mcore_models.gpt import GPT\n"
        "from mcore_models.presets import preset_config\n"
        "model = GPT.build(preset_config('tiny'), seed=0, device=torch.device('cpu'))\n"
        "model(torch.zeros(1, 8, dtype=torch.long)).sum()\n"
        "print(sorted(m for m in sys.modules if m.startswith('mcore_models.kernels') and m.endswith('_triton')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout


def test_compiled_regions_call_the_reference_not_the_kernel() -> None:
    """Under torch.compile a dispatched function traces its reference: dynamo cannot trace a raw Triton
    launch in an autograd.Function (``train.compile = "blocks"`` failed on the H200 in our RoPE)."""
    from mcore_models.kernels.dispatch import Dispatched

    calls: list[str] = []

    def reference(x: torch.Tensor) -> torch.Tensor:
        calls.append("reference")
        return x * 2

    def kernel(x: torch.Tensor) -> torch.Tensor:  # stands in for a Triton launch dynamo cannot trace
        calls.append("kernel")
        return x * 2

    double = Dispatched("double", reference, "unused:unused")
    double._by_device["cpu"] = kernel  # as if the device had a kernel
    x = seeded_randn(4, seed=1)
    assert_rel_close(double(x), x * 2)
    assert calls == ["kernel"]  # eager: the device's kernel
    calls.clear()
    compiled = torch.compile(lambda t: double(t) + 1, backend="eager", fullgraph=True)
    assert_rel_close(compiled(x), x * 2 + 1)
    assert calls == ["reference"], calls  # traced once, through the reference
