"""Gated DeltaNet (``gdn``): a recurrent token mixer with the gated delta rule, as in Qwen3-Next's linear layers.

Shape legend: B rows, T tokens, H hidden, N = B * T, S sequences (rows, or documents under ``cu_seqlens``),
hk query/key heads, hv value heads (a multiple of hk), dk key dim, dv value dim, K conv width.

Notable: separate ``q``, ``k``, ``v``, ``z`` (output gate), ``b`` (beta) and ``a`` (decay) projections, so
tensor parallelism splits each by rows into whole heads, and ``forward`` counts heads from the tensors it
gets (a rank holding some heads runs the same code; value head ``i`` reads query/key head
``i // (hv // hk)``, so a contiguous split keeps each group on one rank; with fewer query/key heads than
ranks the layout keeps q/k whole and each rank reads its group's rows). The conv filters and ``A_log``
are ``PerChannel`` (an ``nn.Linear``'s weight) so the layout splits them with their heads. Causal
depthwise conv1d + SiLU on q, k, v (one filter per projection, no window across documents), L2-normalised
q and k (eps 1e-6), ``beta = sigmoid(b)``, decay ``g = -exp(A_log) * softplus(a + dt_bias)`` (``dt_bias``
is the ``a`` projection's bias), the gated delta rule (chunked WY form, fp32 state; ``mcore_ssm.gdn_kernels``
picks the Triton kernels on CUDA or the torch reference), a gated RMSNorm per value head with ``z``
(normalise, then ``* silu(z)``; one ``(dv,)`` scale shared by the heads), and the output projection. Where the
Triton kernels run (``kernel_choice.fused_ops``) a training call's conv + SiLU + L2 norm is ``conv_triton`` and the
gated norm ``norm_triton``: fused, fp32 math, each activation read and written once (``MCORE_SSM_FUSED=0``: torch).

Hugging Face Qwen3-Next (``Qwen3NextGatedDeltaNet``) names: ``in_proj_qkvz`` holds, per query/key head, the rows
``[q (dk) | k (dk) | v (r * dv) | z (r * dv)]`` (``r = hv // hk``) and ``in_proj_ba`` per query/key head ``[b (r) |
a (r)]``: regrouped they are ``q``, ``k``, ``v``, ``z``, ``b``, ``a``; ``conv1d.weight (C, 1, K)`` over the channels
``[q | k | v]`` is ``conv_q``/``conv_k``/``conv_v``; ``dt_bias`` is ``a.bias``; ``A_log (hv,)`` is ``A_log.weight
(hv, 1)``; ``norm.weight`` is ``norm_weight`` (ones-centred, not zero-centred); ``out_proj`` is ``out``.

State: per sequence ``{"conv_q": (hk*dk, K-1), "conv_k": (hk*dk, K-1), "conv_v": (hv*dv, K-1)}`` in the
parameters' dtype (the last ``K - 1`` pre-conv inputs) and ``"ssm": (hv, dk, dv)`` fp32 (``state_shapes``,
``cache_spec``). ``forward_with_state`` runs a step from given states and returns the final ones (prefill,
an engine step of packed sequences); ``step`` is the one-token decode update; ``forward`` under an
inference cache (``ctx.kv_cache``) reads and writes the states there (``RecurrentStateCache``): a decode step
(``ctx.max_seqlen == 1``, as in the engine's static-shape steps) is one ``step`` of every row and writes the final
states once, with no host work; a step of a few tokens per sequence keeps the state after each token (rollback).

Context parallelism: under ``ctx.sequence_split`` (``mcore.sequence_split``, set by ``cp``) the block projects its
own tokens, all-to-alls to every token of the full rows for ``1 / cp`` of its heads, runs conv and rule there and
all-to-alls back before the gated norm (``_forward_split``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mcore.params import Init, ParamSpec
from mcore.protocols.block import BlockContext, BlockShared, FlopsShape, RecurrentStateSpec
from mcore.sequence_split import SequenceSplit
from mcore_ssm.block_utils import (
    PerChannel,
    check_positive_float,
    check_positive_int,
    draw_declared_,
    one_token_each,
    per_token_counts,
    project,
    step_tokens,
)
from mcore_ssm.conv import causal_conv1d, causal_conv1d_step
from mcore_ssm.gdn_kernels import gated_delta_rule
from mcore_ssm.gdn_reference import gated_delta_rule_step
from mcore_ssm.hf_map import GatedDeltaNetHF
from mcore_ssm.kernel_choice import check_kernel, fused_ops
from mcore_ssm.norm import gated_rms_norm
from mcore_ssm.packing import Segments, documents

#: The names of a sequence's state tensors (``state_shapes``).
STATE_NAMES: tuple[str, ...] = ("conv_q", "conv_k", "conv_v", "ssm")


def _all_rows(weight: torch.Tensor) -> torch.Tensor:
    return weight


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, in fp32 (fp64 stays fp64); ``x``'s dtype out."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer; ``forward(hidden (B, T, H), ctx) -> (B, T, H)``."""

    hf = GatedDeltaNetHF()  # its part of a Hugging Face checkpoint (mcore.hf.HFBlockMapping), found by model families
    carries_sequence_state = True  # a state runs along each document: layouts must not split sequences
    supports_sequence_split = True  # ... unless they pass ``ctx.sequence_split``: the whole sequence, some heads

    @dataclass(kw_only=True, slots=True)
    class Config:
        num_qk_heads: int = 4
        """Query/key heads (Qwen3-Next: linear_num_key_heads)."""
        num_v_heads: int | None = None
        """Value heads, a multiple of num_qk_heads (none: num_qk_heads; Qwen3-Next: linear_num_value_heads)."""
        head_k_dim: int | None = None
        """Dims per query/key head (none: hidden_size // num_v_heads)."""
        head_v_dim: int | None = None
        """Dims per value head (none: head_k_dim)."""
        conv_kernel: int = 4
        """Width of the causal depthwise conv on q, k, v (>= 2)."""
        norm_eps: float = 1e-6
        """Epsilon of the gated RMSNorm on the output (finite, > 0)."""
        chunk_size: int = 64
        """Tokens per chunk of the chunked gated delta rule."""
        out_bias: bool = False
        """Bias on the output projection."""
        kernel: str = "auto"
        """Chunked rule: 'auto' (Triton kernels on CUDA with chunk_size 64, else torch), 'torch' or 'triton'."""

        def __post_init__(self) -> None:
            for key in ("num_qk_heads", "conv_kernel", "chunk_size"):
                check_positive_int(key, getattr(self, key))
            for key in ("num_v_heads", "head_k_dim", "head_v_dim"):
                check_positive_int(key, getattr(self, key), allow_none=True)
            check_positive_float("norm_eps", self.norm_eps)
            check_kernel(self.kernel)
            if self.conv_kernel < 2:
                raise ValueError(f"conv_kernel = {self.conv_kernel}; allowed: an int >= 2")
            if self.num_v_heads is not None and self.num_v_heads % self.num_qk_heads:
                raise ValueError(
                    f"num_v_heads = {self.num_v_heads}; allowed: a multiple of num_qk_heads = {self.num_qk_heads}"
                )

    def __init__(self, config: Config | None = None, *, hidden_size: int, shared: BlockShared | None = None) -> None:
        super().__init__()
        cfg = self.config = config or self.Config()
        self.shared = shared or BlockShared(hidden_size=hidden_size)
        hk = cfg.num_qk_heads
        hv = cfg.num_v_heads or hk
        if cfg.head_k_dim is None and hidden_size % hv:
            raise ValueError(f"num_v_heads = {hv}: must divide hidden_size = {hidden_size}, or set head_k_dim")
        self.head_k_dim = dk = cfg.head_k_dim or hidden_size // hv
        self.head_v_dim = dv = cfg.head_v_dim or dk
        self.q = nn.Linear(hidden_size, hk * dk, bias=False)
        self.k = nn.Linear(hidden_size, hk * dk, bias=False)
        self.v = nn.Linear(hidden_size, hv * dv, bias=False)
        self.z = nn.Linear(hidden_size, hv * dv, bias=False)  # output gate
        self.b = nn.Linear(hidden_size, hv, bias=False)  # beta = sigmoid(b)
        self.a = nn.Linear(hidden_size, hv, bias=True)  # decay input; its bias is dt_bias
        self.conv_q = PerChannel(hk * dk, cfg.conv_kernel)  # (hk*dk, K)
        self.conv_k = PerChannel(hk * dk, cfg.conv_kernel)  # (hk*dk, K)
        self.conv_v = PerChannel(hv * dv, cfg.conv_kernel)  # (hv*dv, K)
        self.A_log = PerChannel(hv, 1)  # (hv, 1): A = exp(A_log) > 0
        self.norm_weight = nn.Parameter(torch.ones(dv))  # gated RMSNorm scale, shared by the value heads
        self.out = nn.Linear(hv * dv, hidden_size, bias=cfg.out_bias)
        self.reset_parameters()

    def param_specs(self) -> dict[str, ParamSpec]:
        """Inits: projections normal(``init_std``), ``out`` normal(``output_init_std``), conv filters
        uniform(+-1/sqrt(K)) (``nn.Conv1d``'s default), ``A_log`` uniform(0, log 16) (A in [1, 16]),
        ``dt_bias`` (``a.bias``) ones, the norm scale ones. Roles: the projections are matrices; conv
        filters, ``A_log`` and ``dt_bias`` are ``bias`` (per-channel vectors: AdamW, no weight decay).
        Tensor parallelism: every projection and per-channel parameter ``column`` in whole heads (rows per
        head: dk, dv or 1), ``out`` ``row``, the norm scale ``partial`` (each rank's gradient from its heads)."""
        std, dk, dv = self.shared.init_std, self.head_k_dim, self.head_v_dim
        bound = 1.0 / math.sqrt(self.config.conv_kernel)
        conv_init = Init("uniform", a=-bound, b=bound)
        specs = {
            "q.weight": ParamSpec("matrix", head_rows=dk, init=Init("normal", std=std), tp="column"),
            "k.weight": ParamSpec("matrix", head_rows=dk, init=Init("normal", std=std), tp="column"),
            "v.weight": ParamSpec("matrix", head_rows=dv, init=Init("normal", std=std), tp="column"),
            "z.weight": ParamSpec("matrix", head_rows=dv, init=Init("normal", std=std), tp="column"),
            "b.weight": ParamSpec("matrix", head_rows=1, init=Init("normal", std=std), tp="column"),
            "a.weight": ParamSpec("matrix", head_rows=1, init=Init("normal", std=std), tp="column"),
            "a.bias": ParamSpec("bias", head_rows=1, init=Init("ones"), tp="column"),
            "conv_q.weight": ParamSpec("bias", head_rows=dk, init=conv_init, tp="column"),
            "conv_k.weight": ParamSpec("bias", head_rows=dk, init=conv_init, tp="column"),
            "conv_v.weight": ParamSpec("bias", head_rows=dv, init=conv_init, tp="column"),
            "A_log.weight": ParamSpec("bias", head_rows=1, init=Init("uniform", a=0.0, b=math.log(16.0)), tp="column"),
            "norm_weight": ParamSpec("norm", init=Init("ones"), tp="partial"),
            "out.weight": ParamSpec("matrix", init=Init("normal", std=self.shared.out_std), tp="row"),
        }
        if self.out.bias is not None:
            specs["out.bias"] = ParamSpec("bias", init=Init("zeros"), tp="replicate")
        return specs

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        draw_declared_(self, generator)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------------------------------------------- forward

    def forward(self, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        if ctx.sequence_split is not None:
            return self._forward_split(hidden, ctx, ctx.sequence_split)
        if ctx.kv_cache is None:
            return self.forward_with_state(hidden, ctx, None, return_state=False)[0]
        cache = ctx.kv_cache  # inference: this step's new tokens of each sequence, packed (cu_seqlens)
        states = cache.recurrent_state(ctx.layer_index)
        dtypes = {name: dtype for name, (_, dtype) in self.state_shapes().items()}
        batch, seq, hidden_size = hidden.shape
        if one_token_each(hidden, ctx):  # decode (a static step too): one update of every row, the final states once
            on_device = {name: t.to(hidden.device) for name, t in states.items()}
            flat, new = self.step(hidden.reshape(batch * seq, hidden_size), on_device)  # (S, H), {name: (S, *shape)}
            cache.set_recurrent_state(ctx.layer_index, {name: t.to(dtypes[name]) for name, t in new.items()})
            return flat.view(batch, seq, hidden_size)
        counts = per_token_counts(batch, seq, ctx.cu_seqlens, ctx.max_seqlen)
        if counts is not None:  # decode / speculative verify: the state after every token
            on_device = {name: t.to(hidden.device) for name, t in states.items()}
            flat, after = step_tokens(self.step, hidden.reshape(batch * seq, hidden_size), counts, on_device)
            per_token = {name: t.to(dtypes[name]) for name, t in after.items()}  # (N, *shape)
            cache.set_recurrent_state(ctx.layer_index, per_token, per_token=True)
            return flat.view(batch, seq, hidden_size)
        out, final = self.forward_with_state(hidden, ctx, states, return_state=True)
        assert final is not None
        cache.set_recurrent_state(ctx.layer_index, {name: t.to(dtypes[name]) for name, t in final.items()})
        return out

    def forward_with_state(
        self,
        hidden: torch.Tensor,
        ctx: BlockContext,
        state: Mapping[str, torch.Tensor] | None,
        *,
        return_state: bool = True,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """``hidden (B, T, H)`` from ``state`` (``{name: (S, *shape)}`` as ``state_shapes``, one per row, or per
        document under ``ctx.cu_seqlens``; ``None``: zeros) -> ``(out (B, T, H), final state or None)``."""
        q, k, v, z, b, a = project(hidden, (self.q, self.k, self.v, self.z, self.b, self.a))
        o, finals = self._mix(q, k, v, b, a, ctx, state, return_state=return_state)  # (B, T, hv, dv)
        return self._output(o, z, fused=fused_ops(self.config.kernel, z)), finals  # (B, T, H)

    def _forward_split(self, hidden: torch.Tensor, ctx: BlockContext, split: SequenceSplit) -> torch.Tensor:
        """Under a sequence split (``cp``): this rank's tokens ``hidden (B, L, H)`` projected, an all-to-all to
        every token of the full rows for ``1 / cp`` of the heads (whole query/key groups: both head counts must
        divide by ``cp``), the conv and the rule on them, the all-to-all back; the gated norm and the output
        projection on this rank's tokens (the norm is per value head, so where it runs changes nothing)."""
        if ctx.kv_cache is not None:
            raise ValueError("gdn: an inference cache under a sequence split (cp) is not supported; allowed: cp = 1")
        q, k, v, z, b, a = project(hidden, (self.q, self.k, self.v, self.z, self.b, self.a))  # (B, L, *)
        split.check_heads("gdn query/key heads", q.shape[-1] // self.head_k_dim)
        split.check_heads("gdn value heads", v.shape[-1] // self.head_v_dim)
        q, k, v, b, a = split.to_full_sequence(q, k, v, b, a)  # (B, T, */cp): every token, this rank's heads
        o, _ = self._mix(q, k, v, b, a, split.full_context(ctx), None, return_state=False, rows=split.my_channels)
        (o_local,) = split.to_local_tokens(o.flatten(-2))  # (B, L, hv * dv)
        fused = fused_ops(self.config.kernel, z)
        return self._output(o_local.unflatten(-1, (-1, self.head_v_dim)), z, fused=fused)  # (B, L, H)

    def _mix(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        b: torch.Tensor,
        a: torch.Tensor,
        ctx: BlockContext,
        state: Mapping[str, torch.Tensor] | None,
        *,
        return_state: bool,
        rows: Callable[[torch.Tensor], torch.Tensor] = _all_rows,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Conv, gates and the gated delta rule on projected ``q, k (B, T, hk*dk)``, ``v (B, T, hv*dv)``, ``b, a
        (B, T, hv)`` -> ``(o (B, T, hv, dv), final state or None)``. ``rows`` picks the per-channel parameters'
        rows that go with the channels given (a sequence split's share; default: all this module holds)."""
        batch, seq, _ = q.shape
        dk, dv, cu = self.head_k_dim, self.head_v_dim, ctx.cu_seqlens
        segments = documents(batch, seq, cu, q.device) if cu is not None else None  # once for the block
        state = dict(state) if state is not None else {}
        finals: dict[str, torch.Tensor] = {}
        weights = []
        for name, x, conv in (("conv_q", q, self.conv_q), ("conv_k", k, self.conv_k), ("conv_v", v, self.conv_v)):
            weights.append(rows(conv.local_weight()))  # (C, K): this rank's channels
            self._check_channels(name, x, weights[-1])
        if not state and not return_state and fused_ops(self.config.kernel, q):  # training: the fused Triton conv
            q, k, v = self._conv_fused(q, k, v, weights, segments)
        else:
            mixed = []
            for name, x, weight in zip(STATE_NAMES[:3], (q, k, v), weights, strict=True):
                y, last = causal_conv1d(
                    x,
                    weight,
                    cu_seqlens=cu,
                    initial_state=state.get(name),
                    return_final_state=return_state,
                    segments=segments,
                )  # (B, T, C)
                mixed.append(y)
                if last is not None:
                    finals[name] = last
            q = l2_normalize(mixed[0].unflatten(-1, (-1, dk)))  # (B, T, hk, dk)
            k = l2_normalize(mixed[1].unflatten(-1, (-1, dk)))  # (B, T, hk, dk)
            v = mixed[2].unflatten(-1, (-1, dv))  # (B, T, hv, dv)
        beta, g = self._gates(b, a, rows(self.A_log.local_weight()))  # (B, T, hv) each, fp32
        o, ssm = gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            initial_state=state.get("ssm"),
            cu_seqlens=cu,
            output_final_state=return_state,
            chunk_size=self.config.chunk_size,
            kernel=self.config.kernel,
            segments=segments,
        )  # (B, T, hv, dv)
        if ssm is None:
            return o, None
        finals["ssm"] = ssm  # fp32 (fp64 for fp64 inputs)
        return o, finals

    def _conv_fused(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        weights: list[torch.Tensor],
        segments: Segments | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training call's conv + SiLU (+ L2 norm of q and k) by ``conv_triton``: ``q, k (B, T, hk*dk)``, ``v (B,
        T, hv*dv)`` -> ``(B, T, hk, dk)`` twice and ``(B, T, hv, dv)``; ``weights`` the q/k/v filters ``(C, K)``."""
        from mcore_ssm.conv_triton import conv1d_silu_train

        dk, dv = self.head_k_dim, self.head_v_dim
        pos = segments.pos if segments is not None else None  # (N,); rows: the kernel takes t % T
        return (
            conv1d_silu_train(q, weights[0], pos=pos, norm_head=dk).unflatten(-1, (-1, dk)),
            conv1d_silu_train(k, weights[1], pos=pos, norm_head=dk).unflatten(-1, (-1, dk)),
            conv1d_silu_train(v, weights[2], pos=pos).unflatten(-1, (-1, dv)),
        )

    def step(
        self, hidden: torch.Tensor, state: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One new token per sequence (decode): ``hidden (S, H)``, ``state {name: (S, *shape)}`` ->
        ``(out (S, H), new state)``; the given state tensors are not modified."""
        dk, dv = self.head_k_dim, self.head_v_dim
        q, k, v, z, b, a = project(hidden, (self.q, self.k, self.v, self.z, self.b, self.a))
        new: dict[str, torch.Tensor] = {}
        mixed = []
        for name, x, conv in (("conv_q", q, self.conv_q), ("conv_k", k, self.conv_k), ("conv_v", v, self.conv_v)):
            weight = conv.local_weight()  # (C, K)
            self._check_channels(name, x, weight)
            y, new[name] = causal_conv1d_step(x, state[name], weight)  # (S, C)
            mixed.append(y)
        q = l2_normalize(mixed[0].unflatten(-1, (-1, dk)))  # (S, hk, dk)
        k = l2_normalize(mixed[1].unflatten(-1, (-1, dk)))  # (S, hk, dk)
        v = mixed[2].unflatten(-1, (-1, dv))  # (S, hv, dv)
        beta, g = self._gates(b, a, self.A_log.local_weight())  # (S, hv)
        o, new["ssm"] = gated_delta_rule_step(q, k, v, g, beta, state["ssm"])  # (S, hv, dv)
        return self._output(o, z), new

    def _gates(self, b: torch.Tensor, a: torch.Tensor, a_log: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``beta = sigmoid(b)`` and ``g = -exp(A_log) * softplus(a + dt_bias)`` (``a`` has the bias; ``a_log (hv, 1)``
        the heads' rows), in fp32 (fp64 for fp64 inputs)."""
        compute = torch.promote_types(a.dtype, torch.float32)
        decay = a_log[:, 0].to(compute).exp()  # (hv,) A
        return torch.sigmoid(b.to(compute)), -decay * F.softplus(a.to(compute))

    def _output(self, o: torch.Tensor, z: torch.Tensor, *, fused: bool = False) -> torch.Tensor:
        """Gated RMSNorm per value head, then the output projection: ``o (..., hv, dv)`` -> ``(..., H)``.
        ``fused``: the norm by ``norm_triton`` (whole calls, where ``kernel_choice.fused_ops`` says so)."""
        if fused:
            from mcore_ssm.norm_triton import gated_rms_norm_triton

            dv, eps = self.head_v_dim, self.config.norm_eps
            normed = gated_rms_norm_triton(o.flatten(-2), z, self.norm_weight, eps, group_size=dv)  # (..., hv*dv)
            return self.out(normed.to(z.dtype))
        gate = z.unflatten(-1, (-1, self.head_v_dim))  # (..., hv, dv)
        normed = gated_rms_norm(o, gate, self.norm_weight, self.config.norm_eps).to(z.dtype)  # (..., hv, dv)
        return self.out(normed.flatten(-2))

    def _check_channels(self, name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
        if x.shape[-1] != weight.shape[0]:
            raise ValueError(
                f"gdn: {name} filter holds {weight.shape[0]} channels for {x.shape[-1]} projected ones: its rows "
                "must be split over tensor-parallel ranks like the projection's"
            )

    # ------------------------------------------------------------------------------------------------ state

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``{name: (shape, dtype)}`` of one sequence's state on this rank (a tensor-parallel rank: its heads)."""
        width = self.config.conv_kernel - 1
        dtype = self.q.weight.dtype
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            name: ((conv.local_weight().shape[0], width), dtype)
            for name, conv in (("conv_q", self.conv_q), ("conv_k", self.conv_k), ("conv_v", self.conv_v))
        }
        heads = self.A_log.local_weight().shape[0]
        shapes["ssm"] = ((heads, self.head_k_dim, self.head_v_dim), torch.float32)
        return shapes

    def zero_state(self, sequences: int, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """``{name: zeros (sequences, *shape)}``: the state before a sequence's first token."""
        device = device if device is not None else self.q.weight.device
        return {
            name: torch.zeros(sequences, *shape, dtype=dtype, device=device)
            for name, (shape, dtype) in self.state_shapes().items()
        }

    def cache_spec(self) -> RecurrentStateSpec:
        """What the inference cache keeps per sequence (``DeclaresCache``): ``state_shapes``."""
        return RecurrentStateSpec(states=self.state_shapes())

    def flops(self, shape: FlopsShape) -> int:
        """Projections, conv and the chunked rule (per token and value head: the inter-chunk state products,
        about ``3 dk dv``, and the intra-chunk ones, about ``C (2 dk + 2 dv)``, multiply-adds)."""
        hidden = self.q.in_features
        rows = sum(lin.out_features for lin in (self.q, self.k, self.v, self.z, self.b, self.a))
        projections = 2 * shape.tokens * hidden * (rows + self.out.in_features)
        channels = self.conv_q.out_features + self.conv_k.out_features + self.conv_v.out_features
        conv = 2 * shape.tokens * channels * self.config.conv_kernel
        dk, dv, heads = self.head_k_dim, self.head_v_dim, self.A_log.out_features
        rule = 2 * shape.tokens * heads * (3 * dk * dv + self.config.chunk_size * (2 * dk + 2 * dv))
        return projections + conv + rule
