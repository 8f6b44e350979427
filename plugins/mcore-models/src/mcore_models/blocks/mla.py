"""Multi-head latent attention (DeepSeek-V2/V3): low-rank Q and KV with decoupled RoPE dims.

Shape legend: B rows, T new tokens, S keys (cached + new), H hidden, nh heads, c ``kv_lora_rank``,
dn ``qk_nope_head_dim``, dr ``qk_rope_head_dim`` (shared by all heads for K), dv ``v_head_dim``.

Training uses the plain form: the latent ``c_kv`` is expanded to per-head K and V. Decoding uses
the absorbed form: ``W_uk`` is folded into the query and ``W_uv`` into the output, so attention runs as
MQA over the cached latent ``(c + dr)`` per token and per-head K/V are never formed. Both forms compute
the same function (checked in tests).

Both forms hand ``q``, ``k``, ``v`` to the attention seam (``ctx.attention``, else the block's default
backend; ``mcore_models.attention_backends``), like ``Attention``. Under an inference cache
(``ctx.kv_cache``) ``forward`` runs the absorbed form: it appends the latent key ``[norm(c_kv) | roped k_pe]``
``(N, 1, c + dr)`` to the layer's latent cache (``cache_spec``: no values) and hands the backend that key as
``k`` and its first ``c`` channels as ``v``, with the plain form's softmax scale. ``forward_absorbed`` is the
same form over a contiguous latent cache the caller holds (its own SDPA call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mcore.params import Init, ParamSpec
from mcore.protocols.block import AttentionCacheSpec, BlockContext, BlockShared, FlopsShape
from mcore_models.attention_backends.auto import AutoBackend
from mcore_models.attention_backends.seam import attend as attend_seam
from mcore_models.blocks.attention import row_positions
from mcore_models.blocks.base import Block, check_positive
from mcore_models.blocks.masking import attend, attention_mask
from mcore_models.blocks.norms import RMSNorm
from mcore_models.blocks.rope import RopeFields, Rotary, _yarn_mscale, check_rope
from mcore_models.kernels.rope import apply_rope


class MLA(Block):
    """``forward(hidden (B, T, H), ctx) -> (B, T, H)`` (absorbed under ``ctx.kv_cache``); ``forward_absorbed``
    for decode with a contiguous latent cache."""

    @dataclass(kw_only=True, slots=True)
    class Config(RopeFields):
        num_heads: int = 8
        """Attention heads."""
        q_lora_rank: int | None = None
        """Rank of the query down-projection (none: queries projected directly from the hidden state)."""
        kv_lora_rank: int = 128
        """Rank of the compressed key/value latent (what decoding caches per token, with the RoPE key)."""
        qk_nope_head_dim: int = 32
        """Per-head query/key dims without RoPE."""
        qk_rope_head_dim: int = 16
        """Per-head query/key dims with RoPE (the key part is shared by all heads; even)."""
        v_head_dim: int = 32
        """Per-head value dims."""
        norm_eps: float = 1e-5
        """Epsilon of the latent norms (finite, > 0)."""
        sliding_window: int | None = None
        """Each token sees at most this many tokens, itself included (none: the whole row)."""
        attention_scale: float | None = None
        """Softmax scale (none: 1/sqrt(qk_nope_head_dim + qk_rope_head_dim), times yarn's mscale squared)."""

        def __post_init__(self) -> None:
            for key in (
                "num_heads",
                "q_lora_rank",
                "kv_lora_rank",
                "qk_nope_head_dim",
                "qk_rope_head_dim",
                "v_head_dim",
                "norm_eps",
                "sliding_window",
                "attention_scale",
            ):
                check_positive("mla", key, getattr(self, key))
            check_rope(self, "mla", self.qk_rope_head_dim)

    def __init__(self, config: Config | None = None, *, hidden_size: int, shared: BlockShared | None = None) -> None:
        super().__init__()
        cfg = self.config = config or self.Config()
        self.shared = shared or BlockShared(hidden_size=hidden_size)
        nh, dn, dr, dv, c = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        q_in = cfg.q_lora_rank or hidden_size
        self.q_down = nn.Linear(hidden_size, q_in, bias=False) if cfg.q_lora_rank else nn.Identity()
        self.q_norm = (
            RMSNorm(RMSNorm.Config(norm_eps=cfg.norm_eps), hidden_size=q_in) if cfg.q_lora_rank else nn.Identity()
        )
        self.q_up = nn.Linear(q_in, nh * (dn + dr), bias=False)
        self.kv_down = nn.Linear(hidden_size, c + dr, bias=False)
        self.kv_norm = RMSNorm(RMSNorm.Config(norm_eps=cfg.norm_eps), hidden_size=c)
        self.kv_up = nn.Linear(c, nh * (dn + dv), bias=False)
        self.out = nn.Linear(nh * dv, hidden_size, bias=False)
        self.rotary = Rotary(cfg, dr)
        mup = self.shared.mup_width_mult is not None
        scale = cfg.attention_scale or (1.0 / (dn + dr) if mup else 1.0 / math.sqrt(dn + dr))
        if cfg.attention_scale is None and cfg.rope_scaling == "yarn" and cfg.rope_mscale_all_dim:
            scale *= _yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2
        self.scale = scale
        self.default_attention = AutoBackend()  # when ctx.attention is None (or declines the call)
        self.reset_parameters()

    def param_specs(self) -> dict[str, ParamSpec]:
        """``q_up`` and ``kv_up`` rows are per head (``[nope | rope]``, ``[k | v]``); ``kv_down`` rows are
        ``[latent | rope key]`` (``mcore.params``). Inits: normal(``init_std``), the output projection
        normal(``output_init_std``); the latent norms declare their own. Tensor parallelism splits the
        heads after the latent projections (as Megatron does): ``q_down``, ``kv_down`` and the latent
        norms ``replicate``, ``q_up`` and ``kv_up`` ``column`` in whole heads, ``out`` ``row``."""
        cfg = self.config
        dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        std = Init("normal", std=self.shared.init_std)
        latent = (("latent", cfg.kv_lora_rank), ("k_rope", dr))
        specs = {
            "q_up.weight": ParamSpec("matrix", head_rows=dn + dr, init=std, tp="column"),
            "kv_down.weight": ParamSpec("matrix", splits=latent, init=std, tp="replicate"),
            "kv_up.weight": ParamSpec("matrix", head_rows=dn + dv, init=std, tp="column"),
            "out.weight": ParamSpec("matrix", init=Init("normal", std=self.shared.out_std), tp="row"),
        }
        if isinstance(self.q_down, nn.Linear):
            specs["q_down.weight"] = ParamSpec("matrix", init=std, tp="replicate")
        return specs

    def _queries(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):  # type: ignore[no-untyped-def]
        cfg = self.config
        batch, seq, _ = hidden.shape
        dn, dr = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        # heads counted with -1: a tensor-parallel rank holds some of them (q_up column-parallel)
        q = self.q_up(self.q_norm(self.q_down(hidden))).view(batch, seq, -1, dn + dr)  # (B, T, nh, dn+dr)
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        latent, k_pe = self.kv_down(hidden).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        latent = self.kv_norm(latent)  # (B, T, c)
        q_pe, k_pe = apply_rope(q_pe.contiguous(), k_pe.reshape(batch, seq, 1, -1), cos, sin)  # (B,T,nh,dr), (B,T,1,dr)
        return q_nope, q_pe, latent, k_pe.view(batch, seq, -1)

    def forward(self, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        cfg = self.config
        batch, seq, _ = hidden.shape
        dn, dv = cfg.qk_nope_head_dim, cfg.v_head_dim
        cos, sin = self.rotary(row_positions(hidden, ctx))  # (B, T, dr/2)
        q_nope, q_pe, latent, k_pe = self._queries(hidden, cos, sin)
        if ctx.kv_cache is not None:  # inference: the absorbed form over the latent cache
            return self._forward_cached(q_nope, q_pe, latent, k_pe, ctx)
        # the rope key is computed once and read by every head: with heads split over ranks its gradient
        # is summed over them (identity without tensor parallelism)
        k_pe = ctx.share_across_heads(k_pe)
        # nh: the heads this module holds (all of them, or a tensor-parallel rank's share)
        k_nope, v = self.kv_up(latent).view(batch, seq, -1, dn + dv).split([dn, dv], dim=-1)  # (B, T, nh, dn|dv)
        nh = k_nope.shape[2]
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, nh, dn+dr)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(batch, seq, nh, -1)], dim=-1)  # (B, T, nh, dn+dr)
        window = cfg.sliding_window
        out = attend_seam(q, k, v, ctx=ctx, scale=self.scale, window=window, default=self.default_attention)
        return self.out(out.reshape(batch, seq, nh * dv))  # (B, T, nh, dv) -> (B, T, H)

    def _absorb(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_uk (nh, dn, c)`` and ``W_uv (nh, dv, c)``: ``kv_up``'s rows per head (the heads this module holds)."""
        cfg = self.config
        dn, dv = cfg.qk_nope_head_dim, cfg.v_head_dim
        w_uk, w_uv = self.kv_up.weight.view(-1, dn + dv, cfg.kv_lora_rank).split([dn, dv], dim=1)
        return w_uk, w_uv

    def _forward_cached(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, ctx: BlockContext
    ) -> torch.Tensor:
        """The absorbed form under ``ctx.kv_cache``: append the step's latent keys, attend over the layer's pages."""
        assert ctx.kv_cache is not None
        batch, seq = latent.shape[:2]
        c = self.config.kv_lora_rank
        key = torch.cat([latent, k_pe], dim=-1)  # (B, T, c+dr)
        ctx.kv_cache.append(ctx.layer_index, key.reshape(batch * seq, 1, -1).to(self.kv_down.weight.dtype), None)
        w_uk, w_uv = self._absorb()  # (nh, dn, c), (nh, dv, c)
        q_latent = torch.einsum("btnd,ndc->btnc", q_nope, w_uk)  # (B, T, nh, c)
        q = torch.cat([q_latent, q_pe], dim=-1)  # (B, T, nh, c+dr)
        k = key[:, :, None]  # (B, T, 1, c+dr): MQA over the latent
        window = self.config.sliding_window
        out = attend_seam(q, k, k[..., :c], ctx=ctx, scale=self.scale, window=window, default=self.default_attention)
        out = torch.einsum("btnc,nvc->btnv", out, w_uv)  # (B, T, nh, c) -> (B, T, nh, dv)
        return self.out(out.reshape(batch, seq, -1))  # (B, T, H)

    def cache_spec(self) -> AttentionCacheSpec:
        """What the inference cache keeps per token (``DeclaresCache``): the latent key ``c + dr`` (one head, no
        values: the absorbed form reads values as its first ``c`` channels) in the parameters' dtype, and the window."""
        cfg = self.config
        return AttentionCacheSpec(
            kv_heads=1,
            head_dim=cfg.kv_lora_rank + cfg.qk_rope_head_dim,
            value_dim=None,
            dtype=self.kv_down.weight.dtype,
            window=cfg.sliding_window,
        )

    def forward_absorbed(
        self,
        hidden: torch.Tensor,
        ctx: BlockContext,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Decode form: attend over ``cache = (latent (B, S0, c), k_pe (B, S0, dr))`` plus the new tokens.

        Returns the output ``(B, T, H)`` and the grown cache. ``ctx.positions`` (or
        ``S0 + arange(T)``) are the new tokens' positions; packed rows are not supported here.
        """
        cfg = self.config
        batch, seq, _ = hidden.shape
        dv = cfg.v_head_dim
        past = 0 if cache is None else cache[0].shape[1]
        positions = ctx.positions
        if positions is None:
            positions = torch.arange(past, past + seq, device=hidden.device).expand(batch, seq)
        cos, sin = self.rotary(positions)
        q_nope, q_pe, latent, k_pe = self._queries(hidden, cos, sin)
        if cache is not None:
            latent, k_pe = torch.cat([cache[0], latent], dim=1), torch.cat([cache[1], k_pe], dim=1)  # (B, S, c|dr)
        w_uk, w_uv = self._absorb()  # (nh, dn, c), (nh, dv, c)
        nh = w_uk.shape[0]  # the heads held (a tensor-parallel rank's share)
        q_latent = torch.einsum("btnd,ndc->bntc", q_nope, w_uk)  # (B, nh, T, c)
        q = torch.cat([q_latent, q_pe.transpose(1, 2)], dim=-1)  # (B, nh, T, c+dr)
        k = torch.cat([latent, k_pe], dim=-1)[:, None]  # (B, 1, S, c+dr)
        mask = None
        if past or cfg.sliding_window is not None:
            mask = attention_mask(batch, seq, hidden.device, cu_seqlens=None, window=cfg.sliding_window, offset=past)
        ctx_latent = attend(q, k, latent[:, None], mask=mask, scale=self.scale)  # (B, nh, T, c)
        out = torch.einsum("bntc,nvc->btnv", ctx_latent, w_uv).reshape(batch, seq, nh * dv)
        return self.out(out), (latent, k_pe)

    def flops(self, shape: FlopsShape) -> int:
        cfg = self.config
        linears = [m for m in (self.q_down, self.q_up, self.kv_down, self.kv_up, self.out) if isinstance(m, nn.Linear)]
        projections = sum(2 * shape.tokens * m.in_features * m.out_features for m in linears)
        head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
        return projections + 2 * shape.attended * cfg.num_heads * head
