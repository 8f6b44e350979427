"""The Triton paged prefill kernel compiled (GPU) and its opt-in wiring (CPU).

GPU (``gpu``): the compiled kernel against the torch reference on random pages, bf16 within 1e-2 relative of a
fp32 torch run: GQA groups 1/4/8, cached prefixes of 0 / part of a block / thousands of tokens, ragged new-token
counts incl. 1, a sliding window, FP8 (E4M3) pages (bf16 and fp16 queries), fp32 pages at 1e-5 (``tl.dot`` at
IEEE precision), and the engine's ``PagedAttention`` taking it for prefill steps when opted in with
``MCORE_INFERENCE_PREFILL=triton``. The interpreter checks the same kernel at fp32 on the CPU
(``test_triton_prefill_interpreted.py``).

CPU: the opt-in picks torch unless on CUDA with the variable set, and ``PagedAttention`` asks for the device's
prefill kernel on GQA caches only (a custom ``kernel`` or a latent cache never reaches it).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
import torch
from mcore_inference import attention
from mcore_inference.attention import PREFILL_ENV, PagedAttention, paged_attention_torch, prefill_kernel_for
from test_triton_prefill_interpreted import Case

from mcore.protocols import PagedKV


def on_gpu(test: Callable[..., None]) -> Callable[..., None]:
    """Mark ``test`` ``gpu``, skipped without a CUDA device or triton."""
    test = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")(test)
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test)
    return pytest.mark.gpu(test)


def _on(paged: PagedKV, dtype: torch.dtype) -> PagedKV:
    """The pages on CUDA, cast to ``dtype`` unless FP8."""
    assert paged.value_cache is not None

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.cuda() if t.dtype == torch.float8_e4m3fn else t.to("cuda", dtype)

    return PagedKV(
        key_cache=move(paged.key_cache),
        value_cache=move(paged.value_cache),
        block_table=paged.block_table.cuda(),
        seq_lens=paged.seq_lens.cuda(),
    )


def _check(
    group: int, prefixes: list[int], counts: list[int], window: int | None, dtype: torch.dtype, fp8: bool
) -> None:
    """The compiled kernel in ``dtype`` against the torch path in float64 on the same pages: rel < 1e-2 (bf16 /
    fp16), < 1e-5 (fp32)."""
    from mcore_inference.triton_prefill import paged_prefill_triton

    case = Case(group, prefixes, counts, window, 128, 128, fp8)
    case.cu = case.cu.cuda()
    if case.key_scale is not None and case.value_scale is not None:
        case.key_scale, case.value_scale = case.key_scale.cuda(), case.value_scale.cuda()
    want = case.run(paged_attention_torch, case.q.cuda().double(), _on(case.paged, torch.float64), double_scales=True)
    got = case.run(paged_prefill_triton, case.q.to("cuda", dtype), _on(case.paged, dtype))
    assert got.dtype == dtype and got.shape == want.shape and bool(torch.isfinite(got).all())
    rel = float((got.double() - want).norm() / want.norm())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel < tol, f"relative error {rel:.2e} (group {group}, prefixes {prefixes}, counts {counts}, {window})"


@on_gpu
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize(
    ("prefixes", "counts"), [([0], [1000]), ([0, 5, 40, 3000], [7, 1, 200, 130]), ([4000, 1, 0], [1, 300, 2])]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fp8", [False, True])
def test_triton_prefill_matches_torch(
    group: int, prefixes: list[int], counts: list[int], dtype: torch.dtype, fp8: bool
) -> None:
    _check(group, prefixes, counts, None, dtype, fp8)


@on_gpu
@pytest.mark.parametrize("window", [1, 100, 1000])
@pytest.mark.parametrize("fp8", [False, True])
def test_triton_prefill_with_a_window_matches_torch(window: int, fp8: bool) -> None:
    _check(4, [0, 5, 1500, 3000], [300, 1, 200, 64], window, torch.bfloat16, fp8)


@on_gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_paged_attention_prefills_with_triton_on_cuda_when_opted_in(monkeypatch: pytest.MonkeyPatch, fp8: bool) -> None:
    import mcore_inference.triton_prefill as triton_prefill
    from mcore_inference.engine import LLMEngine
    from mcore_inference.sampling import SamplingParams
    from toy_model import ToyLM, greedy_reference

    calls: list[torch.dtype] = []
    kernel = triton_prefill.paged_prefill_triton

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(args[1].key_cache.dtype)  # type: ignore[attr-defined]
        return kernel(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_prefill, "paged_prefill_triton", spy)
    monkeypatch.setenv(PREFILL_ENV, "triton")  # opt-in until timed on a card
    model = ToyLM(window=6).cuda()
    engine = LLMEngine(
        model, block_size=4, num_blocks=64, max_num_batched_tokens=10, kv_cache_dtype="fp8_e4m3" if fp8 else "auto"
    )
    prompts = [[1, 2, 3, 4, 5, 6, 7], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    ids = {engine.add_request(p, SamplingParams(max_tokens=4, temperature=0.0)): i for i, p in enumerate(prompts)}
    outs: dict[int, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outs[ids[out.request_id]] = list(out.token_ids)
    assert sorted(outs) == [0, 1] and all(len(o) == 4 for o in outs.values())
    want = {torch.float8_e4m3fn} if fp8 else {torch.float32}
    assert calls and set(calls) == want, calls  # every prefill step of every layer
    if not fp8:  # fp32 pages: the tokens of the full-sequence reference
        assert [outs[i] for i in range(2)] == [greedy_reference(model, p, 4) for p in prompts]
    assert engine.cache.all_free()


def test_prefill_stays_on_torch_unless_opted_in_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PREFILL_ENV, raising=False)
    assert prefill_kernel_for(torch.device("cuda")) is paged_attention_torch  # not opted in (no import needed)
    monkeypatch.setenv(PREFILL_ENV, "triton")
    assert prefill_kernel_for(torch.device("cpu")) is paged_attention_torch  # the CPU keeps torch
    monkeypatch.setenv(PREFILL_ENV, "torch")
    assert prefill_kernel_for(torch.device("cuda")) is paged_attention_torch


def test_paged_attention_asks_for_the_device_prefill_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """``PagedAttention()`` takes ``prefill_kernel_for(device)`` on prefill steps of a GQA cache; a custom
    ``kernel`` is used as given."""
    from mcore_inference.engine import LLMEngine
    from mcore_inference.sampling import SamplingParams
    from toy_model import ToyLM

    asked: list[str] = []
    custom: list[int] = []

    def kernel_for(device: torch.device) -> attention.ScaledPagedKernel:
        asked.append(device.type)
        return paged_attention_torch

    def custom_kernel(*args: object) -> torch.Tensor:
        custom.append(int(args[3]))  # type: ignore[call-overload]
        return paged_attention_torch(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(attention, "prefill_kernel_for", kernel_for)
    params = SamplingParams(max_tokens=2, temperature=0.0)
    for backend in (PagedAttention(), PagedAttention(kernel=custom_kernel)):
        engine = LLMEngine(ToyLM(), block_size=4, num_blocks=32, attention=backend)
        engine.add_request([1, 2, 3, 4, 5], params)
        while engine.has_unfinished():
            engine.step()
    assert asked and set(asked) == {"cpu"}, asked
    assert custom and max(custom) == 5, custom  # the custom kernel served the second engine's prefill
