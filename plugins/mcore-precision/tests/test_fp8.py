"""``fp8-current`` and ``fp8-delayed``: which linears are swapped, the FP8 linear's forward and backward
against a reference of the same formats, delayed scaling's history (window, algorithms, checkpoint resumed
bit-exact), training with the harness's tiny transformer, and the refusal of sharded weights."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from mcore.errors import ConfigError
from mcore_precision.formats import E4M3, E5M2, dequantize, quantize, tensorwise_scale
from mcore_precision.fp8 import CurrentScaler, DelayedScaler, FP8Current, FP8Delayed, fp8_linear_names
from mcore_precision.fp8_linear import FP8Linear, native_scaled_mm_available
from mcore_testing.reference import TinyConfig, TinyTransformer, tiny_batches


def test_only_matrix_linears_are_swapped_and_parameters_keep_their_names() -> None:
    model = TinyTransformer(TinyConfig(num_layers=3), seed=0)
    names = [n for n, _ in model.named_parameters()]
    prepared = FP8Current(FP8Current.Config(first_layers_bf16=1)).prepare(model)
    assert [n for n, _ in prepared.named_parameters()] == names
    swapped = {n for n, m in prepared.named_modules() if isinstance(m, FP8Linear)}
    assert swapped == {f"layers.{i}.{m}" for i in (1, 2) for m in ("attn.qkv", "attn.proj", "mlp.gate_up", "mlp.down")}
    assert type(prepared.lm_head) is nn.Linear and type(prepared.layers[0].attn.qkv) is nn.Linear
    assert all(p.dtype == torch.bfloat16 for p in prepared.parameters())
    last = fp8_linear_names(TinyTransformer(TinyConfig(num_layers=3), seed=0), last_layers_bf16=2)
    assert {n.split(".")[1] for n in last} == {"0"}


@pytest.mark.parametrize("recipe", [FP8Current, FP8Delayed])
def test_prepare_and_a_shape_only_forward_work_on_the_meta_device(recipe) -> None:
    with torch.device("meta"):
        model = TinyTransformer(TinyConfig(num_layers=1), seed=0)
    prepared = recipe().prepare(model)
    assert isinstance(prepared.layers[0].mlp.down, FP8Linear)
    assert prepared.layers[0].mlp.down.weight.is_meta
    tokens = torch.zeros(2, 8, dtype=torch.long, device="meta")
    loss = prepared(tokens, labels=tokens)  # memory planning runs the model on storage-less tensors
    assert loss.is_meta
    loss.backward()
    assert prepared.layers[0].mlp.down.weight.grad.is_meta


def test_router_and_expert_roles_stay_high_precision() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = nn.Linear(16, 4, bias=False)
            self.up = nn.Linear(16, 16)

        def param_specs(self) -> dict:
            from mcore.params import ParamSpec

            return {"router.weight": ParamSpec("router")}

    assert fp8_linear_names(Block()) == ["up"]


def _linear(bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(48, 32, bias=bias)


@pytest.mark.parametrize("grad_fmt", [E5M2, E4M3], ids=["e5m2", "e4m3"])
def test_forward_and_backward_equal_the_exact_format_reference(grad_fmt) -> None:
    linear = _linear(bias=True)
    fp8 = FP8Linear.from_linear(
        copy.deepcopy(linear),
        input=CurrentScaler(E4M3, 0),
        weight=CurrentScaler(E4M3, 0),
        grad=CurrentScaler(grad_fmt, 0),
    )
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 5, 48, generator=g) * 3).requires_grad_()
    grad = torch.randn(2, 5, 32, generator=g) * 1e-3
    out = fp8(x)
    out.backward(grad)

    x2, w, g2 = x.detach().reshape(10, 48), linear.weight.detach(), grad.reshape(10, 32)
    sx, sw, sg = tensorwise_scale(x2, E4M3), tensorwise_scale(w, E4M3), tensorwise_scale(g2, grad_fmt)
    xq, wq, gq = (
        dequantize(quantize(x2, sx, E4M3), sx),
        dequantize(quantize(w, sw, E4M3), sw),
        dequantize(quantize(g2, sg, grad_fmt), sg),
    )
    assert torch.equal(out.detach(), (xq @ wq.T + linear.bias.detach()).view(2, 5, 32))
    assert torch.equal(x.grad, (gq @ wq).view(2, 5, 48))
    assert torch.equal(fp8.weight.grad, gq.T @ xq)
    assert torch.equal(fp8.bias.grad, g2.sum(0))
    # and close to the fp32 linear: E4M3/E5M2 rounding only
    ref_x = x.detach().clone().requires_grad_()
    linear(ref_x).backward(grad)
    for got, want, tol in (
        (out, linear(ref_x), 0.08),
        (x.grad, ref_x.grad, 0.15),
        (fp8.weight.grad, linear.weight.grad, 0.15),
    ):
        assert float((got.detach() - want.detach()).norm() / want.detach().norm()) < tol


def test_saturation_keeps_non_finite_inputs_visible() -> None:
    fp8 = FP8Linear.from_linear(
        _linear(bias=False), input=CurrentScaler(E4M3, 0), weight=CurrentScaler(E4M3, 0), grad=CurrentScaler(E5M2, 0)
    )
    x = torch.ones(3, 48)
    x[1, 0] = float("inf")
    out = fp8(x)
    assert torch.isfinite(out[0]).all() and not torch.isfinite(out[1]).all()


def test_delayed_scaler_window_algorithms_and_first_sight() -> None:
    for algo, expected in (("max", 8.0), ("most_recent", 2.0)):
        s = DelayedScaler(E4M3, 0, history_len=3, algo=algo)
        assert s.scale(torch.tensor([4.0, -1.0])).item() == 448.0 / 4.0  # first sight: the current amax
        assert s.scale(torch.tensor([8.0])).item() == 448.0 / 4.0  # same step: same scale, history keeps the max
        s.advance()
        assert s.scale(torch.tensor([2.0])).item() == 448.0 / 8.0
        s.scale(torch.tensor([float("nan")]))  # a NaN amax is not recorded
        s.advance()
        assert s.history.tolist() == [0.0, 2.0, 8.0]
        assert s.current.item() == 448.0 / expected
    s = DelayedScaler(E4M3, 1, history_len=2, algo="max")
    s.scale(torch.tensor([7.0]))
    s.advance()
    s.advance()
    s.advance()  # the 7 has left the window, nothing new recorded: the scale stays
    assert s.history.tolist() == [0.0, 0.0] and s.current.item() == 448.0 / 7.0 / 2


def _train(recipe, model, opt, batches) -> list[float]:
    losses = []
    for tokens, labels in batches:
        opt.zero_grad(set_to_none=True)
        with recipe.autocast():
            loss = model(tokens, labels=labels)
        recipe.scale_loss(loss).backward()
        assert bool(recipe.unscale_grads(model))
        opt.step()
        recipe.update()
        recipe.after_step(model)
        losses.append(loss.item())
    return losses


def _run(recipe, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = recipe.prepare(TinyTransformer(TinyConfig(num_layers=1), seed=seed))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def test_delayed_scalers_live_on_the_meshs_device_from_prepare() -> None:
    """Bound to a mesh, the recipe makes its scalers there (a compiled first forward must not move them): the
    meta device stands in for a card here, a checkpoint's state loaded before ``prepare`` included."""
    from mcore.mesh import ParallelMesh

    mesh = ParallelMesh(dim_names=(), dim_sizes=(), device_type="meta")
    assert mesh.device == torch.device("meta")
    source = FP8Delayed(FP8Delayed.Config(amax_history_len=2, params="fp32"))
    source.prepare(TinyTransformer(TinyConfig(num_layers=1)))
    recipe = FP8Delayed(FP8Delayed.Config(amax_history_len=2, params="fp32"))
    recipe.load_state_dict(source.state_dict())  # pending until prepare makes the scalers
    recipe.bind_mesh(mesh)
    recipe.prepare(TinyTransformer(TinyConfig(num_layers=1)))
    assert recipe.scalers and all(
        t.device.type == "meta" for s in recipe.scalers.values() for t in (s.history, s.current, s.seen)
    )


