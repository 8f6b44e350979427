"""``lse_kernels``: the fast path of ``lse_merge`` against the fp32 reference.

On CPU the fast path runs with ``MathKernel``, a plain-torch stand-in with flash-attention's contract
(no mask, causal or not, equal head dims that are a multiple of 8, the backward from whatever output and
log-sum-exp it is handed), so everything around the kernel (mask description, the rectangle cut, MLA
padding, GQA repeat and fold, fully masked rows, the merged-statistics backward, the autograd
wrapper) is checked here, and the real kernels' ATen calls on the meta device (argument order and types).
The ``gpu`` tests run the real flash kernel through ``partial_attention``'s dispatch (packed documents: flash
for the causal and rectangle blocks, the reference for the general ones) on bf16 inputs against the fp32
reference.

The masks are the real ones of the ``cp`` zig-zag split (``cp_split.plan_split``) plus packed documents.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mcore_parallel.cp_split import SplitPlan, plan_split
from mcore_parallel.lse_kernels import (
    BlockLayout,
    FlashKernel,
    backward_by_recompute,
    describe_mask,
    fast_backward,
    fast_forward,
    flash_kernel,
    flex_block_mask,
)
from mcore_parallel.lse_merge import (
    fast_partial_attention,
    merge_with_lse,
    partial_attention,
    partial_attention_backward,
    reference_partial_attention,
    reference_partial_attention_backward,
)
from mcore_testing.numerics import assert_rel_close


class MathKernel:
    """flash-attention's contract in fp32 torch (module docstring); head dims rounded up to 8 like flash's."""

    def head_dim(self, hd: int, hdv: int) -> int | None:
        return -(-max(hd, hdv) // 8) * 8

    def _probs(self, q, k, lse, causal, scale):  # (B, nh, T, S) = exp(scores - lse)
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        if causal:
            scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1) if lse is None else lse
        return torch.exp(scores - lse[..., None]), lse

    def forward(self, q, k, v, *, causal, scale):
        assert q.shape[-1] == k.shape[-1] == v.shape[-1] and q.shape[-1] % 8 == 0 and q.shape[1] == k.shape[1]
        probs, lse = self._probs(q, k, None, causal, scale)
        return (probs @ v.float()).to(q.dtype), lse

    def backward(self, grad, q, k, v, out, lse, *, causal, scale):
        probs, _ = self._probs(q, k, lse, causal, scale)  # with the lse it is handed (the merged one)
        do = grad.float()
        dv = probs.transpose(-1, -2) @ do
        ds = probs * (do @ v.float().transpose(-1, -2) - (do * out.float()).sum(-1, keepdim=True)) * scale
        return (ds @ k.float()).to(q.dtype), (ds.transpose(-1, -2) @ q.float()).to(k.dtype), dv.to(v.dtype)


def zigzag_masks(cp: int, seq: int, batch: int = 1, cu_seqlens: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Rank 0's ... and every rank's block masks of the real split: ``masks[r * cp + j]`` is rank ``r``'s
    queries against rank ``j``'s keys, ``(B, L, L)``."""
    plan: SplitPlan = plan_split(cu_seqlens, batch, seq, cp, torch.device("cpu"))
    masks = []
    for r, j in itertools.product(range(cp), repeat=2):
        qi, qd = plan.index[r][:, :, None], plan.docs[r][:, :, None]
        ki, kd = plan.index[j][:, None, :], plan.docs[j][:, None, :]
        masks.append((qd >= 0) & (kd == qd) & (ki <= qi))
    return masks


def test_zigzag_blocks_are_causal_or_rectangles() -> None:
    """The ring's blocks without documents: causal against itself, the first half of the keys of an earlier
    rank, the second half of the queries against a later rank; all fast, none general."""
    cp, seq = 3, 24
    half = seq // cp // 2
    masks = zigzag_masks(cp, seq, batch=2)
    for r, j in itertools.product(range(cp), repeat=2):
        layout = describe_mask(masks[r * cp + j], 2 * half, 2 * half)
        if r == j:
            assert (layout.kind, layout.rows, layout.cols) == ("causal", (0, 2 * half), (0, 2 * half))
        elif j < r:
            assert (layout.kind, layout.rows, layout.cols) == ("full", (0, 2 * half), (0, half))
        else:
            assert (layout.kind, layout.rows, layout.cols) == ("full", (half, 2 * half), (0, 2 * half))


