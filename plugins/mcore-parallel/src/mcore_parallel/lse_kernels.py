"""The fast path of ``lse_merge`` on CUDA: fused attention kernels that return the log-sum-exp, for the
blocks whose mask they can express.

Fused kernels (flash-attention, as ``torch.ops.aten._scaled_dot_product_flash_attention`` and its
``_backward``) take no mask, only "every key" or "causal". The blocks of the ``cp`` zig-zag split
mostly are one of those after cutting away the queries and keys that see nothing: against its own
tokens a rank's block is plain causal; against an earlier rank's tokens its queries see the first half
of the keys fully; against a later rank's, the second half of its queries sees every key. So a mask
is described once (``describe_mask``, a few reductions and host syncs; callers cache the result
per micro-batch) as a ``BlockLayout``: the rectangle of queries x keys that sees anything and whether
it is fully visible or causal. The kernel runs on that rectangle only; the other queries get
``out = 0``, ``lse = -inf`` (and no gradient). Any other mask (documents, padding, windows) is
``"general"``: the reference runs it, unless the caller built the layout with a FlexAttention ``BlockMask``
(``flex_block_mask``; ``benchmarks/bench_cp.py`` does): then compiled FlexAttention runs it. ``describe_mask``
does not attach one: inside the ring's GPU test (small packed-document blocks, torch 2.11, H200,
2026-12-05) inductor found no kernel for that FlexAttention call (``NoValidChoicesError``), though the
same call compiles at 8k/32k; until that is understood the ring's document masks take the reference.

The backward takes the MERGED output and log-sum-exp of all blocks: flash-attention's backward computes
``P = exp(s - lse)`` and ``delta = rowsum(dO * O)`` from exactly the tensors it is given, so handing it the
merged ones gives this block's share of the gradients (what the ring needs). FlexAttention's backward
takes no statistics, so ``flex_backward`` recomputes the block's own ``(o_i, l_i)`` and back-propagates the
merge's gradients into them: with ``w_i = exp(l_i - L)``, ``dO_i = w_i dO`` and
``dl_i = w_i (rowsum(dO * o_i) - rowsum(dO * O))`` (one extra forward of the block).

What the kernel needs is arranged here: equal query/key and value head dims (MLA's ``hdv != hd``: zeros
appended, which change no score and no output), a multiple of 8, at most 256; key/value heads repeated
for GQA (their gradients summed back). The kernel sees ``(B, nh, T, d)`` tensors; bf16/fp16 only.
FlexAttention takes GQA and ``hdv != hd`` as they are (head dims of at least 16).

cuDNN's fused attention (plain SDPA's kernel on Hopper, 1.8x flash's speed at 8k in ``bench_cp.py``) is not
used: its ATen op refused the log-sum-exp layout this path hands it on torch 2.11 ("The dim for
input_names::Stats is invalid", H200, 2026-12-05).

Shape legend: B rows, T queries, S keys, nh query heads, nkv key/value heads, hd query/key head dim,
hdv value head dim, d the kernel's head dim.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

LayoutKind = Literal["empty", "full", "causal", "general"]
MAX_HEAD_DIM = 256  # flash-attention's largest head dim
MIN_FLEX_HEAD_DIM = 16  # Triton's tl.dot needs tiles of at least 16


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class BlockLayout:
    """What a block's mask lets the queries see (module docstring).

    ``kind``: ``"empty"`` (no query sees a key), ``"full"`` (queries ``rows`` see keys ``cols``, all of them,
    and nothing else is seen), ``"causal"`` (``rows`` and ``cols`` have one length and query ``rows[0] + i``
    sees keys ``cols[0] .. cols[0] + i``, nothing else), ``"general"`` (anything else). ``mask``: the dense
    ``(B or 1, T, S)`` bool mask it describes (``None``: every key), for the reference. ``block_mask``: for a
    ``"general"`` mask, FlexAttention's ``BlockMask`` when the caller built one (then FlexAttention runs it on
    CUDA); else ``None`` (the reference).
    """

    kind: LayoutKind
    rows: tuple[int, int]
    cols: tuple[int, int]
    mask: torch.Tensor | None
    block_mask: Any = None


def _span(seen: torch.Tensor) -> tuple[int, int] | None:
    """``seen (n,)`` bool on the host: ``(first, last + 1)`` when the True entries are one run, else ``None``."""
    where = seen.nonzero().flatten()
    first, stop = int(where[0]), int(where[-1]) + 1
    return (first, stop) if stop - first == where.numel() else None


def describe_mask(mask: torch.Tensor | None, queries: int, keys: int) -> BlockLayout:
    """The ``BlockLayout`` of ``mask (B or 1, T, S)`` (``None``: every key); a few reductions on the mask's
    device and a few host syncs, so callers describe a mask once and reuse the layout. A general mask's layout
    carries no ``BlockMask`` (module docstring): the reference runs it."""
    if mask is None:
        return BlockLayout(kind="full", rows=(0, queries), cols=(0, keys), mask=None)

    def general() -> BlockLayout:
        return BlockLayout(kind="general", rows=(0, queries), cols=(0, keys), mask=mask)

    row_any, row_all = mask.any(-1).any(0), mask.any(-1).all(0)  # (T,): some row of the batch / every row sees a key
    col_any, col_all = mask.any(-2).any(0), mask.any(-2).all(0)  # (S,)
    row_any, row_all, col_any, col_all = (x.cpu() for x in (row_any, row_all, col_any, col_all))
    if not bool(row_any.any()):
        return BlockLayout(kind="empty", rows=(0, 0), cols=(0, 0), mask=mask)
    rows, cols = _span(row_any), _span(col_any)
    if rows is None or cols is None or not torch.equal(row_any, row_all) or not torch.equal(col_any, col_all):
        return general()
    sub = mask[:, rows[0] : rows[1], cols[0] : cols[1]]  # (B or 1, T', S'): everything seen lies in here
    if bool(sub.all()):
        return BlockLayout(kind="full", rows=rows, cols=cols, mask=mask)
    if rows[1] - rows[0] == cols[1] - cols[0]:
        tril = torch.ones(sub.shape[-2:], dtype=torch.bool, device=sub.device).tril()  # (T', T')
        if bool((sub == tril).all()):
            return BlockLayout(kind="causal", rows=rows, cols=cols, mask=mask)
    return general()


class Kernel(Protocol):
    """A fused attention kernel on ``(B, nh, T, d)`` tensors of equal head counts and head dims."""

    def head_dim(self, hd: int, hdv: int) -> int | None:
        """The head dim it runs ``hd``/``hdv`` at (zeros appended), ``None`` if it cannot."""
        ...

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out (B, nh, T, d) in q's dtype, lse (B, nh, T) fp32)``; every query sees at least one key."""
        ...

    def backward(
        self,
        grad: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        causal: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dq, dk, dv)`` given ``out``/``lse`` (which may be merged over more blocks than this one)."""
        ...


class FlashKernel:
    """flash-attention through ATen (``_scaled_dot_product_flash_attention`` and its backward)."""

    def head_dim(self, hd: int, hdv: int) -> int | None:
        dim = -(-max(hd, hdv) // 8) * 8
        return dim if dim <= MAX_HEAD_DIM else None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
        return out, lse[..., : q.shape[2]].float()

    def backward(
        self,
        grad: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        causal: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # None: undefined tensors. The offsets must be: a defined one (even empty) selects the varlen kernel;
        # the dropout seed is read only with dropout.
        no_offsets = no_seed = None
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad,
            q,
            k,
            v,
            out,
            lse.contiguous(),
            no_offsets,
            no_offsets,
            q.shape[2],
            k.shape[2],
            0.0,
            causal,
            no_seed,
            no_seed,
            scale=scale,
        )
        return dq, dk, dv


def fast_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the fast path may take these tensors: CUDA, bf16/fp16 alike, not inside a region being
    compiled (there the reference is traced)."""
    half = q.dtype in (torch.bfloat16, torch.float16) and k.dtype == v.dtype == q.dtype
    return q.is_cuda and half and not torch.compiler.is_compiling()


