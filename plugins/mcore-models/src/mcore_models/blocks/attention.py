"""Grouped-query self-attention (MHA when ``num_kv_heads == num_heads``, MQA when it is 1).

Shape legend: B rows, T tokens, H hidden, nh query heads, nkv key/value heads, hd head dim.

Notable: separate ``q``, ``k`` and ``v`` projections (as Hugging Face stores them), so tensor
parallelism shards each by rows into whole heads, and ``forward`` reads the head counts from the
tensors it gets (a rank holding some of the heads runs the same code); optional QK-norm (RMSNorm
over each head's dims, before RoPE; ``1 + w`` scales with ``qk_norm_zero_centered``), optional sliding window,
biases on Q/K/V and/or the output, per-document positions for packed rows, an optional sigmoid output gate
(``output_gate``, Qwen3-Next's gated attention: ``out(attn * sigmoid(gate(x)))``, ``gate`` a query-sized
projection of its own, split into heads like ``q``). Under an inference cache (``ctx.kv_cache``, the engine's
step of new tokens) it appends the step's keys and values (after QK-norm and RoPE) to the layer's pages and attends over
them (``cache_spec`` says what it keeps). The attention itself is a seam: ``q``, ``k``, ``v`` go to
``ctx.attention`` (a layout's ring attention, the engine's paged attention, the run's choice) or else
to the block's default backend (``auto``: FlexAttention for packed documents and windows on CUDA, SDPA
otherwise; ``paged`` under a cache; see ``mcore_models.attention_backends``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from mcore.params import ParamSpec
from mcore.protocols.block import AttentionCacheSpec, BlockContext, BlockShared, FlopsShape
from mcore_models.attention_backends.auto import AutoBackend
from mcore_models.attention_backends.paged import step_bounds, step_positions
from mcore_models.attention_backends.seam import attend
from mcore_models.blocks.base import Block, check_positive, linear_specs, prefixed, project
from mcore_models.blocks.norms import RMSNorm
from mcore_models.blocks.rope import RopeFields, Rotary, check_rope
from mcore_models.kernels.rope import apply_rope


def row_positions(hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
    """``ctx.positions``, else under a cache each new token's position in its sequence (from the cache's
    ``seq_lens``), else ``0..T-1`` for every row; ``(B, T)`` int64."""
    if ctx.positions is not None:
        return ctx.positions
    batch, seq = hidden.shape[:2]
    if ctx.kv_cache is not None:
        return step_positions(ctx.kv_cache.seq_lens, step_bounds(ctx, batch, seq), batch, seq).to(hidden.device)
    return torch.arange(seq, device=hidden.device).expand(batch, seq)


class Attention(Block):
    """Causal GQA self-attention with RoPE; ``forward(hidden (B, T, H), ctx) -> (B, T, H)``."""

    @dataclass(kw_only=True, slots=True)
    class Config(RopeFields):
        num_heads: int = 8
        """Query heads."""
        num_kv_heads: int | None = None
        """Key/value heads; must divide num_heads (none: num_heads, MHA; 1: MQA)."""
        head_dim: int | None = None
        """Dims per head (none: hidden_size // num_heads)."""
        qkv_bias: bool = False
        """Biases on the query, key and value projections."""
        out_bias: bool = False
        """Bias on the output projection."""
        qk_norm: bool = False
        """RMSNorm over each query and key head before RoPE."""
        norm_eps: float = 1e-5
        """Epsilon of the QK-norm (finite, > 0)."""
        qk_norm_zero_centered: bool = False
        """QK-norm scales stored as gamma - 1 (effective scale 1 + w, initialised to 0), as Qwen3-Next's."""
        output_gate: bool = False
        """Gated attention (Qwen3-Next): the heads' output times sigmoid of a query-sized projection of the
        input (``gate``, with the q/k/v bias setting), before the output projection."""
        sliding_window: int | None = None
        """Each token sees at most this many tokens, itself included (none: the whole row)."""
        attention_scale: float | None = None
        """Softmax scale of the scores (none: 1/sqrt(head_dim), or 1/head_dim under muP)."""
        no_rope: bool = False
        """No positional encoding (NoPE, as Nemotron-H's attention layers): queries and keys are not rotated and
        the rope_* keys are unused."""

        def __post_init__(self) -> None:
            for key in ("num_heads", "num_kv_heads", "head_dim", "sliding_window", "norm_eps", "attention_scale"):
                check_positive("attention", key, getattr(self, key))
            if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
                raise ValueError(f"num_kv_heads = {self.num_kv_heads}: must divide num_heads = {self.num_heads}")
            check_rope(self, "attention", self.head_dim)

    def __init__(self, config: Config | None = None, *, hidden_size: int, shared: BlockShared | None = None) -> None:
        super().__init__()
        cfg = self.config = config or self.Config()
        self.shared = shared or BlockShared(hidden_size=hidden_size)
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads or cfg.num_heads
        self.head_dim = cfg.head_dim or hidden_size // cfg.num_heads
        if cfg.head_dim is None and hidden_size % cfg.num_heads:
            raise ValueError(f"num_heads = {cfg.num_heads}: must divide hidden_size = {hidden_size}, or set head_dim")
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q = nn.Linear(hidden_size, q_dim, bias=cfg.qkv_bias)
        self.k = nn.Linear(hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.v = nn.Linear(hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.out = nn.Linear(q_dim, hidden_size, bias=cfg.out_bias)
        self.gate = nn.Linear(hidden_size, q_dim, bias=cfg.qkv_bias) if cfg.output_gate else None
        norm_cfg = RMSNorm.Config(norm_eps=cfg.norm_eps, zero_centered_gamma=cfg.qk_norm_zero_centered)
        self.q_norm = RMSNorm(norm_cfg, hidden_size=self.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(norm_cfg, hidden_size=self.head_dim) if cfg.qk_norm else nn.Identity()
        self.rotary = Rotary(cfg, self.head_dim)
        mup_scale = 1.0 / self.head_dim if self.shared.mup_width_mult is not None else None
        self.scale = cfg.attention_scale or mup_scale or 1.0 / math.sqrt(self.head_dim)
        self.default_attention = AutoBackend()  # when ctx.attention is None (or declines the call)
        self.reset_parameters()

    def param_specs(self) -> dict[str, ParamSpec]:
        """``q``, ``k``, ``v`` (and ``gate``) rows (and bias entries) are heads of ``head_dim`` rows each; ``out`` is a
        plain matrix. Inits: normal(``init_std``) for q/k/v/gate, normal(``output_init_std``) for ``out``, zero
        biases (the QK-norm scales are ones, zeros when zero-centred). Tensor parallelism: q/k/v/gate ``column`` in
        whole heads (``forward``
        counts heads with ``-1``), ``out`` ``row`` (its bias ``replicate``); the QK-norm scales ``partial``
        (whole on every rank, each rank's gradient from its own heads: the layout sums them)."""
        specs: dict[str, ParamSpec] = {}
        std = self.shared.init_std
        for name in ("q", "k", "v") + (("gate",) if self.gate is not None else ()):
            specs |= prefixed(
                name, linear_specs(getattr(self, name), "matrix", std, head_rows=self.head_dim, tp="column")
            )
        for name in ("q_norm", "k_norm"):  # the norm's own declaration, its gradient summed over the head ranks
            own: dict[str, ParamSpec] = getattr(getattr(self, name), "param_specs", dict)()
            specs |= prefixed(name, {key: dataclasses.replace(spec, tp="partial") for key, spec in own.items()})
        return specs | prefixed("out", linear_specs(self.out, "matrix", self.shared.out_std, tp="row"))

    def forward(self, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        batch, seq, _ = hidden.shape
        # head counts come from the projections' outputs: a tensor-parallel rank holds some of the heads
        linears = (self.q, self.k, self.v) if self.gate is None else (self.q, self.k, self.v, self.gate)
        q, k, v, *gate = project(hidden, linears)  # one GEMM while the weights are plain tensors
        q = self.q_norm(q.view(batch, seq, -1, self.head_dim))  # (B, T, nh, hd)
        k = self.k_norm(k.view(batch, seq, -1, self.head_dim))  # (B, T, nkv, hd)
        v = v.view(batch, seq, -1, self.head_dim)  # (B, T, nkv, hd)
        if not self.config.no_rope:
            cos, sin = self.rotary(row_positions(hidden, ctx))  # (B, T, rd/2)
            q, k = apply_rope(q, k, cos, sin)
        if ctx.kv_cache is not None:  # inference: store the step's keys/values; the backend reads the pages
            dtype = self.k.weight.dtype
            ctx.kv_cache.append(ctx.layer_index, k.flatten(0, 1).to(dtype), v.flatten(0, 1).to(dtype))  # (N, nkv, hd)
        window, default = self.config.sliding_window, self.default_attention
        out = attend(q, k, v, ctx=ctx, scale=self.scale, window=window, default=default)  # (B, T, nh, hd)
        out = out.reshape(batch, seq, -1)  # (B, T, nh*hd)
        if gate:  # gated attention: each output element times sigmoid of its gate
            out = out * torch.sigmoid(gate[0])
        return self.out(out)  # (B, T, H)

    def fused_groups(self) -> list[tuple[nn.Linear, ...]]:
        """The linears projected in one GEMM (``GPT.pack_for_inference`` lays them out back to back)."""
        return [(self.q, self.k, self.v) if self.gate is None else (self.q, self.k, self.v, self.gate)]

    def cache_spec(self) -> AttentionCacheSpec:
        """What the inference cache keeps per token (``DeclaresCache``): this module's key/value heads (a
        tensor-parallel rank's share), ``head_dim`` keys and values, in the parameters' dtype, and the window."""
        weight = self.k.weight
        local = weight.to_local() if hasattr(weight, "to_local") else weight  # a tp layout's DTensor: this rank's rows
        kv_heads = local.shape[0] // self.head_dim
        return AttentionCacheSpec(
            kv_heads=kv_heads,
            head_dim=self.head_dim,
            value_dim=self.head_dim,
            dtype=self.k.weight.dtype,
            window=self.config.sliding_window,
        )

    def flops(self, shape: FlopsShape) -> int:
        hidden = self.q.in_features
        rows = self.q.out_features + self.k.out_features + self.v.out_features + self.out.in_features
        rows += self.gate.out_features if self.gate is not None else 0
        projections = 2 * shape.tokens * hidden * rows
        scores = 2 * 2 * shape.attended * self.num_heads * self.head_dim  # QK^T and PV
        return projections + scores
