"""Backward of the Triton chunked gated delta rule: a reverse walk over the chunks, then the per-chunk terms'
gradients in parallel (``mcore_ssm.gdn_triton_chunk_bwd``).

Shape legend: N tokens, S segments, M chunks, hv value heads, dk key dim, dv value dim, C = 64, BV a block of
value dims.

The forward (``mcore_ssm.gdn_triton``) is per chunk, with the per-chunk terms ``W``, ``U~`` (the WY factors),
``P = tril(scale Q K^T * exp(G_i - G_j))``, ``Qe = scale Q exp(G)``, ``K~ = exp(G_C - G) K`` and
``gamma = exp(G_C)`` (all functions of the chunk's own tokens), and the sequential part, per segment::

    U = U~ - W S;   O = Qe S + P U;   S' = gamma S + K~^T U

Backward, walking each segment's chunks in reverse with ``dS'`` (the final state's gradient, else zero):
``dU = P^T dO + K~ dS'``; ``dS = Qe^T dO + gamma dS' - W^T dU``. ``P^T dO`` needs no state: ``_local_du_kernel``
forms it for all chunks in parallel first. The walk, ``_chunk_state_bwd_kernel`` (one program per segment, value
head and block of BV value dims, like the forward's state kernel), then only adds ``K~ dS'`` and carries ``dS``:
no ``(C, C)`` work in the sequential loop; it stores ``dU`` and the ``dS'`` leaving each chunk (fp32), nothing
else; ``dS`` at each segment's start is the initial state's gradient. Offline sm_90 builds (Triton 3.9, 2026-12-06,
dk = dv = 128, bf16, 8 warps, pointers not marked aligned): the walk 255 registers, 288 bytes spilled, 64 KB shared
memory at 32 value columns (the walk it replaced: 2 KB spilled, 208 KB); ``_local_du_kernel`` 150 registers, no
spill. With the pointers marked 16-byte aligned, as the launcher marks torch's tensors (2026-12-07): 255 / 136 bytes
/ 60 KB and 89 registers.

``MCORE_SSM_GDN_STATE_BWD=v2`` (the default since 2026-12-07; ``v1`` runs this module's walk, as dk > 128 does)
runs ``gdn_triton_state_bwd_v2`` instead: the
same walk with the state gradient as 64-key blocks at 4 warps (aligned offline builds: 255 registers, 8 bytes
spilled, 32 KB, two programs an SM, against 255 / 136 bytes / 60 KB and one an SM here; RESULTS.md).

``MCORE_SSM_GDN_BWD_SCRATCH=inputs`` (the default since 2026-12-07, when both ran on an H100: fwd + bwd 17.31
against 21.84 ms; ``fp32`` for the old; 16-bit inputs, split terms): the rerun's
factors and states, ``dS'`` and the split terms' ``dR_u`` in the inputs' dtype instead of fp32, and the dots that take
them on 16-bit operands (fp32 accumulate): ~6 of ~22 GB of the backward's traffic at the bench shape (RESULTS.md,
"Where the GDN backward's ~20 ms go"). ``dU``, ``T``, the carried ``dS'`` and every partial sum stay fp32.

Everything else is parallel over chunks, in ``gdn_triton_chunk_bwd_split`` (the default) or
``gdn_triton_chunk_bwd``: the terms' gradients ``dU~ = dU``, ``dW = -dU S^T``, ``dQe = dO S^T``, ``dP = dO U^T``,
``dK~ = U dS'^T``, ``dgamma = <S, dS'>`` (from the chunk states and ``U`` of the forward's kernels, rerun here in
fp32: ``rerun_forward``) carried on to ``q, k, v, g, beta``. The walk used to write those terms itself, per block
of value dims (partial sums of ``(C, dk)`` and ``(C, C)`` fp32 tiles, summed after: ~7.5 GB at the bench shape),
then differentiate torch's per-chunk terms by autograd; ``_chunk_terms`` (that torch form) stays here as the test
oracle (``chunk_terms_bwd_reference``).

Exps: ``exp(G_i - G_j)`` takes the sum of the gates between ``j`` and ``i`` (a ``(C, C)`` cumsum), not the
difference of two ``G``: at gates of -30 a token ``G`` reaches -2000 in a chunk and its rounding (~1e-4) would be the
relative error of the terms next to the diagonal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcore_ssm.gdn_triton import CHUNK, Launch, prepare, run_states, scratch_dtype
from mcore_ssm.gdn_triton_chunk_bwd import chunk_terms_bwd
from mcore_ssm.gdn_triton_chunk_bwd_split import chunk_terms_bwd_split
from mcore_ssm.kernel_choice import GdnKernels
from mcore_ssm.segsum import segsum


@triton.jit
def _local_du_kernel(
    q_ptr,  # (N, hk, dk)
    k_ptr,  # (N, hk, dk)
    g_ptr,  # (N, hv) fp32: the gates
    dout_ptr,  # (N, hv, dv) the output's dtype: dO
    du_ptr,  # (N, hv, dv) fp32 out: P^T dO, the part of dU within the chunk
    chunk_start_ptr,  # (M,) int64
    chunk_len_ptr,  # (M,) int64
    scale,
    HK: tl.constexpr,
    HV: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``P^T dO`` of each chunk, all chunks in parallel (one program per chunk and value head), so that the
    reverse walk only adds ``K~ dS'`` to it."""
    chunk = tl.program_id(0)
    head = tl.program_id(1)
    qk_head = head // (HV // HK)
    start = tl.load(chunk_start_ptr + chunk)
    count = tl.load(chunk_len_ptr + chunk)

    rows = tl.arange(0, C)  # (C,)
    dks = tl.arange(0, BK)  # (BK,)
    valid = rows < count
    flat = start + rows  # (C,)
    qk_off = (flat[:, None] * HK + qk_head) * DK + dks[None, :]  # (C, BK)
    qk_mask = valid[:, None] & (dks < DK)[None, :]
    q = tl.load(q_ptr + qk_off, mask=qk_mask, other=0.0)  # (C, BK) inputs' dtype
    k = tl.load(k_ptr + qk_off, mask=qk_mask, other=0.0)  # (C, BK)
    g = tl.load(g_ptr + flat * HV + head, mask=valid, other=0.0)  # (C,)
    lower = rows[:, None] >= rows[None, :]  # (C, C) j <= i
    # exp(G_i - G_j) as the exp of the sum of the g between (no difference of two G: see gdn_triton_chunk_bwd)
    between = tl.cumsum(tl.where(rows[:, None] > rows[None, :], g[:, None], 0.0), axis=0)  # (C, C)
    ratio = tl.exp(tl.where(lower, between, float("-inf")))  # (C, C) j <= i only
    # Q K^T on the inputs' dtype: products of 16-bit inputs are exact in the fp32 accumulator
    p = tl.where(lower, tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale * ratio, 0.0)  # (C, C) P
    p_t = tl.trans(p)  # (C, C)
    for v_first in range(0, DV, BV):
        dvs = v_first + tl.arange(0, BV)  # (BV,)
        v_off = (flat[:, None] * HV + head) * DV + dvs[None, :]  # (C, BV)
        v_mask = valid[:, None] & (dvs < DV)[None, :]
        dout = tl.load(dout_ptr + v_off, mask=v_mask, other=0.0).to(tl.float32)  # (C, BV)
        tl.store(du_ptr + v_off, tl.dot(p_t, dout, input_precision=PRECISION), mask=v_mask)


