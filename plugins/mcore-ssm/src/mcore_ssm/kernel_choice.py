"""Which implementation of a chunked scan runs (the ``kernel`` setting of the ``gdn`` and ``mamba2`` blocks).

Why: both scans choose the same way, once per call, not in the block; ``gdn_kernels`` and ``mamba2_kernels`` say
only which chunk sizes their Triton kernels take. ``auto``: Triton for CUDA tensors when Triton imports and the
kernel takes the chunk size, under ``torch.compile`` too (``gdn_kernels`` / ``mamba2_kernels`` call the kernels
through ``torch.compiler.disable``: the graphs break around them; the compiled torch reference is ~3x slower);
the torch reference everywhere else, or everywhere with ``MCORE_SSM_KERNELS=torch`` (an opt-out). The default
since their GPU tests passed and ``benchmarks/bench_gdn.py`` / ``bench_mamba2.py`` timed them on a card (H100,
2026-12-06, ``benchmarks/RESULTS.md``): forward + backward 2.1x (GDN) and 3.6x (Mamba2) the compiled
reference, the ``hybrid-bench`` training step 3.9x faster than on the reference. ``torch`` always takes the
reference; ``triton`` always the kernel (on CPU only under ``TRITON_INTERPRET=1``, Triton's
interpreter, for checking it). CPU calls never import Triton. Where the scans' Triton kernels run, ``fused_ops`` also
gives the blocks' training-call conv and gated norm to ``conv_triton`` / ``norm_triton`` (``MCORE_SSM_FUSED=0`` opts
out of those alone).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from mcore.errors import UserError

KERNELS: tuple[str, ...] = ("auto", "torch", "triton")
#: ``MCORE_SSM_KERNELS`` values that make ``auto`` take the torch reference on CUDA too.
OPT_OUT: tuple[str, ...] = ("torch", "reference")


def check_kernel(kernel: object, key: str = "kernel") -> None:
    """``ValueError`` naming ``key`` unless ``kernel`` is one of ``KERNELS``."""
    if kernel not in KERNELS:
        raise ValueError(f"{key} = {kernel!r}; allowed: {', '.join(KERNELS)}")


def choose(kernel: str, device: torch.device, *, triton_takes: bool) -> str:
    """``"torch"`` or ``"triton"``: what ``kernel`` (``KERNELS``) means for tensors on ``device``, where
    ``triton_takes`` says whether the Triton kernel supports the call's chunk size."""
    check_kernel(kernel)
    if kernel != "auto":
        return kernel
    usable = (
        device.type == "cuda"
        and triton_takes
        and os.environ.get("MCORE_SSM_KERNELS", "") not in OPT_OUT
        and importlib.util.find_spec("triton") is not None
    )
    return "triton" if usable else "torch"


#: ``MCORE_SSM_GDN_CHUNK_BWD``: the GDN per-chunk terms' backward ``split`` into three kernels (the default:
#: ``gdn_triton_chunk_bwd_split``, no register spills at dk = dv = 128; GDN fwd + bwd 24.1 against 28.2 ms on an
#: H200, 2026-12-06, for 1.56 GB more transient memory at batch 8 x 4096) or as ``one`` kernel (the first version).
GDN_CHUNK_BWD: tuple[str, ...] = ("split", "one")


def _env_choice(name: str, allowed: tuple[str, ...]) -> str:
    """Environment variable ``name``, one of ``allowed`` (unset or empty: the first); otherwise a ``UserError``
    naming it (the CLI prints it as one line and exits 2, even when a backward reads it mid-run)."""
    value = os.environ.get(name, "") or allowed[0]
    if value not in allowed:
        raise UserError(f"{name} = {value!r}; allowed: {', '.join(allowed)}")
    return value


def gdn_chunk_bwd() -> str:
    """``MCORE_SSM_GDN_CHUNK_BWD`` (``GDN_CHUNK_BWD``, default ``split``)."""
    return _env_choice("MCORE_SSM_GDN_CHUNK_BWD", GDN_CHUNK_BWD)


#: ``MCORE_SSM_GDN_FWD``: the GDN forward, ``v2`` (the default) or ``v1`` (the first version, kept as an opt-in). v2:
#: the WY kernel with ``W`` by 64 key columns at 4 warps and the state walk of ``gdn_triton_state_v2`` (64-key state
#: blocks, gated ``U``, 4 warps): two programs an SM where v1 fits one, in offline sm_90 builds at dk = dv = 128. Same
#: results; the default since its GPU tests (``test_gdn_triton_state_v2``) passed and it timed 1.35x v1's forward
#: (3.19 against 4.30 ms) and 1.05x forward + backward on an H100 (2026-12-07, ``benchmarks/RESULTS.md``). v2 takes
#: dk <= 128, larger dk runs v1 (``gdn_fwd_for``). The backward reruns the same forward's kernels in fp32 for its
#: factors and chunk states (v1's until 2026-12-07, whatever the forward).
GDN_FWD: tuple[str, ...] = ("v2", "v1")