@pytest.mark.parametrize("before_prepare", [False, True], ids=["after-prepare", "before-prepare"])
def test_delayed_history_checkpoint_resumes_bit_exact(before_prepare: bool) -> None:
    config = FP8Delayed.Config(amax_history_len=3, params="fp32")
    batches = tiny_batches(6, seed=7)
    first = FP8Delayed(config)
    model, opt = _run(first)
    _train(first, model, opt, batches[:3])
    saved = copy.deepcopy((first.state_dict(), model.state_dict(), opt.state_dict()))
    assert saved[0]["layers.0.attn.qkv.grad.history"].shape == (3,)
    continued = _train(first, model, opt, batches[3:])

    second = FP8Delayed(config)
    if before_prepare:
        second.load_state_dict(saved[0])
    model2, opt2 = _run(second, seed=1)
    if not before_prepare:
        second.load_state_dict(saved[0])
    model2.load_state_dict(saved[1])
    opt2.load_state_dict(saved[2])
    assert _train(second, model2, opt2, batches[3:]) == continued
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_wrong_state_is_a_one_line_error() -> None:
    recipe = FP8Delayed(FP8Delayed.Config(amax_history_len=3))
    _run(recipe)
    with pytest.raises(ValueError, match="no FP8 linear"):
        recipe.load_state_dict({"layers.9.mlp.down.input.history": torch.zeros(3)})
    with pytest.raises(ValueError, match="unknown key"):
        recipe.load_state_dict({"bogus": torch.zeros(3)})
    state = recipe.state_dict()
    other = FP8Delayed(FP8Delayed.Config(amax_history_len=5))
    _run(other)
    with pytest.raises(ValueError, match="amax_history_len = 5"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="keeps no state"):
        FP8Current().load_state_dict(state)


