"""The ``flex`` attention backend: FlexAttention with a block-sparse mask of documents and windows.

Shape legend: B rows, T query tokens, S key tokens, nh query heads, nkv key/value heads, hd head dim.

The mask (``mask_mod``) says query ``t`` sees key ``s`` when ``s <= t + S - T``, both lie in the same
document of their row (``blocks.masking.document_ids`` of ``ctx.cu_seqlens``; attention stays within
a row) and ``t + S - T - s < window``. Its ``BlockMask`` of 128 x 128 tiles (empty tiles are skipped,
full ones run without the mask) comes from per-block document ids (``flex_blocks``: a few small kernels
instead of ``create_block_mask``'s evaluation of every pair, 7-9 ms per batch at 4,096 tokens on an
H200); with cached keys (decode) ``create_block_mask`` builds it. Eagerly the block mask is built once per call
and shared by every layer of the forward (``cache.MaskCache``, keyed on the ``cu_seqlens`` tensor); inside a block
compiled by ``train.compile = "blocks"`` each layer builds it in its own graph (no graph break around the cache).

On CUDA the kernel is ``torch.compile(flex_attention)`` (eager FlexAttention materialises the scores);
it is compiled once per process and mode (``_compiled_flex``) so backend instances share one compiled
kernel instead of compiling it again each, and called with room for ``FLEX_RECOMPILE_LIMIT`` compiled
variants (``recompile_room``: past dynamo's default of 8 it would silently run the eager kernel);
``flex-autotune`` compiles it with inductor's autotuning of the tile sizes, and ``kernel_options`` fixes them.
Inside a region already being compiled the plain function is traced. On CPU the eager function runs; torch has no FlexAttention backward on CPU, so a call that
needs gradients there runs SDPA over the same ``mask_mod`` evaluated densely (tests check the mask).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from mcore.errors import UserError
from mcore.protocols.block import BlockContext
from mcore_models.attention_backends.cache import MaskCache
from mcore_models.attention_backends.flex_blocks import document_block_mask
from mcore_models.blocks.masking import document_ids

MIN_CUDA_HEAD_DIM = 16  # Triton's tl.dot needs tiles of at least 16


def flex_devices() -> frozenset[str]:
    """The device types FlexAttention runs on here (CUDA needs Triton for the compiled kernel)."""
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return frozenset()
    return frozenset({"cpu", "cuda"} if importlib.util.find_spec("triton") is not None else {"cpu"})


#: ``torch.compile`` mode of the autotuned kernel: inductor times its list of FlexAttention tile configs (forward
#: and backward) on the first call of each shape and keeps the fastest; CUDA graphs stay off (the step owns them).
AUTOTUNE_MODE = "max-autotune-no-cudagraphs"


#: Compiled variants of FlexAttention a process may hold before dynamo gives up compiling it. Dynamo counts them per
#: code object -- every backend instance, mode and tile option shares ``flex_attention``'s, and each shape, window,
#: GQA ratio, input layout and gradient mode is one more -- and past its default of 8 it runs the eager kernel, which
#: materialises the scores: 59-61 ms a call against 0.99 compiled (H100, ``bench_attention.py``, 4,096 tokens,
#: fwd + bwd, 2026-12-06, where the tile sweep's candidates hit the limit).
FLEX_RECOMPILE_LIMIT = 64


class _RecompileRoom(contextlib.AbstractContextManager["_RecompileRoom"]):
    """Dynamo's recompile limit at least ``limit`` inside, restored after: set directly (``config.patch`` costs ~30 us
    a call on the host, 16 calls a forward; this ~5-8)."""

    def __init__(self, limit: int) -> None:
        config = torch._dynamo.config
        self.name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
        self.limit = limit
        self.saved: int | None = None

    def __enter__(self) -> _RecompileRoom:
        config = torch._dynamo.config
        self.saved = getattr(config, self.name)
        if self.saved is not None and self.saved < self.limit:
            setattr(config, self.name, self.limit)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(torch._dynamo.config, self.name, self.saved)


def recompile_room(limit: int = FLEX_RECOMPILE_LIMIT) -> contextlib.AbstractContextManager[Any]:
    """Dynamo's recompile limit raised to at least ``limit`` for the calls inside (restored after them)."""
    return _RecompileRoom(limit)


@functools.cache
def _compiled_flex(mode: str | None = None) -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False, mode=mode)

    def call(*args: Any, **kwargs: Any) -> Any:
        with recompile_room():
            return compiled(*args, **kwargs)

    return call


