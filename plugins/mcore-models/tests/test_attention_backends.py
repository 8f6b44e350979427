"""The attention backends (``sdpa``, ``flex``, ``auto``) against a plain softmax reference, and the seam in the blocks.

Shape legend: B rows, T query tokens, S key tokens, nh query heads, nkv key/value heads, hd head dim.

``reference_attention`` writes attention out by hand (explicit scores, an explicit mask, softmax), with
the documents of ``cu_seqlens`` found by a loop over the flattened tokens: it shares no code with the
backends. On CPU torch's FlexAttention has a forward but no backward, so the ``flex`` forward is checked
through the real kernel (no grad) and forward + backward through the backend's CPU path (the same
``mask_mod``, dense); the CUDA kernel's backward is checked in ``test_kernels_gpu.py``.
"""

from __future__ import annotations

import copy
import gc
from typing import Any, ClassVar

import pytest
import torch

from mcore.plugins import load_plugins
from mcore.protocols.attention import AttentionBackend
from mcore.protocols.block import BlockContext
from mcore_models.attention_backends.auto import AutoBackend
from mcore_models.attention_backends.flex import FlexAutotuneBackend, FlexBackend, recompile_room
from mcore_models.attention_backends.sdpa import SDPABackend
from mcore_models.blocks.attention import Attention
from mcore_models.blocks.masking import attention_mask
from mcore_models.blocks.mla import MLA
from mcore_testing.numerics import assert_rel_close, seeded_randn

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` in float64 with the mask written out: ``(B, T, nh, hdv)``.

    Query ``t`` sits at key index ``t + S - T``; it sees key ``s`` when ``s`` is not after it, within
    ``window`` of it, and in the same document of the same row (``cu_seqlens`` over the ``B * T`` tokens).
    """
    batch, seq, heads, _ = q.shape
    keys, kv_heads = k.shape[1], k.shape[2]
    q64, k64, v64 = q.double(), k.double(), v.double()
    k64 = k64.repeat_interleave(heads // kv_heads, dim=2)  # query head i reads kv head i // group
    v64 = v64.repeat_interleave(heads // kv_heads, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q64, k64) * scale  # (B, nh, T, S)
    t = torch.arange(seq)[:, None] + keys - seq  # (T, 1) key index of each query
    s = torch.arange(keys)[None, :]  # (1, S)
    allowed = s <= t
    if window is not None:
        allowed = allowed & (t - s < window)
    allowed = allowed.expand(batch, seq, keys)  # (B, T, S)
    if cu_seqlens is not None:
        assert keys == seq, "documents are defined over the queries' tokens"
        doc = torch.empty(batch * seq, dtype=torch.long)  # document of each flattened token
        bounds = cu_seqlens.tolist()
        for d in range(len(bounds) - 1):
            doc[bounds[d] : bounds[d + 1]] = d
        doc = doc.view(batch, seq)  # a row's tokens compare with the same row only
        allowed = allowed & (doc[:, :, None] == doc[:, None, :])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v64)


def _inputs(
    batch: int, seq: int, keys: int, heads: int, kv_heads: int, hd: int, hdv: int, dtype: torch.dtype, seed: int
):  # type: ignore[no-untyped-def]
    q = seeded_randn(batch, seq, heads, hd, seed=seed).to(dtype)
    k = seeded_randn(batch, keys, kv_heads, hd, seed=seed + 1).to(dtype)
    v = seeded_randn(batch, keys, kv_heads, hdv, seed=seed + 2).to(dtype)
    dout = seeded_randn(batch, seq, heads, hdv, seed=seed + 3).to(dtype)
    return q, k, v, dout


def _cu(*bounds: int) -> torch.Tensor:
    return torch.tensor(bounds, dtype=torch.int32)


# (B, T, S, nh, nkv, hd, hdv, cu_seqlens, window)
CASES: dict[str, tuple[Any, ...]] = {
    "causal": (2, 9, 9, 4, 4, 8, 8, None, None),
    "documents": (2, 12, 12, 4, 4, 8, 8, _cu(0, 5, 15, 16, 24), None),  # document 1 continues into row 1
    "one-document-over-both-rows": (2, 7, 7, 4, 4, 8, 8, _cu(0, 14), None),
    "single-token-documents": (1, 6, 6, 2, 2, 8, 8, _cu(0, 1, 2, 3, 4, 5, 6), None),
    "window": (2, 10, 10, 4, 4, 8, 8, None, 3),
    "window-documents": (2, 12, 12, 4, 4, 8, 8, _cu(0, 5, 15, 16, 24), 4),
    "gqa-2": (2, 12, 12, 4, 2, 8, 8, _cu(0, 3, 11, 24), 5),
    "mqa": (2, 12, 12, 4, 1, 8, 8, _cu(0, 7, 24), None),
    "value-dim": (1, 11, 11, 4, 2, 12, 6, _cu(0, 4, 11), None),
    "several-tiles": (1, 200, 200, 2, 1, 16, 16, _cu(0, 130, 131, 200), 100),  # > one 128-token tile
    "offset": (2, 3, 8, 4, 2, 8, 8, None, None),  # 5 cached keys precede 3 queries (decode)
    "offset-window": (2, 3, 8, 4, 2, 8, 8, None, 4),
}
BACKENDS = {"sdpa": SDPABackend, "flex": FlexBackend, "auto": AutoBackend, "flex-autotune": FlexAutotuneBackend}


def _run(backend: AttentionBackend, case: tuple[Any, ...], dtype: torch.dtype, grad: bool, seed: int = 0):  # type: ignore[no-untyped-def]
    batch, seq, keys, heads, kv_heads, hd, hdv, cu, window = case
    q, k, v, dout = _inputs(batch, seq, keys, heads, kv_heads, hd, hdv, dtype, seed)
    scale = hd**-0.5
    ctx = BlockContext(cu_seqlens=cu)
    leaves = [x.clone().requires_grad_(grad) for x in (q, k, v)]
    with torch.set_grad_enabled(grad):
        out = backend(*leaves, ctx=ctx, scale=scale, window=window)
    ref_leaves = [x.clone().requires_grad_(grad) for x in (q, k, v)]
    ref = reference_attention(*ref_leaves, cu_seqlens=cu, scale=scale, window=window)
    assert out.shape == (batch, seq, heads, hdv) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_rel_close(out.float(), ref.float(), tol=tol, name="forward")
    if grad:
        out.backward(dout)
        ref.backward(dout.double())
        for name, leaf, ref_leaf in zip("qkv", leaves, ref_leaves, strict=True):
            assert_rel_close(leaf.grad.float(), ref_leaf.grad.float(), tol=tol, name=f"grad {name}")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_backend_matches_reference_forward_and_backward(backend: str, case: str) -> None:
    _run(BACKENDS[backend](), CASES[case], torch.float32, grad=True)


@pytest.mark.parametrize("case", ["window-documents", "offset"])
def test_auto_matches_reference(case: str) -> None:
    _run(AutoBackend(), CASES[case], torch.float32, grad=True)


@pytest.mark.parametrize("case", ["documents", "window-documents", "gqa-2", "several-tiles", "offset-window"])
def test_flex_kernel_forward_matches_reference(case: str) -> None:
    """Without gradients the real FlexAttention kernel runs on CPU too."""
    _run(FlexBackend(), CASES[case], torch.float32, grad=False, seed=5)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_backend_bf16(backend: str) -> None:
    _run(BACKENDS[backend](), CASES["window-documents"], torch.bfloat16, grad=backend == "sdpa", seed=7)


def test_reference_mask_agrees_with_masking_helper() -> None:
    """The hand-written reference and ``attention_mask`` describe the same mask (documents across rows)."""
    cu, batch, seq, window = _cu(0, 5, 15, 16, 24), 2, 12, 4
    mask = attention_mask(batch, seq, torch.device("cpu"), cu_seqlens=cu, window=window)[:, 0]  # (B, T, T)
    one_hot = torch.eye(seq)[None, :, None, :].expand(batch, seq, 1, seq)  # value of key s: e_s
    zeros = torch.zeros(batch, seq, 1, 1)
    probe = reference_attention(zeros, zeros, one_hot, cu_seqlens=cu, scale=1.0, window=window)  # (B, T, 1, S)
    assert torch.equal(probe[:, :, 0] > 0, mask)


def test_cached_keys_with_documents_is_refused() -> None:
    q, k, v, _ = _inputs(1, 3, 5, 2, 2, 8, 8, torch.float32, 0)
    ctx = BlockContext(cu_seqlens=_cu(0, 3))
    for backend in (SDPABackend(), FlexBackend()):
        with pytest.raises(ValueError, match="cached keys"):
            backend(q, k, v, ctx=ctx, scale=1.0, window=None)


# -- the per-call mask cache ---------------------------------------------------------------------------


def test_block_mask_is_built_once_per_call_and_dies_with_the_batch() -> None:
    backend = FlexBackend()
    cu = _cu(0, 5, 15, 16, 24)
    first = backend.block_mask(cu, 2, 12, 12, 4, torch.device("cpu"))
    assert backend.block_mask(cu, 2, 12, 12, 4, torch.device("cpu")) is first  # every layer of the call
    other = backend.block_mask(cu.clone(), 2, 12, 12, 4, torch.device("cpu"))  # the next batch: its own mask
    assert other is not first
    gc.collect()
    assert len(backend._masks) == 1  # the clone is gone, and its entry with it
    assert backend.block_mask(cu, 2, 12, 12, None, torch.device("cpu")) is not first  # the window is in the key
    del cu, first
    gc.collect()
    assert len(backend._masks) == 0
    copied = copy.deepcopy(backend)
    assert len(copied._masks) == 0 and copied._masks is not backend._masks


def test_block_mask_cache_is_bounded() -> None:
    backend = FlexBackend(cache_size=2)
    for window in (2, 3, 4, 5):
        backend.block_mask(None, 1, 8, 8, window, torch.device("cpu"))
    assert len(backend._masks) == 2


def _scaled_a(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def _scaled_b(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_recompile_room_keeps_compiling_past_dynamos_limit() -> None:
    """Past dynamo's recompile limit a compiled function silently runs eager (for FlexAttention: the scores
    materialised, 60x slower); ``recompile_room`` (around every compiled flex call) lets each new variant compile."""
    limit = int(torch._dynamo.config.recompile_limit)
    graphs: dict[str, int] = {"plain": 0, "room": 0}

    def counting(name: str) -> Any:
        def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
            graphs[name] += 1
            return gm.forward

        return backend

    plain = torch.compile(_scaled_a, backend=counting("plain"), dynamic=False)
    roomy = torch.compile(_scaled_b, backend=counting("room"), dynamic=False)
    variants = limit + 4  # one shape each: a new variant with dynamic=False
    for n in range(1, variants + 1):
        torch.testing.assert_close(plain(torch.ones(n)), torch.full((n,), 2.0))
        with recompile_room(variants + 1):
            torch.testing.assert_close(roomy(torch.ones(n)), torch.full((n,), 2.0))
    assert graphs == {"plain": limit, "room": variants}  # without the room the last 4 ran eager
    assert torch._dynamo.config.recompile_limit == limit  # restored
    with pytest.raises(RuntimeError), recompile_room(limit + 50):
        with recompile_room(limit + 10):  # nested: never lowers the outer room
            assert torch._dynamo.config.recompile_limit == limit + 50
        raise RuntimeError("a failing call inside")
    assert torch._dynamo.config.recompile_limit == limit  # restored after an error too


def test_mask_sees_an_in_place_change_of_cu_seqlens() -> None:
    backend = SDPABackend()
    cu = _cu(0, 4, 8)
    before = backend.mask(cu, 1, 8, 0, None, torch.device("cpu"))
    cu[1] = 2
    after = backend.mask(cu, 1, 8, 0, None, torch.device("cpu"))
    assert not torch.equal(before, after) and torch.equal(
        after, attention_mask(1, 8, torch.device("cpu"), cu_seqlens=cu, window=None)
    )


# -- the seam in the blocks ----------------------------------------------------------------------------


class RecordingBackend:
    """A third-party backend: records each call, computes with ``sdpa``."""

    name: ClassVar[str] = "recording"

    def __init__(self, supported: bool = True) -> None:
        self.calls: list[dict[str, Any]] = []
        self.supported = supported
        self.inner = SDPABackend()

    def supports(self, q: torch.Tensor, ctx: BlockContext, window: int | None) -> bool:
        return self.supported

    def __call__(self, q, k, v, *, ctx, scale, window):  # type: ignore[no-untyped-def]
        self.calls.append({"q": q.shape, "k": k.shape, "v": v.shape, "scale": scale, "window": window, "ctx": ctx})
        return self.inner(q, k, v, ctx=ctx, scale=scale, window=window)


def _attention_block() -> Attention:
    torch.manual_seed(0)
    return Attention(Attention.Config(num_heads=4, num_kv_heads=2, sliding_window=5, qk_norm=True), hidden_size=32)


def _mla_block() -> MLA:
    torch.manual_seed(0)
    cfg = MLA.Config(num_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    return MLA(cfg, hidden_size=32)


def _packed_ctx(**kwargs: Any) -> BlockContext:
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 0, 1, 2, 3, 4, 5, 6, 7]])
    return BlockContext(positions=positions, cu_seqlens=_cu(0, 5, 15, 16, 24), max_seqlen=10, **kwargs)


@pytest.mark.parametrize("make_block", [_attention_block, _mla_block], ids=["attention", "mla"])
def test_every_backend_gives_the_block_the_same_output_and_grads(make_block) -> None:  # type: ignore[no-untyped-def]
    block = make_block()
    x = seeded_randn(2, 12, 32, seed=3)
    dout = seeded_randn(2, 12, 32, seed=4)
    results = {}
    for name, backend in {"default": None, "sdpa": SDPABackend(), "flex": FlexBackend(), "auto": AutoBackend()}.items():
        block.zero_grad()
        leaf = x.clone().requires_grad_()
        out = block(leaf, _packed_ctx(attention=backend))
        out.backward(dout)
        results[name] = (out.detach(), leaf.grad, [p.grad.clone() for p in block.parameters()])
    ref_out, ref_dx, ref_dp = results.pop("default")
    for name, (out, dx, dp) in results.items():
        assert_rel_close(out, ref_out, name=f"{name} output")
        assert_rel_close(dx, ref_dx, name=f"{name} input grad")
        for g, r in zip(dp, ref_dp, strict=True):
            assert_rel_close(g, r, name=f"{name} parameter grad")


def test_block_output_matches_reference_through_the_seam() -> None:
    """What the block hands the backend, run through the reference, gives the block's output."""
    block = _attention_block()
    recorder = RecordingBackend()
    seen: list[tuple[torch.Tensor, ...]] = []

    class Capture(RecordingBackend):
        def __call__(self, q, k, v, *, ctx, scale, window):  # type: ignore[no-untyped-def]
            seen.append((q, k, v))
            return super().__call__(q, k, v, ctx=ctx, scale=scale, window=window)

    recorder = Capture()
    ctx = _packed_ctx(attention=recorder)
    out = block(seeded_randn(2, 12, 32, seed=3), ctx)
    q, k, v = seen[0]
    ref = reference_attention(q, k, v, cu_seqlens=ctx.cu_seqlens, scale=block.scale, window=5)
    assert_rel_close(out, block.out(ref.float().reshape(2, 12, -1)))


@pytest.mark.parametrize("make_block", [_attention_block, _mla_block], ids=["attention", "mla"])
def test_third_party_backend_in_context_is_called(make_block) -> None:  # type: ignore[no-untyped-def]
    block = make_block()
    recorder = RecordingBackend()
    assert isinstance(recorder, AttentionBackend)
    ctx = _packed_ctx(attention=recorder)
    out = block(seeded_randn(2, 12, 32, seed=3), ctx)
    assert len(recorder.calls) == 1
    call = recorder.calls[0]
    heads = block.config.num_heads
    assert call["q"][:3] == (2, 12, heads) and call["k"][:2] == (2, 12) and call["v"][:2] == (2, 12)
    assert call["scale"] == block.scale and call["window"] == block.config.sliding_window
    assert call["ctx"] is ctx
    assert_rel_close(out, block(seeded_randn(2, 12, 32, seed=3), _packed_ctx()))


def test_backend_that_declines_leaves_the_call_to_the_default() -> None:
    block = _attention_block()
    declining = RecordingBackend(supported=False)
    out = block(seeded_randn(2, 12, 32, seed=3), _packed_ctx(attention=declining))
    assert declining.calls == []
    assert_rel_close(out, block(seeded_randn(2, 12, 32, seed=3), _packed_ctx()))


def test_auto_uses_sdpa_on_cpu() -> None:
    auto = AutoBackend()
    q = torch.zeros(1, 4, 2, 16)
    assert auto.choose(q, q, _packed_ctx(), window=3) is auto.sdpa
    assert auto.choose(q, q, BlockContext(), window=None) is auto.sdpa


def test_backends_are_registered_under_kind_attention() -> None:
    host = load_plugins(entry_points=False, env=False, unpackaged=False, extra=["mcore_models.plugin"])
    assert {"sdpa", "flex", "flex-autotune", "auto"} <= set(host.registry.names("attention"))
    for name, cls in BACKENDS.items():
        loaded = host.load("attention", name)
        assert loaded is cls and loaded.name == name
        assert isinstance(loaded(), AttentionBackend)


def test_tile_options_and_autotuning_change_only_the_cuda_kernel() -> None:
    """``kernel_options`` and ``autotune`` reach the compiled CUDA kernel only: on CPU the same outputs, and the
    options are handed over on CUDA alone (their CUDA numerics: ``test_kernels_gpu.py``)."""
    tiles = {"BLOCK_M": 64, "BLOCK_N": 32}
    tuned, tiled = FlexAutotuneBackend(), FlexBackend(kernel_options=tiles)
    assert tuned.autotune and not FlexBackend().autotune and FlexBackend(autotune=True).autotune
    assert tiled._options(torch.device("cuda")) == {"kernel_options": tiles}
    assert tiled._options(torch.device("cpu")) == {} and FlexBackend()._options(torch.device("cuda")) == {}
    tiles["BLOCK_M"] = 16  # the backend keeps its own copy
    assert tiled.kernel_options == {"BLOCK_M": 64, "BLOCK_N": 32}
    for backend in (tuned, tiled):
        _run(backend, CASES["window-documents"], torch.float32, grad=False, seed=5)
        _run(backend, CASES["documents"], torch.float32, grad=True, seed=6)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_flex_inside_a_compiled_block_builds_its_mask_without_a_graph_break(compile_backend: str) -> None:
    """Under ``train.compile = "blocks"`` the block mask is built inside the block's graph (no break around the
    cache, which cost a guard check and two compiled-region transitions per layer on the card); a batch with
    another number of documents runs through the same compiled block. Output and gradients equal eager's."""
    from torch._dynamo.utils import counters

    block = _attention_block()
    compiled = torch.compile(block.forward, backend=compile_backend)
    contexts = [
        _packed_ctx(attention=FlexBackend()),
        BlockContext(
            positions=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0, 1], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1]]),
            cu_seqlens=_cu(0, 3, 10, 22, 24),
            max_seqlen=12,
            attention=FlexBackend(),
        ),
        BlockContext(
            positions=torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]),
            cu_seqlens=_cu(0, 12, 24),
            max_seqlen=12,
            attention=FlexBackend(),
        ),
    ]
    torch._dynamo.reset()
    counters.clear()
    for index, ctx in enumerate(contexts):
        x = seeded_randn(2, 12, 32, seed=3 + index)  # (B, T, H)
        dout = seeded_randn(2, 12, 32, seed=10 + index)
        results = []
        for forward in (block.forward, compiled):
            block.zero_grad()
            leaf = x.clone().requires_grad_()
            out = forward(leaf, ctx)
            out.backward(dout)
            results.append((out.detach(), leaf.grad, [p.grad.clone() for p in block.parameters()]))
        (out, dx, dp), (ref_out, ref_dx, ref_dp) = results[1], results[0]
        assert_rel_close(out, ref_out, name=f"batch {index} output")
        assert_rel_close(dx, ref_dx, name=f"batch {index} input grad")
        for g, r in zip(dp, ref_dp, strict=True):
            assert_rel_close(g, r, name=f"batch {index} parameter grad")
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
