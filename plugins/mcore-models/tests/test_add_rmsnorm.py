"""The residual add fused with the RMSNorm after it (``kernels/add_rmsnorm.py``) and ``GPT``'s use of it.

* The reference against the unfused ``hidden + delta`` then ``rms_norm_reference``: bit-equal.
* The Triton kernel in Triton's CPU interpreter (a child process, ``TRITON_INTERPRET=1``; fp32 and fp16: the
  interpreter's bf16 is not trusted), rows whose width is not a power of two, offset 0 and 1: ``total``
  bit-equal to torch's add and a fresh tensor, ``normed`` within 1e-5 (fp32) / 1e-2 (fp16) of the reference.
* ``GPT`` with gradients off (the fused chain, ``run_layers``) gives the logits of the grad-enabled forward,
  exactly on CPU fp32: the tiny preset, a mix of mixers with mixer-only layers, LayerNorm (no fusion),
  zero-centred gamma, MTP; layers a layout hooks or wraps run through their call.
* On CUDA (``gpu``): bf16 kernel against the reference, and the model's logits both ways.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch

import mcore_models.gpt as gpt_module
from mcore_models.gpt import GPT, GPTConfig
from mcore_models.kernels.add_rmsnorm import add_rms_norm, add_rms_norm_reference
from mcore_models.kernels.rmsnorm import rms_norm_reference
from mcore_models.presets import preset_config
from mcore_testing.interpreted import interpreted_lines
from mcore_testing.numerics import assert_rel_close, rel_error, seeded_randn, seeded_tokens

KERNEL_CASES = [((7, 48), 0.0), ((3, 5, 100), 1.0), ((1, 1000), 0.0), ((2, 64), 1.0), ((0, 40), 0.0)]
EPS = 1e-6


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    hidden = seeded_randn(*shape, seed=seed, dtype=dtype, scale=3.0)
    delta = seeded_randn(*shape, seed=seed + 1, dtype=dtype)
    weight = 1 + 0.1 * seeded_randn(shape[-1], seed=seed + 2, dtype=dtype)
    return hidden, delta, weight


# -- the reference ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("shape", "offset"), KERNEL_CASES)
def test_reference_equals_the_unfused_ops(shape: tuple[int, ...], offset: float, dtype: torch.dtype) -> None:
    hidden, delta, weight = _inputs(shape, dtype, seed=3)
    total, normed = add_rms_norm_reference(hidden, delta, weight, EPS, offset)
    plain = hidden + delta
    assert total.dtype == normed.dtype == dtype and total.shape == normed.shape == hidden.shape
    assert torch.equal(total, plain)
    assert torch.equal(normed, rms_norm_reference(plain, weight, EPS, offset))
    assert total.data_ptr() not in (hidden.data_ptr(), delta.data_ptr()) or not total.numel()


def test_cpu_dispatch_runs_the_reference() -> None:
    assert add_rms_norm.implementation("cpu") is add_rms_norm_reference


# -- the Triton kernel, interpreted -----------------------------------------------------------
def _kernel_records() -> list[dict[str, Any]]:
    from mcore_models.kernels.add_rmsnorm_triton import add_rms_norm as kernel

    out = []
    for index, (shape, offset) in enumerate(KERNEL_CASES):
        for dtype in (torch.float32, torch.float16):
            hidden, delta, weight = _inputs(shape, dtype, seed=10 * index)
            total, normed = kernel(hidden, delta, weight, EPS, offset)
            ref_total, ref_normed = add_rms_norm_reference(hidden, delta, weight, EPS, offset)
            rec: dict[str, Any] = {"name": f"{'x'.join(map(str, shape))}-{offset}-{str(dtype)[6:]}"}
            rec["total_equal"] = torch.equal(total, ref_total) and total.dtype == dtype
            rec["fresh"] = not total.numel() or total.data_ptr() not in (hidden.data_ptr(), delta.data_ptr())
            rec["shape"] = normed.shape == hidden.shape and normed.dtype == dtype
            rec["rel"] = rel_error(normed, ref_normed) if normed.numel() else 0.0
            rec["finite"] = bool(torch.isfinite(normed).all())
            out.append(rec)
    hidden, delta, weight = _inputs((4, 72), torch.float32, seed=99)  # fp32 stream + fp16 delta: torch promotes
    total, normed = kernel(hidden, delta.half(), weight, EPS, 0.0)
    ref_total, ref_normed = add_rms_norm_reference(hidden, delta.half(), weight, EPS, 0.0)
    mixed = {"name": "mixed", "total_equal": torch.equal(total, ref_total), "rel": rel_error(normed, ref_normed)}
    mixed |= {"fresh": total.data_ptr() != hidden.data_ptr(), "shape": normed.dtype == torch.float32}
    return [*out, {**mixed, "finite": bool(torch.isfinite(normed).all())}]


def interpreted_main() -> None:
    """(Child process, ``TRITON_INTERPRET=1``.) One JSON line per case."""
    for rec in _kernel_records():
        print(json.dumps(rec))


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in interpreted_lines(__file__, interpreted_main.__name__)}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_interpreted_kernel_matches_the_reference(records: dict[str, dict[str, Any]]) -> None:
    assert len(records) == 2 * len(KERNEL_CASES) + 1, sorted(records)
    for name, r in records.items():
        assert r["total_equal"] and r["fresh"] and r["shape"] and r["finite"], r
        assert r["rel"] < (1e-2 if name.endswith("float16") else 1e-5), r  # NaN fails


# -- GPT: the fused chain with gradients off ---------------------------------------------------
def _mixed(**overrides: Any) -> GPTConfig:
    """Mixers of several kinds, an MLP as a mixer, and layers without an MLP (the last one too)."""
    layers = ["attention/swiglu", "mla/none", "swiglu/none", "attention/gelu-mlp", "attention/none"]
    values = {"num_layers": 5, "layers": layers, "mla": {"q_lora_rank": 16, "kv_lora_rank": 16}}
    return preset_config("tiny", **{**values, **overrides})


MODELS: dict[str, Callable[[], GPTConfig]] = {
    "tiny": lambda: preset_config("tiny"),
    "mixed": _mixed,
    "zero-centred": lambda: _mixed(rmsnorm={"zero_centered_gamma": True}),
    "layernorm": lambda: _mixed(norm="layernorm", layernorm={"zero_centered_gamma": True}),
    "mtp": lambda: preset_config("tiny", mtp_num_layers=1),
}
FUSED_ADDS = {"tiny": 3, "mixed": 6, "zero-centred": 6, "layernorm": 0, "mtp": 3}  # sublayers - 1 with RMSNorm


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts ``GPT``'s calls of the fused add + norm (the reference runs them on CPU)."""
    calls: list[int] = []

    def counted(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return add_rms_norm(*args)

    monkeypatch.setattr(gpt_module, "add_rms_norm", counted)
    return calls


def _model(name: str) -> GPT:
    model = GPT.build(MODELS[name](), seed=5, device="cpu").eval()
    norms = [m for m in model.modules() if isinstance(m, (gpt_module.RMSNorm, gpt_module.LayerNorm))]
    with torch.no_grad():  # zero-centred gammas start at 0: give every norm a scale of its own
        for seed, norm in enumerate(norms):
            norm.weight.add_(0.1 * seeded_randn(*norm.weight.shape, seed=seed))
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_grad_logits_equal_the_grad_forward(name: str, fused_calls: list[int]) -> None:
    model = _model(name)
    tokens = seeded_tokens((2, 9), vocab_size=512, seed=1)
    with torch.enable_grad():
        expected = model(tokens)
        _, expected_hidden = model.forward_with_hidden(tokens)
    assert not fused_calls and expected.requires_grad  # training: nothing changes
    with torch.no_grad():
        got = model(tokens)
        logits, hidden = model.forward_with_hidden(tokens)
    assert len(fused_calls) == 2 * FUSED_ADDS[name]  # forward and forward_with_hidden
    assert torch.isfinite(got).all() and torch.equal(got, expected)
    assert torch.equal(logits, expected) and torch.equal(hidden, expected_hidden)


def test_hooked_or_wrapped_layers_run_through_their_call(fused_calls: list[int]) -> None:
    """A layer with a layout's hook or a ``forward`` replaced on the instance (compile, recompute) gets the stream
    with the pending add done, through its call; the layers around it still fuse."""
    model = _model("mixed")
    tokens = seeded_tokens((1, 7), vocab_size=512, seed=2)
    with torch.enable_grad():
        expected = model(tokens)
    seen: list[str] = []
    model.layers[1].register_forward_pre_hook(lambda module, args: seen.append("layer 1"))
    layer: Any = model.layers[3]
    layer.mlp_norm.register_forward_hook(lambda module, args, out: seen.append("norm"))
    inner = model.layers[4].forward

    def wrapped(hidden: torch.Tensor, ctx: Any) -> torch.Tensor:  # as train.compile or recompute wrap a layer
        seen.append("layer 4")
        return inner(hidden, ctx)

    model.layers[4].forward = wrapped  # type: ignore[method-assign]
    with torch.no_grad():
        got = model(tokens)
    assert seen == ["layer 1", "norm", "layer 4"] and torch.equal(got, expected)
    assert len(fused_calls) == 2  # layer 0's MLP norm and layer 3's attention norm (layer 2 follows a call)


def test_compiled_model_traces_the_fused_chain() -> None:
    model = _model("mixed")
    tokens = seeded_tokens((1, 6), vocab_size=512, seed=3)
    with torch.no_grad():
        expected = model(tokens)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        assert torch.equal(compiled(tokens), expected)


# -- on CUDA ----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "hidden_size", "offset"), [(1, 2048, 0.0), (37, 896, 1.0), (4096, 1000, 0.0)])
def test_cuda_kernel_matches_the_reference_in_bf16(rows: int, hidden_size: int, offset: float) -> None:
    from mcore_models.kernels.add_rmsnorm_triton import add_rms_norm as kernel

    hidden, delta, weight = (t.cuda() for t in _inputs((rows, hidden_size), torch.bfloat16, seed=rows))
    assert add_rms_norm.implementation("cuda") is kernel
    total, normed = kernel(hidden, delta, weight, EPS, offset)
    ref_total, ref_normed = add_rms_norm_reference(hidden, delta, weight, EPS, offset)
    assert torch.equal(total, ref_total) and total.data_ptr() != hidden.data_ptr()
    assert_rel_close(normed.float(), ref_normed.float(), tol=1e-2, name="normed")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny", "mixed", "zero-centred"])
def test_cuda_no_grad_logits_match_the_grad_forward(name: str) -> None:
    model = _model(name).to(device="cuda", dtype=torch.bfloat16)
    tokens = seeded_tokens((2, 9), vocab_size=512, seed=1).cuda()
    with torch.enable_grad():
        expected = model(tokens)
    with torch.no_grad():
        got = model(tokens)
    assert_rel_close(got.float(), expected.detach().float(), tol=1e-2, name="logits")