@pytest.mark.parametrize(
    "recipe", [FP8Current(), FP8Delayed(FP8Delayed.Config(amax_history_len=4))], ids=["current", "delayed"]
)
def test_tiny_transformer_trains_and_its_loss_falls(recipe) -> None:
    model, _ = _run(recipe)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = _train(recipe, model, opt, tiny_batches(25, seed=11))
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


@pytest.mark.parametrize(
    "kwargs",
    [
        {"grad_format": "e3m4"},
        {"margin": -1},
        {"first_layers_bf16": True},
        {"gemm": "native"},
        {"amax_history_len": 0},
        {"amax_compute_algo": "mean"},
    ],
)
def test_bad_config_is_a_one_line_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError) as err:
        FP8Delayed.Config(**kwargs)
    assert "\n" not in str(err.value) and "allowed" in str(err.value)


def test_first_layers_on_a_model_without_layers_is_refused() -> None:
    with pytest.raises(ConfigError, match="'layers' list"):
        FP8Current(FP8Current.Config(first_layers_bf16=1)).prepare(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_native_scaled_mm_matches_the_emulation() -> None:
    device = torch.device("cuda")
    if not native_scaled_mm_available(device):
        pytest.skip("this card has no FP8 tensor cores (capability < 8.9)")
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=False, device=device, dtype=torch.bfloat16)
    outs = []
    for native in (True, False):
        fp8 = FP8Linear.from_linear(
            copy.deepcopy(linear),
            input=CurrentScaler(E4M3, 0),
            weight=CurrentScaler(E4M3, 0),
            grad=CurrentScaler(E5M2, 0),
            native=native,
        )
        torch.manual_seed(1)
        x = torch.randn(64, 256, device=device, dtype=torch.bfloat16).requires_grad_()
        out = fp8(x)
        out.backward(torch.ones_like(out) * 0.01)
        outs.append((out.detach().float(), x.grad.float(), fp8.weight.grad.float()))
    for a, b in zip(*outs):
        assert float((a - b).norm() / b.norm()) < 1e-2  # same fp8 operands; accumulation and output rounding differ