def gdn_fwd() -> str:
    """``MCORE_SSM_GDN_FWD`` (``GDN_FWD``, default ``v2``)."""
    return _env_choice("MCORE_SSM_GDN_FWD", GDN_FWD)


def gdn_fwd_for(block_k: int) -> str:
    """The GDN forward that runs for keys padded to ``block_k`` columns: ``gdn_fwd()``, except ``v1`` where
    ``block_k > 128`` (v2 holds the state as at most two 64-key blocks)."""
    choice = gdn_fwd()
    return "v1" if block_k > 128 else choice


#: ``MCORE_SSM_GDN_STATE_BWD``: the GDN backward's reverse state walk, ``v2`` (the default since 2026-12-07:
#: ``gdn_triton_state_bwd_v2``, the state gradient as 64-key blocks at 4 warps, two programs an SM in offline sm_90
#: builds) or ``v1`` (``gdn_triton_bwd._chunk_state_bwd_kernel``, the first version). Same results. With 16-bit
#: scratch (``GDN_BWD_SCRATCH``) GDN fwd + bwd took 17.31 ms against 21.84 ms for v1 + fp32 scratch on an H100
#: (B 8 x T 4096, 32 value heads, dk = dv = 128, bf16; RESULTS.md). v2 takes dk <= 128, larger dk runs v1
#: (``gdn_state_bwd_for``).
GDN_STATE_BWD: tuple[str, ...] = ("v2", "v1")


def gdn_state_bwd_for(block_k: int) -> str:
    """``MCORE_SSM_GDN_STATE_BWD`` (``GDN_STATE_BWD``, default ``v2``), except ``v1`` where ``block_k > 128``."""
    choice = _env_choice("MCORE_SSM_GDN_STATE_BWD", GDN_STATE_BWD)
    return "v1" if block_k > 128 else choice


#: ``MCORE_SSM_GDN_PAIRS_T``: where the split chunk-terms backward's first kernel (``_pairs_bwd_kernel``) gets each
#: chunk's ``T = (I + A)^-1``: ``recompute`` (the default: ``K K^T`` and five doubling levels of ``(C, C)`` dots, as the
#: WY kernel) or ``saved`` (an opt-in, not yet run on a GPU: the backward's fp32 rerun of the WY kernel stores the
#: ``T`` it computes, ``(M, hv, C, C)`` fp32, 268 MB at B 8 x T 4096 x 32 value heads, and the kernel loads it: 12 of
#: its 36 ``(C, C, C)``-sized dots gone). Gradients within the tests' tolerances either way. Only with
#: ``MCORE_SSM_GDN_CHUNK_BWD=split`` (the default).
GDN_PAIRS_T: tuple[str, ...] = ("recompute", "saved")


def gdn_pairs_t() -> str:
    """``MCORE_SSM_GDN_PAIRS_T`` (``GDN_PAIRS_T``, default ``recompute``)."""
    return _env_choice("MCORE_SSM_GDN_PAIRS_T", GDN_PAIRS_T)


#: ``MCORE_SSM_GDN_INVERSE``: how the GDN WY kernel (``gdn_triton._chunk_wy_kernel``: the forward and the backward's
#: fp32 rerun) and the split chunk-terms backward's recomputation (``_pairs_bwd_kernel``) get each chunk's
#: ``T = (I + A)^-1``: ``doubling`` (the default: five levels of two ``(C, C)`` dots, 1 -> 2 -> ... -> 64) or
#: ``blocks16`` (an opt-in, not yet run on a GPU: the four diagonal 16 x 16 blocks inverted by forward substitution in
#: fp32 registers, then the two doubling levels 16 -> 32 -> 64, 4 of the 10 ``(C, C, C)`` dots). Same ``T`` (the
#: interpreter tests: within 1e-5 of ``solve_triangular`` in fp32).
GDN_INVERSE: tuple[str, ...] = ("doubling", "blocks16")


def gdn_inverse() -> str:
    """``MCORE_SSM_GDN_INVERSE`` (``GDN_INVERSE``, default ``doubling``)."""
    return _env_choice("MCORE_SSM_GDN_INVERSE", GDN_INVERSE)


#: ``MCORE_SSM_GDN_BWD_SCRATCH``: the dtype of what the GDN backward keeps between its kernels (issue 22): ``inputs``
#: (the default since 2026-12-07, when its GPU tests passed on an H100 and it timed 19.00 against 21.84 ms alone, 17.31
#: with the v2 state walk: those in the inputs' dtype for 16-bit inputs, the rerun then exactly the forward that ran,
#: and the dots that take them on 16-bit operands with fp32 accumulation, as fla's backward; ``dU``, the carried state
#: gradient, ``T`` and every partial sum stay fp32, and the v2 reverse walk keeps fp32 operands; ~5.7 of ~18 GB of
#: the backward's traffic gone at B 8 x T 4096, 32 value heads, dk = dv = 128, bf16) or ``fp32`` (the forward rerun
#: in fp32, its factors ``W, U~``, ``U`` and chunk states, the state gradients ``dS'`` and ``dR_u = T^T dU`` in
#: fp32, the dots on them tf32). fp32 inputs keep fp32 (their scratch dtype), and so does
#: ``MCORE_SSM_GDN_CHUNK_BWD=one`` (the one-kernel terms take fp32 only).
GDN_BWD_SCRATCH: tuple[str, ...] = ("inputs", "fp32")


