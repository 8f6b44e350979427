"""Each Triton kernel against its PyTorch reference on CUDA: several shapes, fp32 and bf16, fwd and bwd."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mcore_testing.numerics import assert_rel_close

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16]


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)


def _grads(fn, inputs, grad_out):  # type: ignore[no-untyped-def]
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grad_out)
    return outs, [leaf.grad for leaf in leaves]


def _compare(kernel, reference, inputs, grad_out, dtype):  # type: ignore[no-untyped-def]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    outs, grads = _grads(kernel, inputs, grad_out)
    ref_outs, ref_grads = _grads(reference, inputs, grad_out)
    for o, r in zip(outs, ref_outs, strict=True):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert_rel_close(o.float(), r.float(), tol=tol, name="forward")
    for g, r in zip(grads, ref_grads, strict=True):
        assert_rel_close(g.float(), r.float(), tol=tol, name="gradient")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "hidden", "offset"), [(8192, 2048, 0.0), (37, 896, 1.0), (5, 64, 0.0)])
def test_rmsnorm_kernel(dtype: torch.dtype, rows: int, hidden: int, offset: float) -> None:
    from mcore_models.kernels.rmsnorm import rms_norm_reference
    from mcore_models.kernels.rmsnorm_triton import rms_norm

    x = _randn(rows, hidden, dtype=dtype, seed=0)
    w = 1 + 0.1 * _randn(hidden, dtype=dtype, seed=1)
    dy = _randn(rows, hidden, dtype=dtype, seed=2)
    _compare(
        lambda a, b: rms_norm(a, b, 1e-5, offset),
        lambda a, b: rms_norm_reference(a, b, 1e-5, offset),
        [x, w],
        dy,
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "seq", "nq", "nk", "hd", "rd"), [(2, 4096, 16, 8, 128, 128), (3, 17, 14, 2, 64, 64), (1, 9, 4, 1, 16, 8)]
)
def test_rope_kernel(
    dtype: torch.dtype,
    batch: int,
    seq: int,
    nq: int,
    nk: int,
    hd: int,
    rd: int,
) -> None:
    from mcore_models.kernels.rope import apply_rope_reference
    from mcore_models.kernels.rope_triton import apply_rope

    qkv = _randn(batch, seq, (nq + 2 * nk) * hd, dtype=dtype, seed=0)
    q, k, _ = qkv.split([nq * hd, nk * hd, nk * hd], dim=-1)
    q, k = q.view(batch, seq, nq, hd), k.view(batch, seq, nk, hd)  # strided views: no contiguity assumed
    angles = torch.arange(seq, device="cuda")[None, :, None] * _randn(1, 1, rd // 2, dtype=torch.float32, seed=1).abs()
    angles = angles.expand(batch, seq, rd // 2)
    cos, sin = angles.cos(), angles.sin()
    grads = (_randn(batch, seq, nq, hd, dtype=dtype, seed=2), _randn(batch, seq, nk, hd, dtype=dtype, seed=3))
    _compare(
        lambda a, b: apply_rope(a, b, cos, sin), lambda a, b: apply_rope_reference(a, b, cos, sin), [q, k], grads, dtype
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "strided"), [((8192, 5632), False), ((3, 11, 4864), False), ((3, 100), True)])
def test_swiglu_kernel(dtype: torch.dtype, shape: tuple[int, ...], strided: bool) -> None:
    """Gate and up as two tensors (the outputs of two projections); ``strided``: views into one buffer."""
    from mcore_models.kernels.swiglu import swiglu_reference
    from mcore_models.kernels.swiglu_triton import swiglu

    if strided:
        gate, up = (_randn(*shape[:-1], 2 * shape[-1], dtype=dtype, seed=0) * 3).chunk(2, dim=-1)
    else:
        gate, up = _randn(*shape, dtype=dtype, seed=0) * 3, _randn(*shape, dtype=dtype, seed=1)
    dy = _randn(*shape, dtype=dtype, seed=2)
    _compare(swiglu, swiglu_reference, [gate, up], dy, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8192, 2 * 5632), (3, 11, 2 * 4864), (3, 2 * 100)])
def test_swiglu_packed_kernel(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """``[gate | up]`` rows of one GEMM read in place; the gradient is one ``(..., 2F)`` buffer."""
    from mcore_models.kernels.swiglu import swiglu_packed_reference
    from mcore_models.kernels.swiglu_triton import swiglu_packed

    packed = _randn(*shape, dtype=dtype, seed=0) * 3
    dy = _randn(*shape[:-1], shape[-1] // 2, dtype=dtype, seed=2)
    _compare(swiglu_packed, swiglu_packed_reference, [packed], dy, dtype)
    leaf = packed.detach().requires_grad_()
    swiglu_packed(leaf).backward(dy)
    assert leaf.grad is not None and leaf.grad.shape == shape and leaf.grad.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "hidden", "vocab", "chunk"), [(8192, 2048, 32768, 4096), (100, 64, 1000, 33), (7, 32, 151936, 4)]
)
def test_fused_linear_cross_entropy(dtype: torch.dtype, tokens: int, hidden: int, vocab: int, chunk: int) -> None:
    from mcore_models.kernels.linear_ce import linear_cross_entropy_sum, linear_cross_entropy_unfused

    h = _randn(tokens, hidden, dtype=dtype, seed=0)
    w = _randn(vocab, hidden, dtype=dtype, seed=1) * 0.02
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    labels[::5] = -100
    g = torch.tensor(0.5, device="cuda")
    _compare(
        lambda a, b: linear_cross_entropy_sum(a, b, labels, chunk_size=chunk),
        lambda a, b: linear_cross_entropy_unfused(a, b, labels),
        [h, w],
        g,
        dtype,
    )


def test_triton_dispatch_is_chosen_on_cuda() -> None:
    from mcore_models.kernels import rmsnorm_triton, swiglu_triton
    from mcore_models.kernels.rmsnorm import rms_norm
    from mcore_models.kernels.swiglu import swiglu, swiglu_packed

    assert rms_norm.implementation("cuda") is rmsnorm_triton.rms_norm
    assert swiglu.implementation("cuda") is swiglu_triton.swiglu
    assert swiglu_packed.implementation("cuda") is swiglu_triton.swiglu_packed


@pytest.mark.parametrize("preset", ["tiny", "deepseek-v3-mini-dense"])
def test_model_on_cuda_matches_cpu_reference(preset: str) -> None:
    from mcore.protocols.block import BlockContext
    from mcore_models.gpt import GPT
    from mcore_models.presets import preset_config

    cfg = preset_config(preset, vocab_size=512, num_layers=2)
    cpu = GPT.build(cfg, seed=0, device="cpu")
    gpu = GPT.build(cfg, seed=0, device="cuda")
    for (name, a), b in zip(cpu.state_dict().items(), gpu.state_dict().values(), strict=True):
        # the same counter-based draws on both devices: uniform bits are identical, the normal
        # transform (log, sqrt, cos) may round the last bit differently on CUDA (mcore.init_rng)
        assert_rel_close(b.cpu(), a, tol=1e-6, name=name)
        assert (b.cpu() - a).abs().max() <= 2 * torch.finfo(torch.float32).eps * a.abs().max(), name
    gpu.load_state_dict(cpu.state_dict())  # then the kernels are compared on the same weights
    tokens = torch.randint(0, 512, (2, 64))
    cu = torch.tensor([0, 20, 64, 100, 128], dtype=torch.int32)
    for ctx in (None, BlockContext(cu_seqlens=cu, max_seqlen=44)):
        ctx_gpu = None if ctx is None else BlockContext(cu_seqlens=cu.cuda(), max_seqlen=44)
        loss_cpu = cpu(tokens, labels=tokens, ctx=ctx)
        loss_gpu = gpu(tokens.cuda(), labels=tokens.cuda(), ctx=ctx_gpu)
        assert_rel_close(loss_gpu.cpu(), loss_cpu, tol=1e-4)
        loss_cpu.backward()
        loss_gpu.backward()
        for (name, p), q in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
            assert_rel_close(q.grad.cpu(), p.grad, tol=1e-3, name=name)
        cpu.zero_grad()
        gpu.zero_grad()


def _attention_reference(q, k, v, cu_seqlens, scale, window):  # type: ignore[no-untyped-def]
    """fp32 masked softmax over explicit scores: ``(B, T, nh, hd)`` inputs, documents of ``cu_seqlens`` within rows."""
    batch, seq, heads, _ = q.shape
    group = heads // k.shape[2]
    q, k, v = q.float(), k.float().repeat_interleave(group, dim=2), v.float().repeat_interleave(group, dim=2)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths).view(batch, seq)
    t, s = torch.arange(seq, device=q.device)[:, None], torch.arange(seq, device=q.device)[None, :]
    allowed = (s <= t) & (doc[:, :, None] == doc[:, None, :])  # (B, T, T)
    if window is not None:
        allowed = allowed & (t - s < window)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v)


@pytest.mark.parametrize("backend", ["flex", "sdpa", "auto", "flex-tiles"])
@pytest.mark.parametrize(
    ("seq", "bounds", "heads", "kv_heads", "hd", "window"),
    [
        (2048, (0, 700, 1024, 2500, 4096), 16, 8, 128, None),  # a document continues into the second row
        (1000, (0, 13, 600, 1400, 2000), 8, 2, 64, 256),  # not a multiple of the 128-token tile; window
        (1024, (0, 1024, 2048), 4, 1, 192, None),  # MQA, MLA's head dim
    ],
)
def test_attention_backend_packed_batch_on_cuda(
    backend: str, seq: int, bounds: tuple[int, ...], heads: int, kv_heads: int, hd: int, window: int | None
) -> None:
    """bf16 flex and sdpa against the fp32 reference on a packed batch of two rows, forward and backward."""
    from mcore_models.attention_backends.auto import AutoBackend
    from mcore_models.attention_backends.flex import FlexBackend
    from mcore_models.attention_backends.sdpa import SDPABackend

    impl = {"flex": FlexBackend, "sdpa": SDPABackend, "auto": AutoBackend, "flex-tiles": _small_tiles}[backend]()
    _check_packed(impl, seq, bounds, heads, kv_heads, hd, window)


def test_flex_autotune_backend_packed_batch_on_cuda() -> None:
    """``flex-autotune`` (inductor's autotuned tiles: one shape, its tuning takes a while) against the reference."""
    from mcore_models.attention_backends.flex import FlexAutotuneBackend

    _check_packed(FlexAutotuneBackend(), 2048, (0, 700, 1024, 2500, 4096), 8, 4, 128, None)


def test_flex_stays_compiled_past_dynamos_recompile_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """More compiled variants of FlexAttention than dynamo's limit (set to 1 here: shapes, gradient modes) still run
    the compiled kernel, not the eager one that materialises the scores and warns that it was not compiled."""
    import warnings

    import torch.nn.attention.flex_attention as flex_module

    from mcore.protocols.block import BlockContext
    from mcore_models.attention_backends.flex import FlexBackend

    monkeypatch.setattr(flex_module, "_WARNINGS_SHOWN", set())  # torch warns once a process: forget earlier tests

    backend = FlexBackend()
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(**{name: 1}), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seq in (256, 384, 512):
            cu = torch.tensor([0, seq // 2, 2 * seq], dtype=torch.int32, device="cuda")
            q, k, v = (_randn(2, seq, 4, 64, dtype=torch.bfloat16, seed=i).requires_grad_() for i in range(3))
            out = backend(q, k, v, ctx=BlockContext(cu_seqlens=cu), scale=0.125, window=None)
            out.float().square().sum().backward()
            with torch.no_grad():
                backend(q, k, v, ctx=BlockContext(cu_seqlens=cu), scale=0.125, window=None)
            assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    eager = [str(w.message) for w in caught if "without torch.compile" in str(w.message)]
    assert not eager, eager[0]


def _small_tiles() -> Any:
    """``flex`` with forward and backward tile sizes of its own (``kernel_options``), not inductor's defaults."""
    from mcore_models.attention_backends.flex import FlexBackend

    tiles = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}
    return FlexBackend(kernel_options={**tiles, "num_warps": 4, "num_stages": 2})


def _check_packed(
    impl: Any, seq: int, bounds: tuple[int, ...], heads: int, kv_heads: int, hd: int, window: int | None
) -> None:
    """``impl`` on a bf16 packed batch of two rows (documents ``bounds``) against the fp32 reference, fwd + bwd."""
    from mcore.protocols.block import BlockContext
    from mcore_models.attention_backends.auto import AutoBackend

    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    q = _randn(2, seq, heads, hd, dtype=torch.bfloat16, seed=0)
    k = _randn(2, seq, kv_heads, hd, dtype=torch.bfloat16, seed=1)
    v = _randn(2, seq, kv_heads, hd, dtype=torch.bfloat16, seed=2)
    dout = _randn(2, seq, heads, hd, dtype=torch.bfloat16, seed=3)
    ctx = BlockContext(cu_seqlens=cu)
    if isinstance(impl, AutoBackend):
        assert impl.choose(q, k, ctx, window) is impl.flex  # packed documents on CUDA take FlexAttention
    _compare(
        lambda a, b, c: impl(a, b, c, ctx=ctx, scale=hd**-0.5, window=window),
        lambda a, b, c: _attention_reference(a, b, c, cu, hd**-0.5, window).to(a.dtype),
        [q, k, v],
        dout,
        torch.bfloat16,
    )