def test_describe_mask_other_kinds() -> None:
    none = describe_mask(None, 3, 5)
    assert (none.kind, none.rows, none.cols, none.mask) == ("full", (0, 3), (0, 5), None)
    assert describe_mask(torch.zeros(1, 3, 5, dtype=torch.bool), 3, 5).kind == "empty"
    docs = zigzag_masks(2, 16, cu_seqlens=torch.tensor([0, 5, 16]))
    assert describe_mask(docs[0], 4, 4).kind == "general"  # two documents on the diagonal
    rows_differ = torch.ones(2, 4, 4, dtype=torch.bool)
    rows_differ[1, 0] = False
    assert describe_mask(rows_differ, 4, 4).kind == "general"
    gap = torch.ones(1, 4, 4, dtype=torch.bool)
    gap[:, :, 1] = False  # keys 0 and 2..3 seen: not one run
    assert describe_mask(gap, 4, 4).kind == "general"
    upper = torch.ones(4, 4, dtype=torch.bool).triu()[None]  # square but not causal
    assert describe_mask(upper, 4, 4).kind == "general"
    corner = torch.zeros(1, 6, 6, dtype=torch.bool)
    corner[:, 2:5, 1:4] = torch.ones(3, 3, dtype=torch.bool).tril()
    layout = describe_mask(corner, 6, 6)
    assert (layout.kind, layout.rows, layout.cols) == ("causal", (2, 5), (1, 4))


CASES = [  # (B, L, nh, nkv, hd, hdv, cp)
    (2, 8, 4, 4, 8, 8, 2),
    (1, 6, 6, 2, 12, 12, 3),  # GQA, head dim padded to 16
    (1, 8, 4, 1, 12, 6, 2),  # MQA, MLA value dim != key dim
]


def _qkv(case, seed, dtype=torch.float32, device="cpu"):
    b, length, nh, nkv, hd, hdv, _ = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, length, nh, hd, generator=g)
    k = torch.randn(b, length, nkv, hd, generator=g)
    v = torch.randn(b, length, nkv, hdv, generator=g)
    return [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v)]


def _ring(case, rank, masks, run, backward, seed, dtype=torch.float32, device="cpu"):
    """One rank's ring: every key rank's block through ``run`` merged, then each block's backward from the
    merged output/lse through ``backward``; returns the merged output and ``(dq, [dk_j], [dv_j])``."""
    cp = case[-1]
    blocks = [[x.detach() for x in _qkv(case, seed + j, dtype, device)[1:]] for j in range(cp)]
    q = _qkv(case, seed + rank, dtype, device)[0].detach()
    scale = 1 / math.sqrt(q.shape[-1])
    parts = [run(q, k, v, scale, masks[rank * cp + j]) for j, (k, v) in enumerate(blocks)]
    out, lse = merge_with_lse(parts)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    grads = [backward(q, k, v, out, lse, grad, scale, masks[rank * cp + j]) for j, (k, v) in enumerate(blocks)]
    return out, (sum(g[0] for g in grads), [g[1] for g in grads], [g[2] for g in grads])