def _mask_mod(docs: torch.Tensor | None, offset: int, window: int | None) -> Callable[..., torch.Tensor]:
    """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` for ``docs (B, T)`` document ids (or none)."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q_pos = q_idx + offset  # key index of the query
        allowed = kv_idx <= q_pos
        if window is not None:
            allowed = allowed & (q_pos - kv_idx < window)
        if docs is not None:
            allowed = allowed & (docs[b, q_idx] == docs[b, kv_idx])
        return allowed

    return mask_mod


class FlexBackend:
    """``__call__(q (B, T, nh, hd), k (B, S, nkv, hd), v (B, S, nkv, hdv), *, ctx, scale, window) -> (B, T, nh, hdv)``.

    ``compile``: compile the kernel on CUDA (none: yes). ``cache_size``: block masks kept per instance.
    ``autotune``: compile it in ``AUTOTUNE_MODE`` (inductor picks the tile sizes by timing them on the first call
    of a shape, seconds to minutes once; ``flex-autotune`` registers this). ``kernel_options``: FlexAttention's
    ``kernel_options`` (tile sizes, warps, stages of forward and backward) passed on every call, for a
    configuration measured to beat the defaults (``benchmarks/bench_attention.py --flex-options``).
    """

    name: ClassVar[str] = "flex"
    autotune_default: ClassVar[bool] = False

    def __init__(
        self,
        *,
        compile: bool | None = None,
        cache_size: int = 8,
        autotune: bool | None = None,
        kernel_options: dict[str, Any] | None = None,
    ) -> None:
        self.compile = compile
        self.autotune = self.autotune_default if autotune is None else autotune
        self.kernel_options = dict(kernel_options) if kernel_options else None
        self.devices = flex_devices()  # looked up once, not per call (nor inside a compiled region)
        self._masks = MaskCache(cache_size)

    def supports(self, q: torch.Tensor, ctx: BlockContext, window: int | None) -> bool:
        """FlexAttention exists for ``q``'s device, on CUDA the head dim fills a Triton tile, and no inference
        cache holds the keys (``ctx.kv_cache``: the paged backend reads its pages)."""
        if q.device.type not in self.devices or ctx.kv_cache is not None:
            return False
        return q.device.type != "cuda" or q.shape[-1] >= MIN_CUDA_HEAD_DIM

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        ctx: BlockContext,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        from torch.nn.attention.flex_attention import create_mask

        if ctx.kv_cache is not None:  # its mask would treat the step's new keys as the whole sequence
            raise UserError("flex attention called under an inference cache (ctx.kv_cache); a paged backend reads it")
        batch, seq, heads = q.shape[:3]
        keys = k.shape[1]
        if keys < seq:
            raise ValueError(f"flex attention: {keys} keys for {seq} queries; keys must include the queries")
        block_mask = self.block_mask(ctx.cu_seqlens, batch, seq, keys, window, q.device)
        gqa = heads != k.shape[2]
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n, T|S, d) views
        try:
            kernel, options = self._kernel(q.device), self._options(q.device)
            out = kernel(qt, kt, vt, block_mask=block_mask, scale=scale, enable_gqa=gqa, **options)
        except NotImplementedError:
            if q.device.type != "cpu" or not torch.is_grad_enabled():
                raise
            # torch has no FlexAttention backward on CPU: the same mask_mod, dense, through SDPA
            b = block_mask.shape[0]
            dense = create_mask(block_mask.mask_mod, b, 1, seq, keys, q.device)  # (B or 1, 1, T, S)
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=dense, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)  # (B, T, nh, hdv): the kernel lays its output out like q

    def _kernel(self, device: torch.device) -> Callable[..., Any]:
        from torch.nn.attention.flex_attention import flex_attention

        if device.type != "cuda" or self.compile is False or torch.compiler.is_compiling():
            return flex_attention
        return _compiled_flex(AUTOTUNE_MODE if self.autotune else None)

    def _options(self, device: torch.device) -> dict[str, Any]:
        """``{"kernel_options": ...}`` for the Triton kernel on CUDA when set (the CPU kernel takes none)."""
        return {"kernel_options": self.kernel_options} if self.kernel_options and device.type == "cuda" else {}

    def block_mask(
        self,
        cu_seqlens: torch.Tensor | None,
        batch: int,
        seq: int,
        keys: int,
        window: int | None,
        device: torch.device,
    ) -> Any:
        """The call's ``BlockMask`` (batch 1 without documents): built on first use and cached; inside a region
        being compiled (``train.compile = "blocks"``) built in the graph, a few fused kernels per layer, instead
        of breaking the graph around the cache (each break costs a guard check and two compiled-region
        transitions on the host: ~0.3-0.4 ms before every attention call on an H100)."""
        if torch.compiler.is_compiling():
            return _build_block_mask(cu_seqlens, batch, seq, keys, window, device)
        return self._cached_block_mask(cu_seqlens, batch, seq, keys, window, device)

    @torch.compiler.disable
    def _cached_block_mask(
        self,
        cu_seqlens: torch.Tensor | None,
        batch: int,
        seq: int,
        keys: int,
        window: int | None,
        device: torch.device,
    ) -> Any:
        def build() -> Any:
            return _build_block_mask(cu_seqlens, batch, seq, keys, window, device)

        return self._masks.get(cu_seqlens, (batch, seq, keys, window, str(device)), build)


def _build_block_mask(
    cu_seqlens: torch.Tensor | None, batch: int, seq: int, keys: int, window: int | None, device: torch.device
) -> Any:
    """The ``BlockMask`` of causal attention within the documents of ``cu_seqlens`` and the ``window``."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = keys - seq
    if cu_seqlens is not None and offset:
        raise ValueError(f"flex attention: cu_seqlens with {offset} cached keys is not supported")
    docs = None if cu_seqlens is None else document_ids(cu_seqlens.to(device), batch, seq)  # (B, T)
    mask_mod = _mask_mod(docs, offset, window)
    if not offset:  # the tiles from per-block document ids (flex_blocks), not from every pair
        return document_block_mask(docs, seq, window, mask_mod, device)
    return create_block_mask(mask_mod, None if docs is None else batch, None, seq, keys, device=device)


class FlexAutotuneBackend(FlexBackend):
    """``flex`` whose CUDA kernel's tile sizes inductor autotunes (``AUTOTUNE_MODE``) on each new shape's first call."""

    name: ClassVar[str] = "flex-autotune"
    autotune_default: ClassVar[bool] = True
