"""The ``gpt`` model: a pre-norm decoder composed of blocks chosen by name.

Shape legend: B rows, T tokens per row, H hidden, V vocabulary.

Notable:
* ``attention``, ``mlp`` and ``norm`` name registered blocks, so a block of another plugin (a MoE
  MLP) slots in by name; each block's ``Config`` is filled from the model config fields of the
  same names.
* Given labels, the loss comes from a fused linear + cross-entropy over token chunks
  (``loss_chunk_size``) and optionally vocabulary blocks (``loss_vocab_chunk_size``); the
  ``(B*T, V)`` logits are never formed. Auxiliary losses (the call's ``ctx.aux_losses`` collector,
  one per layer and name) and the MTP loss (``mtp_loss_weight`` times the mean over depths) are added.
* Each layer call gets its own frozen view ``ctx.for_layer(i)`` (MTP depths continue the numbering and
  get the next-token embeddings in ``extra``), so recompute re-runs a layer with what it first saw.
* Packed rows (``ctx.cu_seqlens``): positions restart per document and attention never crosses one.
* Init: normal(0, ``init_std``), output projections of each layer scaled by ``1/sqrt(2 * layers)``;
  drawn on the CPU from ``seed`` so every device gets the same weights.
* muP (``mup_base_width``): hidden matrices' init std divided by ``sqrt(width / base)``, logits
  multiplied by ``base / width``, attention scale ``1/head_dim``. Learning-rate scaling is the
  optimizer's job.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mcore.params import ParamSpec
from mcore.protocols.block import AuxLosses, BlockContext, FlopsShape
from mcore_models.blocks.attention import Attention
from mcore_models.blocks.base import check_choice, check_non_negative, check_positive, normal_
from mcore_models.blocks.masking import positions_from_cu_seqlens
from mcore_models.blocks.mla import MLA
from mcore_models.blocks.mlp import GELU_APPROXIMATIONS, ClampedSwiGLU, GeluMLP, SwiGLU
from mcore_models.blocks.mtp import MTP, NEXT_EMBEDDINGS
from mcore_models.blocks.norms import LayerNorm, RMSNorm
from mcore_models.blocks.rope import RopeFields, check_rope
from mcore_models.kernels.linear_ce import IGNORE_INDEX, linear_cross_entropy_sum
from mcore_models.presets import presets as _presets

#: Blocks used when the model is built without a registry (same names as registered).
LOCAL_BLOCKS: Mapping[str, type[nn.Module]] = {
    "attention": Attention,
    "mla": MLA,
    "swiglu": SwiGLU,
    "clamped-swiglu": ClampedSwiGLU,
    "gelu-mlp": GeluMLP,
    "rmsnorm": RMSNorm,
    "layernorm": LayerNorm,
    "mtp": MTP,
}


@dataclass(kw_only=True, slots=True)
class GPTConfig(RopeFields):
    """The ``[model]`` section of a run using ``name = "gpt"``; ``check_config`` runs on construction."""

    preset: str | None = None
    """Architecture to start from: tiny, bench-0.9b, llama3.2-1b, llama3-8b, qwen2.5-0.5b, deepseek-v3-mini (keys given beside it win)."""
    vocab_size: int = 32768
    """Rows of the embedding and the output head (at least the tokenizer's vocabulary)."""
    hidden_size: int = 1024
    """Width of the residual stream."""
    num_layers: int = 8
    """Transformer layers."""
    num_heads: int = 8
    """Query heads (must divide hidden_size unless head_dim is set)."""
    num_kv_heads: int | None = None
    """Key/value heads of 'attention'; must divide num_heads (none: num_heads, MHA; 1: MQA)."""
    head_dim: int | None = None
    """Dims per head of 'attention' (none: hidden_size / num_heads)."""
    ffn_hidden_size: int = 2816
    """Hidden size of the MLP (per branch for the gated ones)."""
    attention: str = "attention"
    """Attention block by name: 'attention' (GQA with RoPE), 'mla' (multi-head latent), or a plugin's."""
    mlp: str = "swiglu"
    """MLP block by name: 'swiglu', 'gelu-mlp', 'clamped-swiglu', or a plugin's."""
    norm: str = "rmsnorm"
    """Norm block by name: 'rmsnorm', 'layernorm', or a plugin's."""
    norm_eps: float = 1e-5
    """Epsilon of every norm (finite, > 0)."""
    zero_centered_gamma: bool = False
    """Store norm scales as gamma - 1, initialised to 0 (weight decay then pulls towards the identity)."""
    tie_embeddings: bool = False
    """Use the embedding matrix as the output head."""
    qkv_bias: bool = False
    """Bias on the query/key/value projection (Qwen2)."""
    out_bias: bool = False
    """Bias on the attention output projection."""
    mlp_bias: bool = False
    """Biases on the MLP projections."""
    qk_norm: bool = False
    """RMSNorm over each query and key head before RoPE."""
    sliding_window: int | None = None
    """Each token sees at most this many tokens, itself included (none: the whole row)."""
    max_position_embeddings: int = 4096
    """Longest sequence the model supports; train.seq_len may not exceed it."""
    q_lora_rank: int | None = None
    """'mla': rank of the query down-projection (none: queries projected directly from the hidden state)."""
    kv_lora_rank: int = 128
    """'mla': rank of the compressed key/value latent (what decoding caches per token)."""
    qk_nope_head_dim: int = 32
    """'mla': per-head query/key dims without RoPE."""
    qk_rope_head_dim: int = 16
    """'mla': per-head query/key dims with RoPE (the key part is shared by all heads)."""
    v_head_dim: int = 32
    """'mla': per-head value dims."""
    clamp_limit: float = 7.0
    """'clamped-swiglu': the gate is clamped to at most this and the up branch to [-limit, limit] (finite, > 0)."""
    gelu_approximate: str = "none"
    """'gelu-mlp': 'none' (exact GeLU) or 'tanh'."""
    mtp_num_layers: int = 0
    """Multi-token prediction depths, DeepSeek-V3 style (0: none)."""
    mtp_loss_weight: float = 0.1
    """Weight of the mean MTP loss added to the main loss (finite, >= 0)."""
    init_std: float = 0.02
    """Std of the normal init (each layer's output projections get / sqrt(2 * num_layers); finite, > 0)."""
    mup_base_width: int | None = None
    """muP: the width the hyperparameters were tuned at (none: muP off)."""
    loss_chunk_size: int = 4096
    """Tokens per chunk of the fused output projection + cross-entropy (the full logits are never formed)."""
    loss_vocab_chunk_size: int | None = None
    """Vocabulary entries per block of that loss (none: the whole vocabulary per token chunk)."""
    hf_model_type: str = "llama"
    """Hugging Face family written by export: 'llama', 'qwen2', 'mistral' or 'deepseek_v3'."""

    def __post_init__(self) -> None:
        check_config(self)


def check_config(cfg: GPTConfig) -> None:
    """``ValueError`` naming ``model.<key>``, the value and what is allowed, for settings no model can be built from."""
    for key in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "ffn_hidden_size",
        "sliding_window",
        "max_position_embeddings",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "mup_base_width",
        "loss_chunk_size",
        "loss_vocab_chunk_size",
        "norm_eps",
        "clamp_limit",
        "init_std",
    ):
        check_positive("model", key, getattr(cfg, key))
    check_non_negative("model", "mtp_num_layers", cfg.mtp_num_layers)
    check_non_negative("model", "mtp_loss_weight", cfg.mtp_loss_weight)
    kv_heads = cfg.num_kv_heads or cfg.num_heads
    if cfg.num_heads % kv_heads:
        raise ValueError(
            f"model.num_kv_heads = {kv_heads}: must divide num_heads = {cfg.num_heads} (a divisor from 1 to num_heads)"
        )
    if cfg.head_dim is None and cfg.hidden_size % cfg.num_heads:
        raise ValueError(
            f"model.num_heads = {cfg.num_heads}: must divide hidden_size = {cfg.hidden_size}, or set head_dim"
        )
    check_choice("model", "gelu_approximate", cfg.gelu_approximate, GELU_APPROXIMATIONS)
    rotated = {"attention": cfg.head_dim or cfg.hidden_size // cfg.num_heads, "mla": cfg.qk_rope_head_dim}
    check_rope(cfg, "model", rotated.get(cfg.attention))  # another plugin's attention block checks its own dims


def block_values(cfg: GPTConfig) -> dict[str, Any]:
    """Model config fields plus the derived init/scale values blocks read by name."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    width_mult = cfg.hidden_size / cfg.mup_base_width if cfg.mup_base_width else 1.0
    init_std = cfg.init_std / math.sqrt(width_mult)
    values["init_std"] = init_std
    values["output_init_std"] = init_std / math.sqrt(2 * cfg.num_layers)
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    values["attention_scale"] = 1.0 / head_dim if cfg.mup_base_width else None
    return values


def make_block(cls: Any, values: Mapping[str, Any], hidden_size: int, **extra: Any) -> nn.Module:
    """``cls(cls.Config(<fields of the same names>), hidden_size=...)``."""
    config_cls = getattr(cls, "Config", None)
    if config_cls is None:
        return cls(hidden_size=hidden_size, **extra)
    names = {f.name for f in dataclasses.fields(config_cls)}
    return cls(config_cls(**{k: v for k, v in values.items() if k in names}), hidden_size=hidden_size, **extra)


class TransformerLayer(nn.Module):
    """``h + attention(norm(h))``, then ``h + mlp(norm(h))``."""

    attn_norm: Any
    attention: Any
    mlp_norm: Any
    mlp: Any

    def __init__(self, attention: nn.Module, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module) -> None:
        super().__init__()
        self.attn_norm, self.attention, self.mlp_norm, self.mlp = attn_norm, attention, mlp_norm, mlp

    def forward(self, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        hidden = hidden + self.attention(self.attn_norm(hidden, ctx), ctx)  # (B, T, H)
        return hidden + self.mlp(self.mlp_norm(hidden, ctx), ctx)

    def flops(self, shape: FlopsShape) -> int:
        return self.attention.flops(shape) + self.mlp.flops(shape)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for block in (self.attn_norm, self.attention, self.mlp_norm, self.mlp):
            block.reset_parameters(generator)


def mtp_labels(labels: torch.Tensor, positions: torch.Tensor, depth: int) -> torch.Tensor:
    """Labels for MTP depth ``depth``: ``labels[i + depth]`` where still in the same document, else ignored."""
    shifted = torch.full_like(labels, IGNORE_INDEX)  # (B, T)
    same_doc = positions[:, depth:] == positions[:, :-depth] + depth
    shifted[:, :-depth] = torch.where(same_doc, labels[:, depth:], IGNORE_INDEX)
    return shifted


class GPT(nn.Module):
    """Decoder-only transformer; ``forward(tokens (B, T), *, labels=None, ctx=None)``."""

    Config = GPTConfig
    final_norm: Any

    def __init__(self, config: GPTConfig, *, block_lookup: Callable[[str], Any] | None = None) -> None:
        super().__init__()
        check_config(config)
        self.config = cfg = config
        lookup = block_lookup or LOCAL_BLOCKS.__getitem__
        values = block_values(cfg)
        hidden = cfg.hidden_size

        def layer() -> TransformerLayer:
            return TransformerLayer(
                make_block(lookup(cfg.attention), values, hidden),
                make_block(lookup(cfg.mlp), values, hidden),
                make_block(lookup(cfg.norm), values, hidden),
                make_block(lookup(cfg.norm), values, hidden),
            )

        self.embed = nn.Embedding(cfg.vocab_size, hidden)
        self.layers = nn.ModuleList(layer() for _ in range(cfg.num_layers))
        self.final_norm = make_block(lookup(cfg.norm), values, hidden)
        self.head = None if cfg.tie_embeddings else nn.Linear(hidden, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            make_block(lookup("mtp"), values, hidden, layer=layer()) for _ in range(cfg.mtp_num_layers)
        )
        self.mtp_norms = nn.ModuleList(make_block(lookup(cfg.norm), values, hidden) for _ in range(cfg.mtp_num_layers))
        self.logit_scale = cfg.mup_base_width / hidden if cfg.mup_base_width else 1.0
        self.reset_parameters()

    def param_specs(self) -> dict[str, ParamSpec]:
        """The embedding and the untied head; a tied head is the embedding (one parameter). Blocks
        declare their own parameters (``mcore.params``)."""
        specs = {"embed.weight": ParamSpec("embedding")}
        if self.head is not None:
            specs["head.weight"] = ParamSpec("head")
        return specs

    # -- the network ------------------------------------------------------------------------
    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight  # (V, H)

    def forward(
        self, tokens: torch.Tensor, *, labels: torch.Tensor | None = None, ctx: BlockContext | None = None
    ) -> torch.Tensor:
        batch, seq = tokens.shape
        ctx = ctx if ctx is not None else BlockContext()
        if ctx.positions is None and ctx.cu_seqlens is not None:
            ctx = dataclasses.replace(ctx, positions=positions_from_cu_seqlens(ctx.cu_seqlens, batch, seq))
        aux_losses = ctx.aux_losses if ctx.aux_losses is not None else AuxLosses()  # this call's own collector
        ctx = dataclasses.replace(ctx, aux_losses=aux_losses)
        hidden = self.embed(tokens)  # (B, T, H)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, ctx.for_layer(index))  # each layer call gets its own view
        if labels is None:
            return F.linear(self.final_norm(hidden, ctx), self.output_weight) * self.logit_scale  # (B, T, V)

        loss = self._mean_loss(self.final_norm(hidden, ctx), labels)
        if len(self.mtp):
            positions = (
                ctx.positions
                if ctx.positions is not None
                else torch.arange(seq, device=tokens.device).expand(batch, seq)
            )
            mtp_total = torch.zeros((), dtype=torch.float32, device=tokens.device)
            for depth, (module, norm) in enumerate(zip(self.mtp, self.mtp_norms, strict=True), start=1):
                next_embeddings = self.embed(tokens.roll(-depth, dims=1))  # (B, T, H): t[i + depth]
                view = ctx.for_layer(len(self.layers) + depth - 1, extra={NEXT_EMBEDDINGS: next_embeddings})
                hidden = module(hidden, view)
                mtp_total = mtp_total + self._mean_loss(norm(hidden, view), mtp_labels(labels, positions, depth))
            loss = loss + self.config.mtp_loss_weight / len(self.mtp) * mtp_total
        for aux in aux_losses.values():  # once, after every layer: one entry per (layer, name)
            loss = loss + aux.float()
        return loss

    def _mean_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])  # (B*T, H)
        flat_labels = labels.reshape(-1)
        total = linear_cross_entropy_sum(
            flat,
            self.output_weight,
            flat_labels,
            chunk_size=self.config.loss_chunk_size,
            vocab_chunk_size=self.config.loss_vocab_chunk_size,
            scale=self.logit_scale,
        )
        return total / (flat_labels != IGNORE_INDEX).sum().clamp(min=1)

    # -- init, counting ---------------------------------------------------------------------
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        values = block_values(self.config)
        normal_(self.embed.weight, values["init_std"], generator)
        for layer in self.layers:
            layer.reset_parameters(generator)  # type: ignore[operator]
        self.final_norm.reset_parameters(generator)
        if self.head is not None:
            normal_(self.head.weight, values["init_std"], generator)
        for module, norm in zip(self.mtp, self.mtp_norms, strict=True):
            module.reset_parameters(generator)  # type: ignore[operator]
            norm.reset_parameters(generator)  # type: ignore[operator]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward_flops(self, batch: int, seq_len: int) -> int:
        """Forward FLOPs of ``batch`` rows of ``seq_len`` tokens (matmuls and attention scores only)."""
        window = min(self.config.sliding_window or seq_len, seq_len)
        attended = batch * (window * (window + 1) // 2 + (seq_len - window) * window)  # sum of min(i + 1, W)
        shape = FlopsShape(tokens=batch * seq_len, attended=attended)
        head = 2 * shape.tokens * self.config.hidden_size * self.config.vocab_size
        total = sum(layer.flops(shape) for layer in self.layers) + head  # type: ignore[operator]
        return total + sum(module.flops(shape) + head for module in self.mtp)  # type: ignore[operator]

    # -- the ModelFactory side ---------------------------------------------------------------
    @classmethod
    def presets(cls) -> Mapping[str, Mapping[str, Any]]:
        return _presets()

    @classmethod
    def build(
        cls,
        config: GPTConfig,
        *,
        seed: int,
        device: torch.device | str = "cpu",
        block_lookup: Callable[[str], Any] | None = None,
    ) -> GPT:
        """Build on ``device`` with weights drawn from ``seed`` (identical on every device)."""
        with torch.device("meta"):
            model = cls(config, block_lookup=block_lookup)
        model.to_empty(device=device)
        model.reset_parameters(torch.Generator(device="cpu").manual_seed(seed))
        return model

    @classmethod
    def check_run(cls, config: GPTConfig, run: Any) -> None:
        """Rules across sections, called by the core once the run's config is resolved."""
        seq_len = run.train.seq_len
        if seq_len > config.max_position_embeddings:
            raise ValueError(
                f"train.seq_len = {seq_len} is more than model.max_position_embeddings = "
                f"{config.max_position_embeddings}; lower train.seq_len or raise model.max_position_embeddings"
            )

    @classmethod
    def flops_per_token(cls, config: GPTConfig, seq_len: int) -> int:
        """Training FLOPs per token: ``3 * forward`` (backward = 2x forward).

        Forward per token = ``2 * (matmul weights of attention, MLP, output head and MTP)``
        ``+ 4 * layers * heads * qk_head_dim * attended / seq_len`` (QK^T and PV; for MLA the
        head dims are ``(dn + dr)`` for scores and ``dv`` for values); ``attended`` is
        ``seq_len * (seq_len + 1) / 2`` for causal rows (capped by the sliding window). Embedding
        lookups and norms are not counted.
        """
        with torch.device("meta"):
            model = cls(config)
        return 3 * model.forward_flops(1, seq_len) // seq_len

    @classmethod
    def export_hf(cls, model: GPT, config: GPTConfig, out_dir: Path) -> None:
        from mcore_models.hf import export_hf

        export_hf(model, config, Path(out_dir))

    @classmethod
    def import_hf(cls, path: Path, *, device: torch.device | str = "cpu") -> tuple[GPTConfig, GPT]:
        from mcore_models.hf import import_hf

        return import_hf(Path(path), device=device)