@pytest.mark.parametrize("case", CASES)
def test_fast_path_equals_reference_on_zigzag_blocks(case) -> None:
    """The fast path (stand-in kernel) on every rank's ring equals the reference, forward and the
    merged-statistics backward; fully masked query rows of a block give 0 and -inf, no NaN."""
    kernel, length, cp = MathKernel(), case[1], case[-1]
    masks = zigzag_masks(cp, length * cp, batch=case[0])
    with torch.no_grad():
        for rank in range(cp):

            def fast(q, k, v, scale, mask):
                return fast_partial_attention(kernel, q, k, v, scale=scale, layout=describe_mask(mask, length, length))

            def ref(q, k, v, scale, mask):
                return reference_partial_attention(q, k, v, scale=scale, mask=mask)

            def fast_bwd(q, k, v, out, lse, grad, scale, mask):
                layout = describe_mask(mask, length, length)
                return fast_backward(kernel, q, k, v, out, lse, grad, scale=scale, layout=layout)

            def ref_bwd(q, k, v, out, lse, grad, scale, mask):
                return reference_partial_attention_backward(q, k, v, out, lse, grad, scale=scale, mask=mask)

            out, (dq, dks, dvs) = _ring(case, rank, masks, fast, fast_bwd, seed=10 * sum(case))
            want, (rdq, rdks, rdvs) = _ring(case, rank, masks, ref, ref_bwd, seed=10 * sum(case))
            assert_rel_close(out, want, 1e-5, name=f"rank {rank} output")
            assert_rel_close(dq, rdq, 1e-5, name=f"rank {rank} dq")
            for j in range(cp):
                assert_rel_close(dks[j], rdks[j], 1e-5, name=f"rank {rank} dk of block {j}")
                assert_rel_close(dvs[j], rdvs[j], 1e-5, name=f"rank {rank} dv of block {j}")
    q, k, v = _qkv(case, 1)
    later = masks[1]  # rank 0 against rank 1: the first half of the queries sees nothing
    out, lse = fast_partial_attention(kernel, q, k, v, scale=0.5, layout=describe_mask(later, length, length))
    assert (out[:, : length // 2] == 0).all() and torch.isinf(lse[:, :, : length // 2]).all()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("lse_used", [False, True])
def test_fast_autograd_equals_reference(lse_used: bool) -> None:
    """The differentiable fast path: the kernel's backward when only the output is used (all-gather, a2a),
    the reference's when the log-sum-exp gets a gradient (a merge under autograd)."""
    case = CASES[2]
    kernel, length = MathKernel(), case[1]
    mask = zigzag_masks(2, 2 * length)[0]  # causal
    q, k, v = _qkv(case, 4)
    grad = torch.randn(q.shape[0], length, q.shape[2], v.shape[-1], generator=torch.Generator().manual_seed(2))
    results = []
    for run in (
        lambda: fast_partial_attention(kernel, q, k, v, scale=0.4, layout=describe_mask(mask, length, length)),
        lambda: reference_partial_attention(q, k, v, scale=0.4, mask=mask),
    ):
        out, lse = run()
        loss = (out * grad).sum() + (lse.exp().sum() if lse_used else 0)
        results.append((out, torch.autograd.grad(loss, (q, k, v))))
    (out, got), (want, ref) = results
    assert_rel_close(out, want, 1e-5, name="output")
    for name, a, b in zip("qkv", got, ref, strict=True):
        assert_rel_close(a, b, 1e-5, name=f"grad of {name}")


@pytest.mark.parametrize("case", CASES)
def test_backward_by_recompute_equals_block_backward(case) -> None:
    """FlexAttention's block backward (a recompute of the block and the merge's gradients pushed into its
    output and log-sum-exp), here around the reference forward, equals the flash-style block backward on
    packed documents with padding (rows that see nothing in a block, or nothing at all)."""
    cp = case[-1]
    masks = zigzag_masks(cp, 12 * cp, batch=case[0], cu_seqlens=torch.tensor([0, 5, 12 * cp]))
    case = (case[0], masks[0].shape[-1], *case[2:])

    def recompute(q, k, v, out, lse, grad, scale, mask):
        def forward(q, k, v):
            return reference_partial_attention(q, k, v, scale=scale, mask=mask)

        return backward_by_recompute(forward, q, k, v, out, lse, grad)

    def ref(q, k, v, scale, mask):
        return reference_partial_attention(q, k, v, scale=scale, mask=mask)

    def ref_bwd(q, k, v, out, lse, grad, scale, mask):
        return reference_partial_attention_backward(q, k, v, out, lse, grad, scale=scale, mask=mask)

    for rank in range(cp):
        with torch.no_grad():
            _, (dq, dks, dvs) = _ring(case, rank, masks, ref, recompute, seed=5)
            _, (rdq, rdks, rdvs) = _ring(case, rank, masks, ref, ref_bwd, seed=5)
        assert_rel_close(dq, rdq, 1e-5, name=f"rank {rank} dq")
        for j in range(cp):
            assert_rel_close(dks[j], rdks[j], 1e-5, name=f"rank {rank} dk {j}")
            assert_rel_close(dvs[j], rdvs[j], 1e-5, name=f"rank {rank} dv {j}")


@pytest.mark.parametrize("kernel", [FlashKernel()], ids=["flash"])
@pytest.mark.parametrize("kind", ["full", "causal"])
def test_kernel_calls_match_the_aten_schemas(kernel: FlashKernel, kind: str) -> None:
    """The real kernels' ATen calls on the meta device (shapes only): arguments in the order and of the
    types the ops take, MLA padding and GQA repeat giving back the callers' shapes."""
    meta = {"device": "meta", "dtype": torch.bfloat16}
    q, k, v = torch.empty(2, 24, 8, 96, **meta), torch.empty(2, 24, 2, 96, **meta), torch.empty(2, 24, 2, 64, **meta)
    layout = BlockLayout(kind=kind, rows=(4, 20), cols=(2, 18), mask=None)  # type: ignore[arg-type]
    out, lse = fast_forward(kernel, q, k, v, scale=0.1, layout=layout)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((2, 24, 8, 64), torch.float32, (2, 8, 24), torch.float32)
    dq, dk, dv = fast_backward(kernel, q, k, v, out, lse, out, scale=0.1, layout=layout)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("batch_mask", [1, 2])
def test_flex_block_mask_and_lse_agree_with_the_reference(batch_mask: int) -> None:
    """FlexAttention (eager on CPU, forward only: torch has no CPU backward) with ``flex_block_mask`` of a packed
    documents mask (per row, or one for the batch) gives the reference's output and natural-log lse, 0 and
    -inf where a query sees nothing."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    masks = zigzag_masks(2, 40, batch=2, cu_seqlens=torch.tensor([0, 13, 40, 57, 80]))
    mask = masks[1][:batch_mask]  # rank 0's queries against rank 1's keys: padding and documents
    q, k, v = (x.detach() for x in _qkv((2, mask.shape[-1], 4, 2, 16, 16, 2), 8))
    want, want_lse = reference_partial_attention(q, k, v, scale=0.3, mask=mask)
    out, aux = flex_attention(
        *(x.transpose(1, 2) for x in (q, k, v)),
        block_mask=flex_block_mask(mask),
        scale=0.3,
        enable_gqa=True,
        return_aux=AuxRequest(lse=True),
    )
    assert torch.isinf(want_lse).any()
    assert_rel_close(out.transpose(1, 2), want, 1e-5, name="flex output")
    assert torch.equal(torch.isinf(aux.lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    assert_rel_close(aux.lse[finite], want_lse[finite], 1e-5, name="flex lse")


def test_cpu_and_fp32_take_the_reference() -> None:
    q, k, v = _qkv(CASES[0], 0)
    assert flash_kernel(q, k, v) is None
    layout = BlockLayout(kind="causal", rows=(0, 8), cols=(0, 8), mask=torch.ones(8, 8, dtype=torch.bool).tril()[None])
    out, lse = partial_attention(q, k, v, scale=0.3, mask=layout)  # a layout is accepted, its dense mask used
    want, want_lse = reference_partial_attention(q, k, v, scale=0.3, mask=layout.mask)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


# -- GPU: the real kernel through the dispatch -------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the flash kernel)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    ("case", "docs"),
    [
        ((2, 64, 4, 4, 64, 64, 2), False),
        ((1, 96, 8, 2, 128, 128, 3), False),
        ((1, 64, 4, 1, 96, 64, 2), False),  # MLA: value dim != key dim
        ((1, 96, 8, 2, 128, 128, 3), True),  # packed documents: FlexAttention
        ((1, 64, 4, 1, 96, 64, 2), True),
    ],
)
def test_gpu_fast_ring_equals_reference(case, docs: bool) -> None:
    """bf16 on the fast path (flash-attention; FlexAttention for packed documents) against the fp32 reference
    on every rank's ring: output, log-sum-exp and the merged-statistics gradients within bf16's 1e-2."""
    cp = case[-1]
    cu = torch.tensor([0, 37, case[1] * cp]) if docs else None
    masks = [m.cuda() for m in zigzag_masks(cp, case[1] * cp, batch=case[0], cu_seqlens=cu)]
    length = masks[0].shape[-1]  # documents padded to a multiple of 2 * cp: longer than case[1]
    case = (case[0], length, *case[2:])
    q, k, v = _qkv(case, 0, torch.bfloat16, "cuda")
    if docs:  # the general masks take the reference (no BlockMask attached), the others flash
        layouts = [describe_mask(m, length, length) for m in masks]
        assert any(lay.kind == "general" for lay in layouts)
        assert all(lay.block_mask is None for lay in layouts if lay.kind == "general")
    else:
        assert flash_kernel(q, k, v) is not None, "the flash kernel is not usable on this GPU"
        assert all(describe_mask(m, length, length).kind != "general" for m in masks)
    seed = sum(case)
    for rank in range(cp):
        runs = {}
        for name, dtype in (("fast", torch.bfloat16), ("ref", torch.float32)):
            blocks = [[x.detach().to("cuda", dtype) for x in _qkv(case, seed + j)[1:]] for j in range(cp)]
            q = _qkv(case, seed + rank)[0].detach().to("cuda", dtype)
            scale = 1 / math.sqrt(q.shape[-1])
            layouts = [describe_mask(masks[rank * cp + j], length, length) for j in range(cp)]
            parts = [partial_attention(q, k, v, scale=scale, mask=lay) for (k, v), lay in zip(blocks, layouts)]
            out, lse = merge_with_lse(parts)
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).cuda()
            grads = [
                partial_attention_backward(q, k, v, out, lse, grad, scale=scale, mask=lay)
                for (k, v), lay in zip(blocks, layouts)
            ]
            runs[name] = (out, lse, sum(g[0] for g in grads), [g[1] for g in grads], [g[2] for g in grads])
        (out, lse, dq, dks, dvs), (rout, rlse, rdq, rdks, rdvs) = runs["fast"], runs["ref"]
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
        assert_rel_close(out, rout, 1e-2, name=f"rank {rank} output")
        assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
        finite = torch.isfinite(rlse)
        assert_rel_close(lse[finite], rlse[finite], 1e-2, name=f"rank {rank} lse")
        assert_rel_close(dq, rdq, 1e-2, name=f"rank {rank} dq")
        for j in range(cp):
            assert_rel_close(dks[j], rdks[j], 1e-2, name=f"rank {rank} dk {j}")
            assert_rel_close(dvs[j], rdvs[j], 1e-2, name=f"rank {rank} dv {j}")


@pytest.mark.gpu
@gpu
def test_gpu_flash_autograd_and_empty_block() -> None:
    """The differentiable flash path (all-gather/a2a use it) against the reference; an empty block gives 0,
    -inf and zero gradients."""
    case = (2, 128, 8, 4, 64, 64, 1)
    q, k, v = _qkv(case, 3, torch.bfloat16, "cuda")
    mask = torch.ones(128, 128, dtype=torch.bool, device="cuda").tril()[None]
    layout = describe_mask(mask, 128, 128)
    out, _ = partial_attention(q, k, v, scale=0.125, mask=layout)
    grad = torch.randn(out.shape, device="cuda")
    got = torch.autograd.grad(out, (q, k, v), grad)
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    want, _ = reference_partial_attention(*leaves, scale=0.125, mask=mask)
    ref = torch.autograd.grad(want, leaves, grad)
    assert_rel_close(out, want, 1e-2, name="output")
    for name, a, b in zip("qkv", got, ref, strict=True):
        assert a.dtype == torch.bfloat16
        assert_rel_close(a.float(), b, 1e-2, name=f"grad of {name}")
    empty = describe_mask(torch.zeros_like(mask), 128, 128)
    out, lse = partial_attention(q, k, v, scale=0.125, mask=empty)
    assert (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv = partial_attention_backward(q, k, v, out, lse, grad, scale=0.125, mask=empty)
    assert not dq.any() and not dk.any() and not dv.any()
