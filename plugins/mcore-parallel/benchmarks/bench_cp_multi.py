"""Several GPUs (torchrun): the ``cp`` attention kinds' tokens/s and peak memory against the sequence length, torch's
experimental context parallelism beside them, and static against dynamic CP on a long-tailed mix of documents.

One attention layer, forward + backward, over all ``N`` ranks torchrun starts (``cp = N``). Every candidate reads
the same micro-batch (drawn from one seed on every rank) and computes this rank's share of it; its output is checked
against one process's attention over the whole micro-batch (SDPA in fp32, causal per document: a candidate that is
fast because it is wrong shows in ``rel_err_vs_single``).

**Lengths** (``--seqs``): causal rows of one document, each rank holding its zig-zag share (``B`` rows of
``seq / N`` tokens, ``(B, L, nh, hd)`` per rank). Our kinds are built as the ``cp`` layout builds them for a
micro-batch (``CPLayout(kind).shard_batch`` gives the backend; its masks are built on the first call and reused, as
every layer after the first finds them):

* ``ring``: K/V blocks around the ring, partial attention merged by log-sum-exp;
* ``a2a``: DeepSpeed-Ulysses, heads scattered and tokens gathered by all-to-all;
* ``allgather``: K/V all-gathered, one attention;
* ``a2a+ring``: all-to-all inside groups of ``--a2a-size`` ranks (a node; default ``N / 2`` from 4 ranks), ring
  across them; listed as not available when the world has no such split or the layout lacks the kind.

torch's experimental context parallelism (``torch.distributed.tensor.experimental``), set up as torchtitan sets it
up: the rows sharded by torch (``_context_parallel_shard`` with its head-tail balancer: rank ``r`` holds chunks
``r`` and ``2N-1-r``, our zig-zag) and an attention module wrapped by ``_ContextParallel``:

* ``torch_cp``: SDPA under torch's CP dispatcher with its default rotation (``set_rotate_method("allgather")``:
  K/V all-gathered once, attended block by block, merged by log-sum-exp); torch's ring runs the flash,
  memory-efficient or cuDNN SDPA kernel (the row names the one SDPA picked). GQA: K/V heads repeated to the query
  heads before SDPA (torchtitan's ``repeat_kv``), so torch moves ``nh / nkv`` times the bytes ours move;
* ``torch_cp_ring``: the same with ``set_rotate_method("alltoall")``: K/V passed to the next rank each step;
* ``torch_cp_flex``: the FlexAttention style: K/V all-gathered, compiled ``flex_attention`` (GQA native) with the
  causal ``BlockMask`` torch shards for the local queries (lengths a multiple of ``N * 128``).

Where a torch candidate cannot run, its row says why instead of a time: on CPU ``torch_cp`` and ``torch_cp_ring``
need CUDA (torch's CP rings only the flash, memory-efficient and cuDNN SDPA kernels, none of which CPU has; found by
asking which kernel SDPA runs here and whether torch's CP handles it), ``torch_cp_flex`` too (FlexAttention has no
backward on CPU: torch's own message); a torch without the API, or a length torch refuses, likewise.

**Mix** (``--mix-kinds``; none: skipped): static against dynamic CP (``[parallel.cp] dynamic = true``,
``cp_split.plan_dynamic``: each document over as few ranks as its length needs, balancing tokens) for each kind.
``--mix-batches`` micro-batches of ``--mix-rows`` rows of ``--mix-seq`` tokens, packed with documents of log-normal
lengths (median ``--mix-median``, sigma ``--mix-sigma``, seed ``--mix-seed``: a long tail, as
``bench_cp_balance.py`` draws them), cut at row ends; one step runs every micro-batch forward + backward, as gradient
accumulation would. Per kind and plan: the step's times, tokens/s (every token of a packed row is real), and the
plans' balance (``cp_split.split_balance``, mean over the micro-batches): max/mean real tokens and attention work
per rank, padding, the share of tokens whose keys another rank needs, the token slots the all-gather sends per
token; the worst micro-batch's max/mean tokens. Documents take the fp32 torch reference path on the GPU too (no
fused kernel yet for document masks), which computes every query-key pair of a rank's rows, masked or not: dynamic
CP's one row of about ``B * T / N`` tokens has more such pairs than static's ``B`` rows of ``T / N`` (and needs more
memory: lower ``--mix-rows`` or ``--mix-seq`` where it does not fit), so until that kernel exists these times
compare the plans under that path, not at their best.

Method: per length (and once for the mix), warm-up calls (mask building, compiles), then ``--repeats`` rounds; each
round times ``--iters`` steps of every candidate, in an order rotated each round (interleaved), host clock after a
device synchronise, the slowest rank's time. Per row: median, min and max ms per step, tokens/s of the whole group
(real tokens / median) and per GPU, peak memory (CUDA ``max_memory_allocated`` of one step above what was allocated
before it, the largest over ranks; ``null`` on CPU) and ``rel_err_vs_single``. A kind refused by the layout (heads
not divisible, a size that does not split) is a row with ``"status": "not available: ..."``; running out of memory
ends the run (collectives of the other ranks cannot be unwound), so pass the lengths that fit.

One JSON line per candidate and length, then per kind and plan of the mix (after a header line) on rank 0's stdout
and in ``--out``.

    python -m torch.distributed.run --nproc_per_node 8 plugins/mcore-parallel/benchmarks/bench_cp_multi.py \\
        --seqs 8192 16384 32768 65536 131072 --out cp-multi.jsonl
    python -m torch.distributed.run --nproc_per_node 2 plugins/mcore-parallel/benchmarks/bench_cp_multi.py \\
        --tiny --out /tmp/cp-tiny.jsonl                                               # CPU proof, gloo
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import random
import re
import statistics
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.parallel import parallelize_module
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from mcore.errors import UserError
from mcore.mesh import ParallelMesh, build_mesh
from mcore.protocols.block import BlockContext
from mcore_parallel.cp import KINDS, CPLayout
from mcore_parallel.cp_split import SplitPlan, split_balance
from mcore_testing.bench import emit, interleaved, rel_error, run_header, timing_row, write_lines

#: torch's candidates and the K/V rotation of its SDPA ring (``None``: the FlexAttention style)
TORCH_KINDS: dict[str, str | None] = {"torch_cp": "allgather", "torch_cp_ring": "alltoall", "torch_cp_flex": None}
ALL_KINDS = ("ring", "a2a", "allgather", "a2a+ring", *TORCH_KINDS)
MIX_KINDS = ("allgather", "ring", "a2a")
PLANS = ("static", "dynamic")
#: the names torchtitan imports from torch's experimental context parallelism
TORCH_CP_NAMES = (
    "_ContextParallel",
    "_context_parallel_shard",
    "_enable_context_parallel_dispatcher",
    "_disable_context_parallel_dispatcher",
    "_HeadTailLoadBalancer",
    "set_rotate_method",
)
#: the SDPA kernels torch's CP ring dispatches, where its module does not list them (``custom_ops``)
TORCH_CP_KERNELS = tuple(
    f"aten._scaled_dot_product_{name}_attention{part}.default"
    for name in ("flash", "efficient", "cudnn")
    for part in ("", "_backward")
)


class Unavailable(Exception):
    """A candidate this torch or device cannot run; the message is the row's reason. Raised before any
    collective, or by a first step that failed alike on every rank."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, fp32, few repeats (CPU proof on gloo)")
    parser.add_argument("--kinds", nargs="*", default=list(ALL_KINDS), choices=ALL_KINDS)
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--a2a-size", type=int, default=None, help="a2a+ring: ranks per all-to-all group")
    parser.add_argument("--mix-kinds", nargs="*", default=list(MIX_KINDS), choices=tuple(KINDS), help="none: no mix")
    parser.add_argument("--mix-seq", type=int, default=4096, help="mix: tokens per row")
    parser.add_argument("--mix-rows", type=int, default=4, help="mix: rows per micro-batch")
    parser.add_argument("--mix-batches", type=int, default=2, help="mix: micro-batches per step")
    parser.add_argument("--mix-median", type=float, default=600.0, help="mix: median document length (tokens)")
    parser.add_argument("--mix-sigma", type=float, default=1.6, help="mix: log-normal sigma of the lengths")
    parser.add_argument("--mix-seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.seqs, args.heads, args.kv_heads, args.head_dim = [16, 32], 4, 2, 8
        args.mix_seq, args.mix_rows, args.mix_batches, args.mix_median, args.mix_seed = 64, 1, 2, 8.0, 1  # splits some
        args.repeats, args.iters, args.warmup = 2, 1, 1
    return args


# -- the micro-batch every candidate reads, and one process's attention over it ---------------------------------
@dataclass(kw_only=True, slots=True)
class Batch:
    """A micro-batch's whole rows, the same on every rank (one seed): attention inputs, the gradient of the output,
    the documents, and one process's attention over it (what every candidate's share must equal)."""

    q: torch.Tensor  # (B, T, nh, hd)
    k: torch.Tensor  # (B, T, nkv, hd)
    v: torch.Tensor  # (B, T, nkv, hd)
    grad: torch.Tensor  # (B, T, nh, hd)
    cu_seqlens: torch.Tensor | None  # (D + 1,) int32 over the flattened rows; None: each row one document
    reference: torch.Tensor  # (B, T, nh, hd) fp32


def document_spans(cu_seqlens: torch.Tensor, rows: int, seq: int) -> list[tuple[int, int]]:
    """Each document's ``[start, end)`` in the flattened rows, cut at row ends as the ``cp`` split cuts them."""
    bounds = sorted(set(cu_seqlens.tolist()) | {r * seq for r in range(rows + 1)})
    return list(itertools.pairwise(bounds))


def single_process(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """One process's causal attention over every document (each row one document without ``cu_seqlens``), fp32:
    ``(B, T, nh, hd)``."""
    rows, seq, heads = q.shape[:3]

    def heads_first(x: torch.Tensor) -> torch.Tensor:  # (b, t, n, hd) -> (b, nh, t, hd) fp32, K/V heads repeated
        return x.float().transpose(1, 2).repeat_interleave(heads // x.shape[2], dim=1)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # (b, t, nh, hd)
        out = F.scaled_dot_product_attention(
            heads_first(q), heads_first(k), heads_first(v), is_causal=True, scale=scale
        )
        return out.transpose(1, 2)

    if cu_seqlens is None:
        return attend(q, k, v)
    flat = [x.reshape(1, rows * seq, *x.shape[2:]) for x in (q, k, v)]  # (1, B*T, n, hd)
    out = torch.empty(1, rows * seq, heads, q.shape[-1], dtype=torch.float32, device=q.device)
    for a, b in document_spans(cu_seqlens, rows, seq):
        out[:, a:b] = attend(*(x[:, a:b] for x in flat))
    return out.view(rows, seq, heads, -1)


def make_batch(
    args: argparse.Namespace,
    rows: int,
    seq: int,
    cu_seqlens: torch.Tensor | None,
    *,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Batch:
    """Random inputs from ``seed`` (the same on every rank) and their single-process attention."""
    g = torch.Generator(device=device).manual_seed(seed)

    def draw(heads: int) -> torch.Tensor:  # (B, T, heads, hd)
        return torch.randn(rows, seq, heads, args.head_dim, generator=g, device=device).to(dtype)

    q, k, v, grad = draw(args.heads), draw(args.kv_heads), draw(args.kv_heads), draw(args.heads)
    reference = single_process(q, k, v, cu_seqlens, args.head_dim**-0.5)
    return Batch(q=q, k=k, v=v, grad=grad, cu_seqlens=cu_seqlens, reference=reference)


def long_tailed_mix(rng: random.Random, rows: int, seq: int, median: float, sigma: float) -> torch.Tensor:
    """``cu_seqlens`` (int32) of ``rows`` rows of ``seq`` tokens packed with log-normal document lengths, cut at the
    end of the micro-batch (``bench_cp_balance.py``'s draw; scripts do not import each other)."""
    bounds, total = [0], rows * seq
    while bounds[-1] < total:
        length = max(1, round(rng.lognormvariate(math.log(median), sigma)))
        bounds.append(min(total, bounds[-1] + length))
    return torch.tensor(bounds, dtype=torch.int32)


def take(x: torch.Tensor, index: torch.Tensor, flat: bool) -> torch.Tensor:
    """``x (B, T, n, d)`` at one rank's tokens ``index (B', L)`` (``SplitPlan.index``: into each row, or into the
    flattened rows when ``flat``; ``-1``, padding, gets 0): ``(B', L, n, d)``."""
    if flat:
        x = x.reshape(1, -1, *x.shape[2:])  # (1, B*T, n, d)
    picked = x.gather(1, index.clamp(min=0)[:, :, None, None].expand(-1, -1, *x.shape[2:]))
    return torch.where((index >= 0)[:, :, None, None], picked, torch.zeros((), dtype=x.dtype, device=x.device))


# -- our kinds, as the cp layout builds them -----------------------------------------------------------------
@dataclass(kw_only=True, slots=True)
class Share:
    """One micro-batch as this rank holds it under one kind and plan."""

    ctx: BlockContext
    plan: SplitPlan
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (B', L, nh|nkv, hd) each, 0 at padding
    grad: torch.Tensor  # (B', L, nh, hd), 0 at padding
    reference: torch.Tensor  # (B', L, nh, hd) fp32
    real: torch.Tensor  # (B', L) bool: not padding


class LayoutArm:
    """One of our kinds over a list of micro-batches (the static zig-zag split, or the dynamic plan): each one's
    backend and inputs on this rank, and the step (forward + backward of every micro-batch)."""

    def __init__(
        self, name: str, mesh: ParallelMesh, args: argparse.Namespace, batches: list[Batch], *, dynamic: bool = False
    ) -> None:
        world = mesh.size("cp")
        a2a_size = args.a2a_size or (world // 2 if world >= 4 else None)
        if name not in KINDS:
            raise UserError(f"parallel.cp.kind = {name!r} is not in this layout; allowed: {', '.join(KINDS)}")
        if name == "a2a+ring" and a2a_size is None:
            raise UserError(f"kind 'a2a+ring' needs at least 4 ranks (or --a2a-size); this run has {world}")
        config = CPLayout.Config(kind=name, a2a_size=a2a_size if name == "a2a+ring" else None, dynamic=dynamic)
        layout = CPLayout(config)
        layout.apply(nn.Identity(), mesh)
        rank = mesh.rank("cp")
        self.scale = args.head_dim**-0.5
        self.shares: list[Share] = []
        for batch in batches:
            rows, seq = batch.q.shape[:2]
            tokens = torch.zeros(rows, seq, dtype=torch.int64, device=batch.q.device)
            cu = batch.cu_seqlens
            longest = None if cu is None else max(b - a for a, b in itertools.pairwise(cu.tolist()))
            _, _, ctx = layout.shard_batch(tokens, tokens, BlockContext(cu_seqlens=cu, max_seqlen=longest))
            plan: SplitPlan = ctx.attention.plan  # type: ignore[union-attr]  # every cp backend keeps its plan
            index = plan.index[rank]  # (B', L) into the rows (or the flattened rows), -1 at padding
            q, k, v, grad, reference = (
                take(x, index, plan.flat) for x in (batch.q, batch.k, batch.v, batch.grad, batch.reference)
            )
            self.shares.append(
                Share(ctx=ctx, plan=plan, inputs=(q, k, v), grad=grad, reference=reference, real=index >= 0)
            )

    def step(self) -> list[torch.Tensor]:
        outs = []
        for share in self.shares:
            q, k, v = (x.detach().requires_grad_() for x in share.inputs)
            attention = share.ctx.attention
            assert attention is not None
            out = attention(q, k, v, ctx=share.ctx, scale=self.scale, window=None)  # (B', L, nh, hd)
            out.backward(share.grad)
            outs.append(out.detach())
        return outs

    def error(self, outs: list[torch.Tensor]) -> float:
        """A step's outputs against one process's attention, over every rank's real tokens."""
        got = torch.cat([out.float()[share.real] for share, out in zip(self.shares, outs)])  # (n, nh, hd)
        return rel_error(got, torch.cat([share.reference[share.real] for share in self.shares]))


# -- torch's experimental context parallelism, as torchtitan sets it up ---------------------------------------
def torch_cp_api() -> Any:
    """torch's experimental context-parallel module (``torch.distributed.tensor.experimental._attention``, where
    torchtitan imports it from), or ``Unavailable`` naming what this torch lacks."""
    try:
        from torch.distributed.tensor.experimental import _attention as api
    except ImportError as error:
        raise Unavailable(f"torch {torch.__version__} has no experimental context parallelism ({error})") from None
    missing = [name for name in TORCH_CP_NAMES if not hasattr(api, name)]
    if missing:
        raise Unavailable(f"torch {torch.__version__}'s experimental context parallelism lacks {', '.join(missing)}")
    return api


def torch_cp_kernels(api: Any) -> set[str]:
    """The aten SDPA ops torch's CP dispatcher takes over: its handler table (``custom_ops`` of the module defining
    ``_ContextParallel``), or ``TORCH_CP_KERNELS`` where it has none."""
    table = getattr(sys.modules.get(api._ContextParallel.__module__), "custom_ops", None)
    return {str(op) for op in table} if isinstance(table, dict) else set(TORCH_CP_KERNELS)


def sdpa_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> str:
    """The aten op ``F.scaled_dot_product_attention`` runs for inputs like these, causal, with gradients (the kernel
    torch's CP would have to ring), read off the autograd node it leaves (``ScaledDotProductFlashAttentionBackward0``
    is ``aten._scaled_dot_product_flash_attention``'s); or what runs when no fused kernel does."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    node = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).grad_fn
    assert node is not None
    nodes = [node]
    for _ in range(8):  # the fused op, under any padding or reshaping SDPA put after it
        for node in nodes:
            found = re.fullmatch(r"(ScaledDotProduct\w+?)Backward\d+", node.name())
            if found:
                return f"aten._{re.sub(r'(?<!^)(?=[A-Z])', '_', found.group(1)).lower()}.default"
        nodes = [after for node in nodes for after, _ in node.next_functions if after is not None]
    return "no fused kernel (the math path)"


class SDPAttention(nn.Module):
    """What torch's SDPA context parallelism wraps: causal SDPA on ``(B, nh, L, hd)``, ``L`` this rank's tokens."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)


class FlexAttention(nn.Module):
    """What torch's FlexAttention context parallelism wraps: ``attend`` (compiled ``flex_attention``) with the block
    mask of this rank's queries against all keys; its pre-hook all-gathers K/V (GQA native: ``nkv`` heads)."""

    def __init__(self, attend: Any, block_mask: Any, scale: float) -> None:
        super().__init__()
        self.attend, self.block_mask, self.scale = attend, block_mask, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attend(q, k, v, block_mask=self.block_mask, scale=self.scale, enable_gqa=True)  # type: ignore[no-any-return]


def causal(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """FlexAttention's mask_mod of causal attention over one document (global indices)."""
    return q_idx >= kv_idx


class TorchArm:
    """torch's experimental context parallelism over one length (module docstring): the rows sharded by torch with
    its head-tail balancer, the attention module wrapped by ``_ContextParallel``, and the step."""

    def __init__(
        self, name: str, mesh: ParallelMesh, args: argparse.Namespace, batch: Batch, cleanup: contextlib.ExitStack
    ) -> None:
        api = torch_cp_api()
        device, seq, world = batch.q.device, batch.q.shape[1], mesh.size("cp")
        if seq % (2 * world):  # torch's balancer asserts it without a message
            raise Unavailable(f"torch's head-tail balancer needs a length divisible by 2 * cp = {2 * world}; got {seq}")
        cp_mesh = mesh.submesh(["cp"])
        assert cp_mesh is not None
        self.api, self.rotate, self.scale = api, TORCH_KINDS[name], args.head_dim**-0.5
        self.groups = args.heads // args.kv_heads
        self.kernel: str | None = None
        balancer = api._HeadTailLoadBalancer(seq, world, device)  # rank r: chunks r and 2N-1-r
        shards = api._context_parallel_shard(  # local slices, no communication
            cp_mesh, [batch.q, batch.k, batch.v, batch.grad, batch.reference], [1] * 5, load_balancer=balancer
        )
        self.q, self.k, self.v, self.grad = (x.transpose(1, 2).contiguous() for x in shards[:4])  # (B, n, L, hd)
        self.reference = shards[4]  # (B, L, nh, hd) fp32
        if self.rotate is None:
            module: nn.Module = self._flex(api, cp_mesh, balancer, seq)
            style = api._ContextParallel.AttentionType.FLEX
        else:
            self.kernel = sdpa_kernel(self.q, self.repeat(self.k), self.repeat(self.v), self.scale)
            handled = torch_cp_kernels(api)
            if self.kernel not in handled:
                rings = ", ".join(sorted(op for op in handled if "_backward" not in op))
                need = "needs CUDA: " if device.type == "cpu" else ""
                raise Unavailable(
                    f"{need}torch's context_parallel rings only {rings}; SDPA on {device.type} runs {self.kernel}"
                )
            api._enable_context_parallel_dispatcher()  # global in torch: undone when the run ends
            cleanup.callback(api._disable_context_parallel_dispatcher)
            module, style = SDPAttention(self.scale), api._ContextParallel.AttentionType.SDPA
        self.module = parallelize_module(module, cp_mesh, api._ContextParallel(seq_dim=2, attention_type=style))

    def _flex(self, api: Any, cp_mesh: Any, balancer: Any, seq: int) -> nn.Module:
        probe = torch.zeros(1, 1, 1, 16, device=self.q.device, dtype=self.q.dtype, requires_grad=True)  # (B, n, L, hd)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
            try:
                flex_attention(probe, probe, probe)
            except NotImplementedError as error:  # CPU: no backward
                need = "needs CUDA: " if self.q.device.type == "cpu" else ""
                raise Unavailable(f"{need}{error}") from None
        whole = torch.compile(create_block_mask)(causal, None, None, seq, seq, device=self.q.device)
        try:
            (block_mask,) = api._context_parallel_shard(cp_mesh, [whole], [2], load_balancer=balancer)
        except NotImplementedError as error:  # lengths not a multiple of cp * 128
            raise Unavailable(f"torch {torch.__version__}: {error}") from None
        return FlexAttention(torch.compile(flex_attention, dynamic=False), block_mask, self.scale)

    def repeat(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, nkv, L, hd)`` -> ``(B, nh, L, hd)``: each K/V head for its query heads (SDPA here takes no GQA)."""
        return x.repeat_interleave(self.groups, dim=1) if self.groups > 1 else x

    def step(self) -> torch.Tensor:
        if self.rotate is not None:
            self.api.set_rotate_method(self.rotate)  # a global in torch: set for this candidate's call
        q, k, v = (x.detach().requires_grad_() for x in (self.q, self.k, self.v))
        if self.rotate is not None:
            k, v = self.repeat(k), self.repeat(v)
        out = self.module(q, k, v)  # (B, nh, L, hd)
        out.backward(self.grad)
        return out.detach().transpose(1, 2)  # (B, L, nh, hd)

    def error(self, out: torch.Tensor) -> float:
        return rel_error(out.float(), self.reference)


# -- the two sections ------------------------------------------------------------------------------------------
def not_available(error: Exception) -> str:
    return f"not available: {error}"


def bench_seq(
    args: argparse.Namespace,
    mesh: ParallelMesh,
    seq: int,
    dtype: torch.dtype,
    cleanup: contextlib.ExitStack,
) -> list[dict[str, Any]]:
    device, world = mesh.device, mesh.size("cp")
    batch = make_batch(args, args.batch, seq, None, seed=seq, device=device, dtype=dtype)
    arms: dict[str, LayoutArm | TorchArm] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in args.kinds:
        try:
            arm = (
                TorchArm(name, mesh, args, batch, cleanup)
                if name in TORCH_KINDS
                else LayoutArm(name, mesh, args, [batch])
            )
            arm.step()  # builds masks, compiles; a refused configuration raises here on every rank
            arms[name] = arm
        except (UserError, Unavailable) as error:
            rows[name] = {"kind": name, "seq": seq, "status": not_available(error)}
        except NotImplementedError as error:  # torch's CP refusing these inputs, alike on every rank
            if name not in TORCH_KINDS:
                raise
            rows[name] = {
                "kind": name,
                "seq": seq,
                "status": not_available(Unavailable(f"torch {torch.__version__}: {error}")),
            }
    steps = {name: arm.step for name, arm in arms.items()}
    measured = interleaved(steps, repeats=args.repeats, iters=args.iters, warmup=args.warmup, device=device)
    tokens = args.batch * seq
    for name, arm in arms.items():
        row = {"kind": name, "seq": seq, "cp": world, **timing_row(measured[name]["times"], digits=3)}
        median = row["median_ms"]
        rows[name] = row | {
            "tokens_per_s": round(tokens / (median * 1e-3), 1),
            "tokens_per_s_per_gpu": round(tokens / (median * 1e-3) / world, 1),
            "peak_mib": measured[name]["peak_mib"],
            "rel_err_vs_single": arm.error(measured[name]["output"]),
        }
        if isinstance(arm, TorchArm) and arm.kernel is not None:
            rows[name]["sdpa_kernel"] = arm.kernel
    return [rows[name] for name in args.kinds]


def bench_mix(args: argparse.Namespace, mesh: ParallelMesh, dtype: torch.dtype) -> list[dict[str, Any]]:
    device, world = mesh.device, mesh.size("cp")
    rng = random.Random(args.mix_seed)
    batches = []
    for i in range(args.mix_batches):
        cu = long_tailed_mix(rng, args.mix_rows, args.mix_seq, args.mix_median, args.mix_sigma).to(device)
        seed = 10_000 * args.mix_seed + i + 1
        batches.append(make_batch(args, args.mix_rows, args.mix_seq, cu, seed=seed, device=device, dtype=dtype))
    arms: dict[tuple[str, str], LayoutArm] = {}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, plan in itertools.product(args.mix_kinds, PLANS):
        head = {"kind": kind, "plan": plan, "seq": args.mix_seq, "rows": args.mix_rows, "micro_batches": len(batches)}
        try:
            arms[(kind, plan)] = arm = LayoutArm(kind, mesh, args, batches, dynamic=plan == "dynamic")
            arm.step()  # builds the masks; a refused configuration raises here on every rank
        except UserError as error:
            arms.pop((kind, plan), None)
            rows[(kind, plan)] = head | {"status": not_available(error)}
            continue
        rows[(kind, plan)] = head
    steps = {f"{kind}/{plan}": arm.step for (kind, plan), arm in arms.items()}
    measured = interleaved(steps, repeats=args.repeats, iters=args.iters, warmup=args.warmup, device=device)
    tokens = len(batches) * args.mix_rows * args.mix_seq  # packed rows: every token is a document's
    for (kind, plan), arm in arms.items():
        found = measured[f"{kind}/{plan}"]
        timing = timing_row(found["times"], digits=3)
        balance = [
            split_balance(share.plan, batch.cu_seqlens, args.mix_rows, args.mix_seq)
            for share, batch in zip(arm.shares, batches)
        ]
        rows[(kind, plan)] |= {"cp": world, **timing} | {
            "tokens_per_s": round(tokens / (timing["median_ms"] * 1e-3), 1),
            "tokens_per_s_per_gpu": round(tokens / (timing["median_ms"] * 1e-3) / world, 1),
            **{key: round(statistics.mean(b[key] for b in balance), 4) for key in balance[0]},
            "worst_max_over_mean_tokens": max(b["max_over_mean_tokens"] for b in balance),
            "peak_mib": found["peak_mib"],
            "rel_err_vs_single": arm.error(found["output"]),
        }
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device_type = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    mesh = build_mesh(["cp"], fill="cp", device_type=device_type)  # every rank torchrun starts: cp = N
    if mesh.size("cp") < 2:
        print("bench_cp_multi: start it on 2 or more ranks (torchrun --nproc_per_node N)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    rank0 = dist.get_rank() == 0
    lines: list[dict[str, Any]] = []
    settings = {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim}
    settings |= {"causal": True, "pass": "fwd+bwd", "repeats": args.repeats, "iters": args.iters}
    if args.mix_kinds:
        settings |= {"mix_median": args.mix_median, "mix_sigma": args.mix_sigma, "mix_seed": args.mix_seed}
    emit(lines, run_header(torch.device(device_type), dtype, **settings), show=rank0)
    with contextlib.ExitStack() as cleanup:
        for seq in args.seqs if args.kinds else []:
            for row in bench_seq(args, mesh, seq, dtype, cleanup):
                emit(lines, row, show=rank0)
        if args.mix_kinds:
            for row in bench_mix(args, mesh, dtype):
                emit(lines, row, show=rank0)
    if rank0:
        write_lines(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