@triton.jit
def _chunk_state_bwd_kernel(
    q_ptr,  # (N, hk, dk)
    k_ptr,  # (N, hk, dk)
    w_ptr,  # (N, hv, dk) scratch dtype (fp32, or 16-bit with MCORE_SSM_GDN_BWD_SCRATCH=inputs): W
    g_ptr,  # (N, hv) fp32: the gates
    dout_ptr,  # (N, hv, dv) the output's dtype: dO
    dht_ptr,  # (S, hv, dk, dv) fp32 (unused without HAS_DHT)
    dh0_ptr,  # (S, hv, dk, dv) fp32 out
    du_ptr,  # (N, hv, dv) fp32 in: P^T dO (``_local_du_kernel``), out: dU (= dU~)
    dstates_ptr,  # (M, hv, dk, dv) scratch dtype out: dS', the gradient of the state leaving each chunk
    starts_ptr,  # (S,) int64
    lengths_ptr,  # (S,) int64
    first_chunk_ptr,  # (S,) int64
    scale,
    HK: tl.constexpr,
    HV: tl.constexpr,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    HAS_DHT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # the value blocks of one (segment, head) are neighbours in the launch order: they run at once and walk the
    # same chunks, so their shared loads (q, k, W, g) come from L2
    vblock = tl.program_id(0) % tl.cdiv(DV, BV)
    seg = (tl.program_id(0) // tl.cdiv(DV, BV)).to(tl.int64)  # int64: seg * hv * dk * dv passes 2^31 (documents)
    head = tl.program_id(1)
    qk_head = head // (HV // HK)
    start = tl.load(starts_ptr + seg)
    length = tl.load(lengths_ptr + seg)
    first_chunk = tl.load(first_chunk_ptr + seg)
    # the dots' operand dtype: fp32 (tf32 / ieee dots) or the 16-bit scratch (fp32 accumulate); dS' carried in fp32
    scratch = dstates_ptr.dtype.element_ty

    rows = tl.arange(0, C)  # (C,)
    dks = tl.arange(0, BK)  # (BK,)
    dvs = vblock * BV + tl.arange(0, BV)  # (BV,)
    kmask = dks < DK
    vmask = dvs < DV
    state_mask = kmask[:, None] & vmask[None, :]
    state_cols = dks[:, None] * DV + dvs[None, :]  # (BK, BV) inside one (dk, dv) state
    seg_state = (seg * HV + head) * DK * DV + state_cols
    if HAS_DHT:
        dstate = tl.load(dht_ptr + seg_state, mask=state_mask, other=0.0)  # (BK, BV) dS'
    else:
        dstate = tl.zeros((BK, BV), dtype=tl.float32)

    count = (length + C - 1) // C
    for back in range(0, count):
        j = count - 1 - back  # chunks in reverse
        chunk_id = (first_chunk + j).to(tl.int64)
        tl.store(dstates_ptr + (chunk_id * HV + head) * DK * DV + state_cols, dstate.to(scratch), mask=state_mask)
        tok = j * C + rows  # (C,) position in the segment
        valid = tok < length
        flat = start + tok  # (C,)
        qk_off = (flat[:, None] * HK + qk_head) * DK + dks[None, :]  # (C, BK)
        qk_mask = valid[:, None] & kmask[None, :]
        g = tl.load(g_ptr + flat * HV + head, mask=valid, other=0.0)  # (C,)
        cum = tl.cumsum(g, axis=0)  # (C,) G (rows past the end: G_C)
        # G_C - G_i = sum_{l > i} g_l: a reverse cumsum of the next token's gate (no difference of two G)
        after = (rows < C - 1) & (tok + 1 < length)
        to_end = tl.cumsum(tl.load(g_ptr + (flat + 1) * HV + head, mask=after, other=0.0), axis=0, reverse=True)
        qe = tl.load(q_ptr + qk_off, mask=qk_mask, other=0.0).to(tl.float32) * (scale * tl.exp(cum))[:, None]  # Qe
        kt = tl.load(k_ptr + qk_off, mask=qk_mask, other=0.0).to(tl.float32) * tl.exp(to_end)[:, None]  # K~
        w = tl.load(w_ptr + (flat[:, None] * HV + head) * DK + dks[None, :], mask=qk_mask, other=0.0)  # (C, BK)
        v_off = (flat[:, None] * HV + head) * DV + dvs[None, :]  # (C, BV)
        v_mask = valid[:, None] & vmask[None, :]
        dout = tl.load(dout_ptr + v_off, mask=v_mask, other=0.0).to(scratch)  # (C, BV)
        du = tl.load(du_ptr + v_off, mask=v_mask, other=0.0)  # (C, BV) P^T dO
        gamma = tl.exp(tl.sum(tl.where(rows == C - 1, cum, 0.0), axis=0))  # e^{G_C}

        du += tl.dot(kt.to(scratch), dstate.to(scratch), input_precision=PRECISION)  # dU = P^T dO + K~ dS'
        dstate_prev = tl.dot(tl.trans(qe.to(scratch)), dout, input_precision=PRECISION) + gamma * dstate  # (BK, BV)
        dstate = dstate_prev - tl.dot(tl.trans(w.to(scratch)), du.to(scratch), input_precision=PRECISION)
        tl.store(du_ptr + v_off, du, mask=v_mask)

    tl.store(dh0_ptr + seg_state, dstate, mask=state_mask)


def _chunk_index(launch: Launch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N,)`` chunk and ``(N,)`` row in it of every token (chunks as ``chunk_layout`` numbers them)."""
    segments = launch.segments
    return launch.first_chunk[segments.seg] + segments.pos // CHUNK, segments.pos % CHUNK


def _to_chunks(x: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor], chunks: int) -> torch.Tensor:
    """``(N, hv, ...)`` -> ``(M, hv, C, ...)``, zeros past each segment's end (differentiable)."""
    out = x.new_zeros(chunks, CHUNK, *x.shape[1:]).index_put(index, x)  # (M, C, hv, ...)
    return out.transpose(1, 2)


def _chunk_terms(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, launch: Launch
) -> tuple[torch.Tensor, ...]:
    """The per-chunk terms ``(W, U~, P, Qe, K~, gamma)`` of every chunk in torch, as the kernels compute them:
    ``(M, hv, C, dk)``, ``(M, hv, C, dv)``, ``(M, hv, C, C)``, ``(M, hv, C, dk)``, ``(M, hv, C, dk)``, ``(M, hv)``."""
    group = launch.hv // launch.hk
    index = _chunk_index(launch)
    chunks = launch.chunk_starts.numel()
    work = torch.float64 if v.dtype == torch.float64 else torch.float32  # float64 for a float64 oracle
    flat = [t.flatten(0, 1).to(work) for t in (q, k, v, g, beta)]  # (N, h, ...)
    qc = _to_chunks(flat[0].repeat_interleave(group, dim=1) * launch.scale, index, chunks)
    kc = _to_chunks(flat[1].repeat_interleave(group, dim=1), index, chunks)
    vc = _to_chunks(flat[2], index, chunks)
    gc, bc = (_to_chunks(t, index, chunks) for t in flat[3:])  # (M, hv, C)
    cum = gc.cumsum(-1)  # (M, hv, C)
    # exponents as sums of the g between two tokens (no difference of G): autograd then gives dg without the
    # cancellation that cost it ~3e-5 relative at gates of -30 per token
    between = segsum(gc)  # (M, hv, C, C) G_i - G_j, -inf for j > i
    ratio = between.exp()  # (M, hv, C, C)
    strict = (kc * bc[..., None]) @ kc.transpose(-1, -2) * ratio.tril(-1)
    eye = torch.eye(CHUNK, device=v.device, dtype=work)
    rhs = torch.cat([vc * bc[..., None], kc * (bc * cum.exp())[..., None]], dim=-1)
    u_tilde, w = torch.linalg.solve_triangular(eye + strict, rhs, upper=False, unitriangular=True).split(
        [launch.dv, launch.dk], dim=-1
    )
    p = qc @ kc.transpose(-1, -2) * ratio
    qe = qc * cum.exp()[..., None]
    last = cum[..., -1]  # (M, hv) G_C (padding adds 0)
    kt = kc * between[..., -1, :].exp()[..., None]  # exp(G_C - G) K
    return w, u_tilde, p, qe, kt, last.exp()


def chunk_terms_bwd_reference(
    launch: Launch,
    inputs: tuple[torch.Tensor, ...],
    saved: tuple[torch.Tensor, ...],
    grads: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, ...]:
    """The test oracle of ``gdn_triton_chunk_bwd.chunk_terms_bwd`` (same arguments): the terms' gradients
    ``dU~ = dU``, ``dW = -dU S^T``, ``dQe = dO S^T``, ``dK~ = U dS'^T``, ``dP = dO U^T``, ``dgamma = <S, dS'>``
    in torch, then autograd through ``_chunk_terms``; ``(dq, dk, dv, dg, dbeta)`` in float64 for float64 inputs."""
    u, states, dstates = saved
    dout, du = grads
    index = _chunk_index(launch)
    chunks = launch.chunk_starts.numel()
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in inputs]
        terms = _chunk_terms(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], launch)
        dtype = terms[0].dtype
        uc, doc, duc = (_to_chunks(t.to(dtype), index, chunks) for t in (u, dout, du))  # (M, hv, C, dv)
        s, ds = states.to(dtype), dstates.to(dtype)  # (M, hv, dk, dv)
        chunked = (
            -duc @ s.transpose(-1, -2),
            duc,
            doc @ uc.transpose(-1, -2),
            doc @ s.transpose(-1, -2),
            uc @ ds.transpose(-1, -2),
            (s * ds).sum((-1, -2)),
        )
        return torch.autograd.grad(terms, leaves, chunked)


