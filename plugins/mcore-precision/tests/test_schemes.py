"""The quantised linear under each recipe's scheme: forward and both backward GEMMs bit-exact against a
reference of the same format built from the formats' functions (ragged shapes: edge blocks padded), what the
finer scales buy, the grouped expert GEMM against a per-expert reference, a short training run per recipe
whose loss falls, and the native GEMMs against the emulation (``gpu``)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from mcore.errors import ConfigError
from mcore.precision.grouped import grouped_linear
from mcore_precision.formats import (
    E4M3,
    E5M2,
    FP8Format,
    blockwise_scales,
    dequantize,
    expand_block_scales,
    quantize,
    rowwise_scales,
    tensorwise_scale,
)
from mcore_precision.fp8 import FP8Blockwise, FP8Current, FP8Rowwise
from mcore_precision.fp8_linear import FP8Linear, native_scaled_mm_available
from mcore_precision.microscaling import MXFP8, NVFP4
from mcore_precision.mx import mx_quantize
from mcore_precision.nvfp4 import nvfp4_quantize, random_hadamard, rht
from mcore_precision.scaling import BlockwiseScheme, MXScheme, NVFP4Scheme, RowwiseScheme, Scheme
from mcore_testing.reference import TinyConfig, TinyTransformer, tiny_batches

Fake = Callable[[torch.Tensor], torch.Tensor]  # quantise then dequantise, exactly


def _rowwise(fmt: FP8Format) -> Fake:
    def fake(t: torch.Tensor) -> torch.Tensor:
        s = rowwise_scales(t, fmt)
        return dequantize(quantize(t, s, fmt), s)

    return fake


def _blocks(fmt: FP8Format, block: tuple[int, int]) -> Fake:
    def fake(t: torch.Tensor) -> torch.Tensor:
        s = expand_block_scales(blockwise_scales(t, fmt, block), (t.shape[0], t.shape[1]), block)
        return dequantize(quantize(t, s, fmt), s)

    return fake


def _mx(fmt: FP8Format, rounding: str) -> Fake:
    return lambda t: mx_quantize(t, fmt, rounding).dequantize()  # type: ignore[arg-type]


def _run(scheme: Scheme, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight = nn.Parameter(w.clone())
    fp8 = FP8Linear.from_scheme(linear, scheme)
    xr = x.clone().requires_grad_()
    out = fp8(xr)
    out.backward(g)
    return out.detach(), xr.grad, fp8.weight.grad  # type: ignore[return-value]


def _operands(n: int = 136, k: int = 264, f: int = 136) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, k, generator=gen) * torch.logspace(-2, 2, k)  # columns of very different magnitude
    w = torch.randn(f, k, generator=gen) * 0.05
    g = torch.randn(n, f, generator=gen) * 1e-4
    return x, w, g


# (scheme, fake of x for fprop, w fprop, g dgrad, w dgrad (given w.T), g wgrad (given g.T), x wgrad (given x.T))
CASES = {
    "rowwise": (
        lambda: RowwiseScheme(E4M3, native=False),
        (_rowwise(E4M3), _rowwise(E4M3), _rowwise(E4M3), _rowwise(E4M3), _rowwise(E4M3), _rowwise(E4M3)),
    ),
    "rowwise-e5m2": (
        lambda: RowwiseScheme(E5M2, native=False),
        (_rowwise(E4M3), _rowwise(E4M3), _rowwise(E5M2), _rowwise(E4M3), _rowwise(E5M2), _rowwise(E4M3)),
    ),
    "blockwise": (
        lambda: BlockwiseScheme(E4M3, native=False),
        (
            _blocks(E4M3, (1, 128)),
            _blocks(E4M3, (128, 128)),
            _blocks(E4M3, (1, 128)),
            _blocks(E4M3, (128, 128)),
            _blocks(E4M3, (1, 128)),
            _blocks(E4M3, (1, 128)),
        ),
    ),
    "mxfp8": (lambda: MXScheme(E4M3, "up"), (_mx(E4M3, "up"),) * 6),
    "mxfp8-floor-e5m2": (
        lambda: MXScheme(E5M2, "floor"),
        tuple(_mx(E5M2 if i in (2, 4) else E4M3, "floor") for i in range(6)),  # the gradient's fakes: E5M2
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gemms_equal_the_same_format_reference(case: str) -> None:
    make, (fx, fw, fg, fwt, fgt, fxt) = CASES[case]
    x, w, g = _operands()
    out, dx, dw = _run(make(), x, w, g)
    assert torch.equal(out, fx(x) @ fw(w).T)  # fprop
    assert torch.equal(dx, fg(g) @ fwt(w.t().contiguous()).T)  # dgrad: g (N, F) @ w (F, K)
    assert torch.equal(dw, fgt(g.t().contiguous()) @ fxt(x.t().contiguous()).T)  # wgrad: g.T (F, N) @ x (N, K)
    x_fp32 = x.clone().requires_grad_()
    ref_out = x_fp32 @ w.T
    ref_out.backward(g)
    for got, want in ((out, ref_out.detach()), (dx, x_fp32.grad), (dw, g.T @ x)):
        assert float((got - want).norm() / want.norm()) < 0.1  # and close to fp32: the format's rounding only


def test_nvfp4_gemms_equal_the_same_format_reference() -> None:
    x, w, g = _operands(64, 96, 48)
    q_w = nvfp4_quantize(w, (16, 16)).dequantize()
    out, dx, dw = _run(NVFP4Scheme(seed=5), x, w, g)
    scheme = NVFP4Scheme(seed=5)  # the same signs and draws
    draws = torch.Generator().manual_seed(6)  # the scheme's stream: seed + 1
    assert torch.equal(scheme.signs, NVFP4Scheme(seed=5).signs)
    q = random_hadamard(scheme.signs)
    assert torch.equal(out, nvfp4_quantize(x).dequantize() @ q_w.T)
    g_dgrad = nvfp4_quantize(g, generator=draws).dequantize()  # drawn first: dgrad, then wgrad
    assert torch.equal(dx, g_dgrad @ q_w)  # the 16x16 weight blocks serve dgrad transposed
    g_wgrad = nvfp4_quantize(rht(g.t(), q), generator=draws).dequantize()  # (F, N) after the RHT
    assert torch.equal(dw, g_wgrad @ nvfp4_quantize(rht(x.t(), q)).dequantize().T)
    assert float((dw - g.T @ x).norm() / (g.T @ x).norm()) < 0.3  # the transforms cancel in the product


def test_finer_scales_keep_rows_of_small_magnitude_that_a_tensor_scale_flushes() -> None:
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1)) * torch.logspace(-6, 2, 8)[:, None]
    s = tensorwise_scale(x, E4M3)
    per_tensor = dequantize(quantize(x, s, E4M3), s)
    for fake in (_rowwise(E4M3), _blocks(E4M3, (1, 128)), _mx(E4M3, "up")):
        err = (fake(x) - x).abs().amax(dim=1) / x.abs().amax(dim=1)  # per row, relative to its own amax
        assert err.max() < 0.07
    assert ((per_tensor[0] - x[0]).abs().amax() / x[0].abs().amax()) > 0.5  # the smallest row lost


@pytest.mark.parametrize("recipe", [FP8Current, FP8Blockwise, MXFP8], ids=["fp8-current", "fp8-blockwise", "mxfp8"])
def test_grouped_linear_equals_a_linear_per_expert(recipe: type) -> None:
    r = recipe(recipe.Config(params="fp32"))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 144, generator=gen).requires_grad_()
    weight = (torch.randn(3, 136, 144, generator=gen) * 0.1).requires_grad_()
    sizes = torch.tensor([15, 0, 21])  # 4 padding rows after the groups
    ctx = type("Ctx", (), {"precision": r})()
    out = grouped_linear(x, weight, sizes, ctx=ctx)  # as the MoE block calls it
    grad = torch.randn(40, 136, generator=gen)
    out.backward(grad)
    assert torch.equal(out[36:], torch.zeros(4, 136)) and torch.equal(x.grad[36:], torch.zeros(4, 144))
    start = 0
    for e, n in enumerate(sizes.tolist()):
        linear = nn.Linear(144, 136, bias=False)
        linear.weight = nn.Parameter(weight.detach()[e].clone())
        fp8 = FP8Linear.from_scheme(linear, r._scheme(""))
        rows = x.detach()[start : start + n].clone().requires_grad_()
        ref = fp8(rows)
        ref.backward(grad[start : start + n])
        assert torch.equal(out[start : start + n], ref.detach())
        assert torch.equal(x.grad[start : start + n], rows.grad)
        assert torch.equal(weight.grad[e], fp8.weight.grad if n else torch.zeros(136, 144))
        start += n


def _train(recipe, steps: int = 25) -> list[float]:
    model = recipe.prepare(TinyTransformer(TinyConfig(num_layers=1), seed=0))
    assert any(isinstance(m, FP8Linear) for m in model.modules())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for tokens, labels in tiny_batches(steps, seed=11):
        opt.zero_grad(set_to_none=True)
        loss = model(tokens, labels=labels)
        recipe.scale_loss(loss).backward()
        assert bool(recipe.unscale_grads(model))
        opt.step()
        recipe.update()
        recipe.after_step(model)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "recipe",
    [FP8Rowwise(), FP8Blockwise(), MXFP8(), NVFP4()],
    ids=["fp8-rowwise", "fp8-blockwise", "mxfp8", "nvfp4"],
)
def test_tiny_transformer_trains_and_its_loss_falls(recipe) -> None:
    losses = _train(recipe)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


def test_nvfp4_training_is_repeatable_under_its_seed() -> None:
    a = _train(NVFP4(NVFP4.Config(seed=3)), steps=3)
    assert _train(NVFP4(NVFP4.Config(seed=3)), steps=3) == a
    assert _train(NVFP4(NVFP4.Config(seed=4)), steps=3) != a


@pytest.mark.parametrize("recipe", [FP8Rowwise, FP8Blockwise, MXFP8, NVFP4])
def test_prepare_and_a_shape_only_forward_work_on_the_meta_device(recipe: type) -> None:
    with torch.device("meta"):
        model = TinyTransformer(TinyConfig(num_layers=1), seed=0)
    prepared = recipe().prepare(model)
    assert isinstance(prepared.layers[0].mlp.down, FP8Linear) and prepared.layers[0].mlp.down.weight.is_meta
    tokens = torch.zeros(2, 8, dtype=torch.long, device="meta")
    loss = prepared(tokens, labels=tokens)  # memory planning runs the model on storage-less tensors
    loss.backward()
    assert loss.is_meta and prepared.layers[0].mlp.down.weight.grad.is_meta


@pytest.mark.parametrize(
    ("recipe", "kwargs"),
    [
        (MXFP8, {"scale_rounding": "nearest"}),
        (MXFP8, {"grad_format": "e3m4"}),
        (NVFP4, {"hadamard": "yes"}),
        (NVFP4, {"seed": -1}),
        (FP8Blockwise, {"gemm": "native"}),
    ],
)
def test_bad_config_is_a_one_line_config_error(recipe: type, kwargs: dict) -> None:
    with pytest.raises(ConfigError) as err:
        recipe.Config(**kwargs)
    assert "\n" not in str(err.value) and "allowed" in str(err.value) and next(iter(kwargs)) in str(err.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "scheme",
    # blockwise: torch 2.11 refused the 128x128 weight scales as (P/128, K/128) ('scale_b must have shape 4 x 2,
    # got [2, 4]', H100, 2026-12-05); native._blockwise now hands them over transposed
    ["rowwise", "blockwise"],
)
def test_native_gemms_match_the_emulation(scheme: str) -> None:
    device = torch.device("cuda")
    if not native_scaled_mm_available(device):
        pytest.skip("this card has no FP8 tensor cores (capability < 8.9)")
    from mcore_precision import native

    make = {"rowwise": RowwiseScheme, "blockwise": BlockwiseScheme}[scheme]
    torch.manual_seed(0)
    linear = nn.Linear(512, 256, bias=False, device=device, dtype=torch.bfloat16)
    x = torch.randn(384, 512, device=device, dtype=torch.bfloat16)
    results, calls, modules = [], [], []
    for on in (True, False):
        fp8 = FP8Linear.from_scheme(copy.deepcopy(linear), make(E4M3, native=on))
        modules.append(fp8)
        xr = x.clone().requires_grad_()
        out = fp8(xr)
        out.backward(torch.ones_like(out) * 0.01)
        results.append((out.detach().float(), xr.grad.float(), fp8.weight.grad.float()))
    qa = make(E4M3).quantize(x, "input", "fprop")
    qb = make(E4M3).quantize(linear.weight.detach(), "weight", "fprop")
    calls.append(native.native_fp8_mm(qa, qb, torch.bfloat16))  # type: ignore[arg-type]
    checked = modules[0].scheme.checked.trusted  # type: ignore[attr-defined]
    assert all(checked.values()), checked  # every native GEMM's first call agreed with the emulation
    if scheme == "rowwise":
        assert calls[0] is not None and checked  # the rowwise kernel ran on this card (and was checked)
    print(f"{scheme} kernel checks: {checked}")
    print(f"{scheme}: native kernel {'ran' if calls[0] is not None else 'not available: emulated'}")
    for a, b in zip(*results):
        assert float((a - b).norm() / b.norm()) < 1e-2  # same operands; accumulation and output rounding differ