def gdn_bwd_scratch() -> str:
    """``MCORE_SSM_GDN_BWD_SCRATCH`` (``GDN_BWD_SCRATCH``, default ``inputs``)."""
    return _env_choice("MCORE_SSM_GDN_BWD_SCRATCH", GDN_BWD_SCRATCH)


#: ``MCORE_SSM_GDN_WALK_ORDER``: the launch order of the GDN forward's v2 state walk (``gdn_triton_state_v2``, also the
#: backward's rerun): ``segments`` (the default: grid (segment, value head, value block), the value blocks of one
#: (segment, head) a wave apart, each reading the same ``W`` and ``K`` rows from memory) or ``blocks`` (an opt-in, not
#: yet run on a GPU: those value blocks launched next to each other, so they walk the same chunks at once and share
#: the loads through L2, as the backward's reverse walks do). Same results, bit for bit.
GDN_WALK_ORDER: tuple[str, ...] = ("segments", "blocks")


def gdn_walk_order() -> str:
    """``MCORE_SSM_GDN_WALK_ORDER`` (``GDN_WALK_ORDER``, default ``segments``)."""
    return _env_choice("MCORE_SSM_GDN_WALK_ORDER", GDN_WALK_ORDER)


@dataclass(frozen=True, kw_only=True, slots=True)
class GdnKernels:
    """Which GDN Triton kernels one call runs, read once when its forward starts (the backward, later, uses the
    same): ``forward`` (``GDN_FWD``, also the backward's fp32 rerun), ``terms`` (``GDN_CHUNK_BWD``), ``state_bwd``
    (``GDN_STATE_BWD``), ``pairs_t`` (``GDN_PAIRS_T``), ``inverse`` (``GDN_INVERSE``), ``bwd_scratch``
    (``GDN_BWD_SCRATCH``), ``walk_order`` (``GDN_WALK_ORDER``)."""

    forward: str
    terms: str
    state_bwd: str
    pairs_t: str
    inverse: str
    bwd_scratch: str
    walk_order: str


def gdn_kernels_for(block_k: int) -> GdnKernels:
    """The environment's choices for keys padded to ``block_k`` columns (a bad value: ``UserError``)."""
    return GdnKernels(
        forward=gdn_fwd_for(block_k),
        terms=gdn_chunk_bwd(),
        state_bwd=gdn_state_bwd_for(block_k),
        pairs_t=gdn_pairs_t(),
        inverse=gdn_inverse(),
        bwd_scratch=gdn_bwd_scratch(),
        walk_order=gdn_walk_order(),
    )


#: ``MCORE_SSM_FUSED``: ``1`` (the default) runs the blocks' training-call conv + SiLU (+ GDN's q/k L2 norm) and gated
#: RMSNorm as the fused Triton kernels of ``conv_triton`` / ``norm_triton`` wherever the block's Triton scan is chosen
#: (``fused_ops``); ``0`` keeps the torch ops there (an A/B switch: ``benchmarks/bench_gdn_block.py``'s
#: ``block_unfused``). Read when a block's forward runs; its backward follows what the forward chose.
FUSED: tuple[str, ...] = ("1", "0")


#: ``MCORE_SSM_CONV_BWD``: the fused conv's backward (``conv_triton``) in ``one`` kernel (the default, timed on an
#: H100: 1.36 ms for a GDN block's three calls at ``hybrid-bench``'s shape) or ``two`` (``da`` once a tile into an fp32
#: scratch, then ``dx`` gathered from it: the K-fold recomputation of ``da`` gone; interpreter-exact, builds without
#: spills for sm_90 under Triton 3.6 and 3.9, not yet timed on a card). Read when a backward runs.
CONV_BWD: tuple[str, ...] = ("one", "two")


def conv_bwd() -> str:
    """``MCORE_SSM_CONV_BWD`` (``CONV_BWD``, default ``one``)."""
    return _env_choice("MCORE_SSM_CONV_BWD", CONV_BWD)


def fused_ops(kernel: str, x: torch.Tensor) -> bool:
    """Whether a block whose ``kernel`` setting is ``kernel`` runs the fused Triton conv and gated norm on ``x``: where
    ``choose`` takes Triton (CUDA for ``auto``; ``triton`` also on CPU under Triton's interpreter), never while
    ``torch.compile`` traces, for fp32 / bf16 / fp16 only (fp64 keeps the torch ops), unless ``MCORE_SSM_FUSED=0``
    (another value: ``UserError``)."""
    if torch.compiler.is_compiling() or _env_choice("MCORE_SSM_FUSED", FUSED) == "0":
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return choose(kernel, x.device, triton_takes=True) == "triton"