def rerun_forward(
    launch: Launch,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    forward: str,
    *,
    keep_inverse: bool = False,
    inverse_by: str = "doubling",
    dtype: torch.dtype = torch.float32,
    blocks_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The forward's ``U (N, hv, dv)``, chunk states ``S (M, hv, dk, dv)``, ``W (N, hv, dk)`` in ``dtype`` (fp32 by
    default whatever the inputs; the 16-bit inputs' dtype with ``MCORE_SSM_GDN_BWD_SCRATCH=inputs``: then the very
    forward that ran) and, with ``keep_inverse``, each chunk's ``T (M, hv, C, C)`` fp32 (else None) (k, v contiguous;
    g, beta fp32 contiguous), by the same kernels as the forward: ``forward`` ``v2`` (the narrow WY launch and
    ``gdn_triton_state_v2``'s walk) or ``v1``, ``T`` by ``inverse_by`` (``kernel_choice.GDN_INVERSE``). Same
    quantities either way (the tests: v2's gradients within 1e-5 of v1's); v2 fits two programs an SM in offline
    builds (``benchmarks/offline_gdn_bwd.py``); ``blocks_first``: v2's walk in the launch order of
    ``MCORE_SSM_GDN_WALK_ORDER=blocks`` (same results)."""
    v2 = forward == "v2"
    assert forward in ("v1", "v2") and (launch.dims["BK"] <= 128 or not v2), (forward, launch.dims)
    chunks = launch.chunk_starts.numel()
    inverse = g.new_empty(chunks, launch.hv, CHUNK, CHUNK) if keep_inverse else None  # fp32, every entry written
    prepared = prepare(launch, k, v, g, beta, dtype, narrow=v2, inverse=inverse, inverse_by=inverse_by)
    if v2:  # blocks_first: v2's walk with its value blocks launched together (MCORE_SSM_GDN_WALK_ORDER=blocks)
        from mcore_ssm.gdn_triton_state_v2 import run_states_v2

        walked = run_states_v2(
            launch, k, prepared, initial_state, final=False, states_dtype=dtype, blocks_first=blocks_first
        )
    else:
        walked = run_states(launch, k, prepared, initial_state, final=False, states_dtype=dtype)
    vnew, states, _ = walked
    return vnew, states, prepared[0], inverse


def _run_state_bwd(
    launch: Launch,
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    dout: torch.Tensor,
    dht: torch.Tensor | None,
    du: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_chunk_state_bwd_kernel``: ``du`` (in: ``P^T dO``, out: ``dU``) in place; ``(dS' (M, hv, dk, dv) in ``w``'s
    dtype (the backward's scratch dtype), d initial state (S, hv, dk, dv) fp32)`` (the arguments of
    ``gdn_triton_state_bwd_v2.run_state_bwd_v2``)."""
    count, chunks = launch.segments.count, launch.chunk_starts.numel()
    hv, dk, dv = launch.hv, launch.dk, launch.dv
    dh0 = g.new_empty(count, hv, dk, dv)  # fp32
    dstates = w.new_empty(chunks, hv, dk, dv)
    # 32 value columns at every dk (offline sm_90 builds, bf16: dk 128 ~200-450 bytes spilled, dk 64 none; 64 columns
    # spilled 592 / 696 bytes)
    dims = {**launch.dims, "BV": max(16, min(32, triton.next_power_of_2(dv)))}
    _chunk_state_bwd_kernel[(triton.cdiv(dv, dims["BV"]) * count, hv)](
        q,
        k,
        w,
        g,
        dout,
        dht if dht is not None else g.new_empty(1),
        dh0,
        du,
        dstates,
        launch.segments.starts,
        launch.segments.lengths,
        launch.first_chunk,
        launch.scale,
        **dims,
        HAS_DHT=dht is not None,
        PRECISION=launch.precision,
        num_warps=launch.warps,
        num_stages=launch.stages,
    )
    return dstates, dh0


def chunk_gated_delta_rule_bwd(
    launch: Launch,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
    grad_out: torch.Tensor,
    grad_final: torch.Tensor | None,
    *,
    kernels: GdnKernels,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dq, dk, dv, dg, dbeta, d initial_state)`` (each in its input's dtype; the last ``None``
    without an initial state) of the forward's ``out`` (``grad_out (B, T, hv, dv)``) and final state; ``kernels``:
    what the forward chose (``kernel_choice.gdn_kernels_for``), its fp32 rerun by the same forward kernels."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    gf, bf = g.float().contiguous(), beta.float().contiguous()
    split = kernels.terms == "split"
    keep_inverse = split and kernels.pairs_t == "saved"
    # MCORE_SSM_GDN_BWD_SCRATCH=inputs: the rerun's factors and states, dS' and dR_u in the inputs' dtype for 16-bit
    # inputs (fp32 inputs keep fp32: scratch_dtype; the one-kernel terms take fp32 only)
    low = split and kernels.bwd_scratch == "inputs"
    scratch = scratch_dtype(q.dtype) if low else torch.float32
    vnew, states, w, inverse = rerun_forward(
        launch,
        k,
        v,
        gf,
        bf,
        initial_state,
        kernels.forward,
        keep_inverse=keep_inverse,
        inverse_by=kernels.inverse,
        dtype=scratch,
        blocks_first=kernels.walk_order == "blocks",
    )
    tokens, chunks = v.shape[0] * v.shape[1], launch.chunk_starts.numel()
    hv, dv = launch.hv, launch.dv
    dout = grad_out.contiguous()  # read in its dtype by the kernels (no fp32 copy)
    dht = grad_final.float().contiguous() if grad_final is not None else None
    du = gf.new_empty(tokens, hv, dv)  # fp32; every entry written (the segments cover every token): no fill
    widths = triton.next_power_of_2(dv)
    _local_du_kernel[(chunks, hv)](
        q,
        k,
        gf,
        dout,
        du,
        launch.chunk_starts,
        launch.chunk_lengths,
        launch.scale,
        **{**launch.dims, "BV": max(16, min(64, widths))},
        PRECISION=launch.precision,
        num_warps=launch.warps,
    )
    if kernels.state_bwd == "v2":
        from mcore_ssm.gdn_triton_state_bwd_v2 import run_state_bwd_v2

        dstates, dh0 = run_state_bwd_v2(launch, q, k, w, gf, dout, dht, du)
    else:
        dstates, dh0 = _run_state_bwd(launch, q, k, w, gf, dout, dht, du)
    terms = (launch, (q, k, v, gf, bf), (vnew, states, dstates), (dout, du))
    if split:
        dq, dk_, dv_, dg, dbeta = chunk_terms_bwd_split(*terms, inverse=inverse, inverse_by=kernels.inverse)
    else:
        dq, dk_, dv_, dg, dbeta = chunk_terms_bwd(*terms)
    d_initial = dh0.to(initial_state.dtype) if initial_state is not None else None
    return dq, dk_, dv_, dg.to(g.dtype), dbeta.to(beta.dtype), d_initial
