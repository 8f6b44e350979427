"""Recipe ``torchao-float8``: torchao's float8 training on the linears ``fp8-current`` quantises.

torchao is in this package's ``test`` extra, so these run in CI; the one test that needs it absent hides it.
The linear-level check is tight: torchao's per-tensor float8 linear and ours compute the same E4M3/E5M2 GEMMs, so
outputs and gradients agree to fp32 rounding (measured 2e-7; the weight gradient bit for bit).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import pytest
import torch
from torch import nn

from mcore.errors import ConfigError
from mcore_precision.formats import E4M3, E5M2
from mcore_precision.fp8 import CurrentScaler, FP8Current
from mcore_precision.fp8_linear import FP8Linear
from mcore_precision.torchao_float8 import TorchaoFloat8
from mcore_testing.conformance import PrecisionConformance
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference import TinyConfig, TinyTransformer, tiny_batches

pytest.importorskip("torchao.float8", reason="torchao is in the test extra; an install without it cannot run these")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torchao warns about its CUDA-only extensions on CPU


def _float8_linear_class() -> type:
    from torchao.float8.float8_linear import Float8Linear

    return Float8Linear


def test_swaps_exactly_the_linears_fp8_current_swaps_and_keeps_parameter_names() -> None:
    model = TinyTransformer(TinyConfig(num_layers=3), seed=0)
    names = [n for n, _ in model.named_parameters()]
    recipe = TorchaoFloat8(TorchaoFloat8.Config(first_layers_bf16=1))
    prepared = recipe.prepare(model)
    assert [n for n, _ in prepared.named_parameters()] == names
    converted = {n for n, m in prepared.named_modules() if isinstance(m, _float8_linear_class())}
    ours = FP8Current(FP8Current.Config(first_layers_bf16=1)).prepare(TinyTransformer(TinyConfig(num_layers=3), seed=0))
    assert converted == {n for n, m in ours.named_modules() if isinstance(m, FP8Linear)} == set(recipe.converted)
    assert type(prepared.lm_head) is nn.Linear and type(prepared.layers[0].attn.qkv) is nn.Linear
    assert all(p.dtype == torch.bfloat16 for p in prepared.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensorwise_linear_equals_fp8_current_linear(dtype: torch.dtype) -> None:
    """Same formats, same per-tensor current scales: torchao's linear and ours agree to the GEMMs' rounding."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=False).to(dtype)
    theirs = TorchaoFloat8(TorchaoFloat8.Config(params="fp32" if dtype == torch.float32 else "bf16"))
    wrapped = theirs.prepare(_Holder(copy.deepcopy(linear)))
    assert theirs.converted == ["linear"]
    ours = FP8Linear.from_linear(
        copy.deepcopy(linear), input=CurrentScaler(E4M3, 0), weight=CurrentScaler(E4M3, 0), grad=CurrentScaler(E5M2, 0)
    )
    x = torch.randn(64, 256, dtype=dtype)  # (N, K)
    grad = torch.randn(64, 128, dtype=dtype)  # (N, F)
    results = []
    for module, weight in ((wrapped, wrapped.linear.weight), (ours, ours.weight)):
        leaf = x.clone().requires_grad_()
        out = module(leaf)  # (N, F)
        out.backward(grad)
        results.append((out.detach().float(), leaf.grad.float(), weight.grad.float()))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, got, want in zip(("output", "input grad", "weight grad"), results[0], results[1], strict=True):
        assert_rel_close(got, want, tol=tol, name=name)


class _Holder(nn.Module):
    """One matrix linear, as a model holds it (``fp8_linear_names`` reads roles from the owning module)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def param_specs(self) -> dict[str, Any]:
        from mcore.params import ParamSpec

        return {"linear.weight": ParamSpec("matrix")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_tiny_model_loss_equals_fp8_current_before_any_update() -> None:
    """The whole forward of a tiny model in fp32 parameters: the same loss as ``fp8-current`` (both quantise the
    same tensors the same way; only the GEMMs' accumulation order differs)."""
    tokens, labels = tiny_batches(1, seed=0)[0]
    losses = []
    for recipe in (TorchaoFloat8(TorchaoFloat8.Config(params="fp32")), FP8Current(FP8Current.Config(params="fp32"))):
        model = recipe.prepare(TinyTransformer(TinyConfig(num_layers=2), seed=0))
        losses.append(model(tokens, labels=labels).detach())
    assert torch.isfinite(losses[0]) and float((losses[0] - losses[1]).abs() / losses[1].abs()) < 1e-5


class TestTorchaoFloat8Conformance(PrecisionConformance):
    def make_recipe(self) -> Any:
        return TorchaoFloat8()

    forward_tolerance = 2e-2  # two operands rounded to E4M3 (as TestFP8Current)


def test_bad_scaling_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"precision.scaling = 'bogus'; allowed: 'tensorwise', 'rowwise'") as info:
        TorchaoFloat8.Config(scaling="bogus")  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_without_torchao_the_recipe_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now raises ImportError
    with pytest.raises(ConfigError, match=r"needs torchao .*pip install 'mcore-precision\[torchao\]'") as info:
        TorchaoFloat8()
    assert "\n" not in str(info.value)