def flash_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> FlashKernel | None:
    """The flash kernel when it can run these tensors (``fast_inputs``, sm80+, head dims it takes), else
    ``None`` (the caller runs the reference)."""
    if not fast_inputs(q, k, v) or not torch.backends.cuda.is_flash_attention_available():
        return None
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return None
    kernel = FlashKernel()
    return kernel if kernel.head_dim(q.shape[-1], v.shape[-1]) is not None else None


def _to_kernel(x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """``(B, n, d0, ...)`` as ``(B, T, n, d0)`` -> ``(B, heads, T, dim)``: heads repeated, zeros appended."""
    if x.shape[2] != heads:
        x = x.repeat_interleave(heads // x.shape[2], dim=2)  # (B, T, nh, d0)
    if x.shape[-1] != dim:
        x = F.pad(x, (0, dim - x.shape[-1]))  # (B, T, nh, dim)
    return x.transpose(1, 2)  # (B, nh, T, dim), last dim contiguous


def _fold(x: torch.Tensor, kv_heads: int, width: int) -> torch.Tensor:
    """A kernel gradient ``(B, nh, S, d)`` -> ``(B, S, nkv, width)`` fp32: a kv head's query heads summed."""
    batch, heads, seq, dim = x.shape
    x = x.float().view(batch, kv_heads, heads // kv_heads, seq, dim).sum(dim=2)  # (B, nkv, S, d)
    return x[..., :width].transpose(1, 2)


def fast_forward(
    kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, layout: BlockLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """``partial_attention`` of a non-``"general"`` layout through ``kernel``: ``out (B, T, nh, hdv)`` fp32 and
    ``lse (B, nh, T)`` fp32, 0 and ``-inf`` for the queries outside ``layout.rows``."""
    assert layout.kind != "general", "a general mask runs on the reference"
    batch, queries, heads, _ = q.shape
    hdv = v.shape[-1]
    out = torch.zeros(batch, queries, heads, hdv, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, heads, queries), float("-inf"), dtype=torch.float32, device=q.device)
    if layout.kind == "empty":
        return out, lse
    (r0, r1), (c0, c1) = layout.rows, layout.cols
    dim = kernel.head_dim(q.shape[-1], hdv)
    assert dim is not None
    block_out, block_lse = kernel.forward(
        _to_kernel(q[:, r0:r1], heads, dim),
        _to_kernel(k[:, c0:c1], heads, dim),
        _to_kernel(v[:, c0:c1], heads, dim),
        causal=layout.kind == "causal",
        scale=scale,
    )  # (B, nh, T', dim), (B, nh, T')
    out[:, r0:r1] = block_out[..., :hdv].transpose(1, 2)
    lse[:, :, r0:r1] = block_lse
    return out, lse


def fast_backward(
    kernel: Kernel,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    scale: float,
    layout: BlockLayout,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``partial_attention_backward`` of a non-``"general"`` layout through ``kernel``: fp32 ``(dq, dk, dv)``,
    given the merged ``out (B, T, nh, hdv)``, ``lse (B, nh, T)`` and ``grad_out``."""
    assert layout.kind != "general", "a general mask runs on the reference"
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    if layout.kind == "empty":
        return dq, dk, dv
    (r0, r1), (c0, c1) = layout.rows, layout.cols
    heads, kv_heads, hd, hdv = q.shape[2], k.shape[2], q.shape[-1], v.shape[-1]
    dim = kernel.head_dim(hd, hdv)
    assert dim is not None
    block_dq, block_dk, block_dv = kernel.backward(
        _to_kernel(grad_out[:, r0:r1].to(q.dtype), heads, dim),
        _to_kernel(q[:, r0:r1], heads, dim),
        _to_kernel(k[:, c0:c1], heads, dim),
        _to_kernel(v[:, c0:c1], heads, dim),
        _to_kernel(out[:, r0:r1].to(q.dtype), heads, dim),
        lse[:, :, r0:r1].float(),
        causal=layout.kind == "causal",
        scale=scale,
    )  # (B, nh, T', dim), (B, nh, S', dim) x 2
    dq[:, r0:r1] = block_dq[..., :hd].float().transpose(1, 2)
    dk[:, c0:c1] = _fold(block_dk, kv_heads, hd)
    dv[:, c0:c1] = _fold(block_dv, kv_heads, hdv)
    return dq, dk, dv


# -- FlexAttention, for general masks ---------------------------------------------------------------------
def flex_available() -> bool:
    """FlexAttention's compiled kernel can be built here (its module and Triton import)."""
    spec = importlib.util.find_spec
    return spec("triton") is not None and spec("torch.nn.attention.flex_attention") is not None


def flex_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> bool:
    """Whether ``flex_forward``/``flex_backward`` may run: ``fast_inputs``, a ``BlockMask``, head dims >= 16."""
    dims = min(q.shape[-1], v.shape[-1]) >= MIN_FLEX_HEAD_DIM
    return layout.block_mask is not None and dims and fast_inputs(q, k, v)


def flex_block_mask(mask: torch.Tensor) -> Any:
    """FlexAttention's ``BlockMask`` of the dense ``mask (B or 1, T, S)`` (batch broadcast when 1)."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, queries, keys = mask.shape
    if batch == 1:  # the kernel calls mask_mod with every row's b: one mask for all of them
        single = mask[0]  # (T, S)

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return single[q_idx, kv_idx]

    else:

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return mask[b, q_idx, kv_idx]

    return create_block_mask(mask_mod, batch, None, queries, keys, device=mask.device)


@functools.cache
def _compiled_flex() -> Callable[..., Any]:
    """``torch.compile(flex_attention)``, built once per process: eager FlexAttention materialises the scores."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, block_mask: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``partial_attention`` through FlexAttention, differentiable (the log-sum-exp too): ``out (B, T, nh, hdv)``
    and ``lse (B, nh, T)``, fp32; a query that sees nothing gets 0 and ``-inf``."""
    from torch.nn.attention.flex_attention import AuxRequest

    out, aux = _compiled_flex()(
        q.transpose(1, 2),  # (B, nh, T, hd)
        k.transpose(1, 2),  # (B, nkv, S, hd)
        v.transpose(1, 2),  # (B, nkv, S, hdv)
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
        return_aux=AuxRequest(lse=True),
    )  # (B, nh, T, hdv), lse (B, nh, T)
    return out.transpose(1, 2).float(), aux.lse.float()


def flex_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    scale: float,
    block_mask: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's ``(dq, dk, dv)`` (fp32) through FlexAttention, given the merged ``out``, ``lse`` and
    ``grad_out`` (``backward_by_recompute``)."""
    forward = functools.partial(flex_forward, scale=scale, block_mask=block_mask)
    return backward_by_recompute(forward, q, k, v, out, lse, grad_out)


def backward_by_recompute(
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block's ``(dq, dk, dv)`` (fp32) given the merged ``out (B, T, nh, hdv)``, ``lse (B, nh, T)`` and
    ``grad_out``, from a differentiable ``forward(q, k, v) -> (o_i, l_i)`` of the block alone: ``(o_i, l_i)``
    recomputed and the merge's gradients back-propagated into them (module docstring)."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        block_out, block_lse = forward(*leaves)  # (B, T, nh, hdv), (B, nh, T)
        seen = torch.isfinite(block_lse)
        weight = torch.where(seen, torch.exp(block_lse.detach() - lse), torch.zeros_like(lse))  # (B, nh, T)
        do = grad_out.float()  # (B, T, nh, hdv)
        own = (do * block_out.detach()).sum(-1).transpose(1, 2)  # (B, nh, T)
        merged = (do * out.float()).sum(-1).transpose(1, 2)  # (B, nh, T)
        grads = torch.autograd.grad(
            (block_out, block_lse), leaves, (do * weight.transpose(1, 2)[..., None], weight * (own - merged))
        )
    dq, dk, dv = (g.float() for g in grads)
    return dq, dk, dv