def _card_fp8_linear() -> tuple[nn.Linear, FP8Linear]:
    """A bf16 ``(512 -> 256)`` linear on the card and its per-tensor FP8 twin (same weight); skips without FP8 cores."""
    from mcore_precision import kernels

    device = torch.device("cuda")
    if not native_scaled_mm_available(device):
        pytest.skip("this card has no FP8 tensor cores (capability < 8.9)")
    kernels.load_references()
    torch.manual_seed(0)
    linear = nn.Linear(512, 256, bias=False, device=device, dtype=torch.bfloat16)
    fp8 = FP8Linear.from_linear(
        linear, input=CurrentScaler(E4M3, 0), weight=CurrentScaler(E4M3, 0), grad=CurrentScaler(E5M2, 0)
    )
    return linear, fp8


def _assert_compiled_matches_eager(linear: nn.Linear, eager: nn.Module, compiled: Any, rows: int) -> None:
    """Output, input and weight gradients of ``compiled`` within 1e-2 of ``eager``'s, on ``(rows, 512)`` inputs."""
    x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)  # (rows, K)
    grad = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16) * 0.01  # (rows, F)
    results = []
    for module in (eager, compiled):
        linear.weight.grad = None
        xi = x.clone().requires_grad_()
        out = module(xi)  # (rows, F)
        out.backward(grad)
        results.append((out.detach().float(), xi.grad.float(), linear.weight.grad.float()))
    for got, want in zip(results[1], results[0], strict=True):
        assert torch.isfinite(got).all() and float((got - want).norm() / want.norm()) < 1e-2, rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_fp8_linear_matches_eager_on_the_card() -> None:
    """``torch.compile`` traces the linear whole (quantisation by the torch references, which inductor fuses, and
    the native GEMMs): its output and gradients agree with the eager linear (Triton kernels); no graph break."""
    from torch._dynamo.utils import counters

    linear, fp8 = _card_fp8_linear()
    torch._dynamo.reset()
    counters.clear()
    _assert_compiled_matches_eager(linear, fp8, torch.compile(fp8), 384)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_fp8_linear_takes_new_shapes_on_the_card() -> None:
    """One compiled linear called at three row counts (the second retraces with dynamic shapes, as a run's eval
    batch of another length would): each output and gradient agrees with the eager linear's."""
    linear, fp8 = _card_fp8_linear()
    torch._dynamo.reset()
    compiled = torch.compile(fp8)
    for rows in (384, 512, 640):
        _assert_compiled_matches_eager(linear, fp8, compiled, rows)


def test_saved_operand_keeps_only_the_transposed_copy() -> None:
    """An operand quantised in both layouts (the native path writes ``data_t``) is saved for backward as its
    transposed copy alone: ``data`` becomes a view of it, and the rebuilt operand reads back the same values."""
    from mcore_precision import kernels
    from mcore_precision.fp8_linear import _restored, _saved
    from mcore_precision.scaling import FP8Tensor

    x = torch.randn(48, 80)
    q, q_t, scale, _, decode = kernels.quantize_tensorwise(x, E4M3, 0, None, True)
    assert q_t is not None
    tensors, layout = _saved(x, FP8Tensor(q, scale, None, q_t, decode), reused=True)
    storages = {t.untyped_storage().data_ptr() for t in tensors if t.dim() == 2}
    assert storages == {q_t.untyped_storage().data_ptr()}  # one 2-d buffer: the transposed copy
    back = _restored(tensors, layout)
    assert back.decode is not None and torch.equal(back.decode, decode)  # the GEMM's decode scale comes back
    torch.testing.assert_close(back.dequantize(), FP8Tensor(q, scale, None).dequantize(), rtol=0, atol=0)
    torch.testing.assert_close(back.t().dequantize(), FP8Tensor(q, scale, None).t().dequantize(), rtol=0, atol=0)
