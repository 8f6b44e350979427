"""The ``gpt`` model: a pre-norm decoder composed, layer by layer, of blocks chosen by name.

Shape legend: B rows, T tokens per row, H hidden, V vocabulary.

Notable:
* Composition: ``layers`` (a layer pattern) picks each layer's mixer (``attention``, ``mla``, or a
  plugin's) and MLP (``swiglu``, ``gelu-mlp``, ``clamped-swiglu``, a plugin's MoE, or ``none``),
  e.g. ``["3*mla/swiglu", "58*mla/moe"]``; without it every layer is ``mixer/mlp``. Each block
  takes its settings from its own table (``[model.attention]``, ``[model.swiglu]``...) validated
  against that block's ``Config``; what the model decides for every block (hidden size, layer
  count, init stds, muP) is passed explicitly as a ``BlockShared``, never matched by field name.
* The end of the model is a seam: ``forward`` is embed -> layers -> ``self.loss_head`` (``loss_head.py``:
  final norm, output projection, the fused linear + cross-entropy over token chunks
  (``loss_chunk_size``) and optionally vocabulary blocks (``loss_vocab_chunk_size``), never forming
  the ``(B*T, V)`` logits, and the MTP loss, ``mtp_loss_weight`` times the mean over depths). The
  head owns no parameters, so a layout swaps it (``model.loss_head = ...``) without changing a name.
  Each loss sum is divided by ``ctx.label_count``: the label count over ``ctx.loss_group``. The
  auxiliary losses (the call's ``ctx.aux_losses`` collector, one per layer and name) are added once.
* Pipeline stages (``stage_layers``, ``pipeline_stage``; ``stages.py``): embedding first, loss head
  last, each stage sharing the model's parameters under the model's names.
* Each layer call gets its own frozen view ``ctx.for_layer(i)`` (MTP depths continue the numbering and
  get the next-token embeddings in ``extra``), so recompute re-runs a layer with what it first saw.
* Packed rows (``ctx.cu_seqlens``): positions restart per document and attention never crosses one.
* Inference (``ctx.kv_cache``, a step of new tokens): attention and MLA append to the cache and read it
  (``cache_specs()`` says what each layer keeps); with ``LOGIT_ROWS`` in ``ctx.extra`` the head runs on those
  rows only. MTP depths are not run without labels; ``forward_with_hidden`` and ``mtp_forward`` serve
  speculative decoding (mcore-inference drafts tokens with the MTP depths over their own caches).
* With gradients off (``run_layers``) each residual add is done with the RMSNorm after it, one kernel on CUDA
  (``kernels/add_rmsnorm.py``, the same values): a layer's last add stays pending into the next layer's norm.
* Init: normal(0, ``init_std``), output projections of each layer scaled by ``1/sqrt(2 * layers)``,
  declared per parameter (``ParamSpec.init``) and drawn by ``mcore.construct`` keyed by (seed,
  name, element index): the same weights for every layout, world size and device type; the
  model can be built on the meta device and initialised after the layouts shard it.
* muP (``mup_base_width``): hidden matrices' init std divided by ``sqrt(width / base)``, logits
  multiplied by ``base / width``, attention scale ``1/head_dim``. Learning-rate scaling is the
  optimizer's job.
* Presets and Hugging Face families are registered kinds (``presets.py``, ``hf.py``); this module
  imports neither.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard, TypeVar

import torch
from torch import nn

from mcore.config.coerce import build_dataclass, in_section
from mcore.construct import init_params
from mcore.params import Init, ParamSpec
from mcore.protocols.attention import AttentionBackend
from mcore.protocols.block import (
    LOGIT_ROWS,
    AuxLosses,
    BlockContext,
    BlockShared,
    DeclaresCache,
    FlopsShape,
    LayerCacheSpec,
)
from mcore.protocols.model import LossHead
from mcore_models.attention_backends.auto import AutoBackend
from mcore_models.attention_backends.paged import step_bounds, step_positions
from mcore_models.blocks.attention import Attention
from mcore_models.blocks.base import check_non_negative, check_positive, normal_
from mcore_models.blocks.masking import positions_from_cu_seqlens
from mcore_models.blocks.mla import MLA
from mcore_models.blocks.mlp import ClampedSwiGLU, GeluMLP, SwiGLU
from mcore_models.blocks.mtp import MTP, NEXT_EMBEDDINGS
from mcore_models.blocks.norms import LayerNorm, RMSNorm
from mcore_models.blocks.rope import share_rotaries
from mcore_models.kernels.add_rmsnorm import add_rms_norm
from mcore_models.loss_head import GPTLossHead, LossHeadParts, SwappableLossHead, add_aux_losses

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

#: The MLP name of a layer without one (a hybrid's mixer-only layers).
NO_MLP = "none"

#: Most layers a model may have (the deepest published ones have a few hundred): a typo such as 10**12 layers is
#: refused before a list that long is built.
MAX_LAYERS = 1 << 16
_M = TypeVar("_M", bound=nn.Module)
_LAYER_ITEM = re.compile(r"^\s*(?:(\d+)\s*\*\s*)?([A-Za-z0-9_.-]+)\s*(?:/\s*([A-Za-z0-9_.-]+)\s*)?$")


@dataclass(kw_only=True, slots=True)
class GPTConfig:
    """The ``[model]`` section of a run using ``name = "gpt"``; tables ``[model.<block>]`` set each block."""

    preset: str | None = None
    """A registered preset to start from (mcore list shows them; keys and tables given beside it win)."""
    vocab_size: int = 32768
    """Rows of the embedding and the output head (at least the tokenizer's vocabulary)."""
    hidden_size: int = 1024
    """Width of the residual stream (every block gets it)."""
    num_layers: int = 8
    """Transformer layers."""
    mixer: str = "attention"
    """Token mixer of every layer the pattern does not set: 'attention' (GQA with RoPE), 'mla', or a plugin's."""
    mlp: str = "swiglu"
    """MLP of every layer the pattern does not set: 'swiglu', 'gelu-mlp', 'clamped-swiglu', a plugin's, or 'none'."""
    norm: str = "rmsnorm"
    """Norm block by name: 'rmsnorm', 'layernorm', or a plugin's (settings in [model.<norm>])."""
    layers: list[str] | None = None
    """Layer pattern: items '[N*]mixer[/mlp]' in order, e.g. ['3*mla/swiglu', '29*mla/moe'] (none: num_layers x mixer/mlp)."""
    tie_embeddings: bool = False
    """Use the embedding matrix as the output head."""
    max_position_embeddings: int = 4096
    """Longest sequence the model supports; train.seq_len may not exceed it."""
    mtp_num_layers: int = 0
    """Multi-token prediction depths, DeepSeek-V3 style (0: none; settings in [model.mtp])."""
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
    """Hugging Face family written by export: 'llama', 'qwen2', 'mistral', 'deepseek_v3', 'qwen3_moe', 'mixtral', or a
    plugin's."""
    blocks: dict[str, Any] = field(default_factory=dict)
    """Each block's Config by block name (written as tables [model.<block>]; a dict is validated at build)."""

    def __post_init__(self) -> None:
        check_config(self)

    def layer_kinds(self) -> list[tuple[str, str]]:
        """``(mixer, mlp)`` of each layer, in order (``mlp`` may be ``NO_MLP``)."""
        return parse_layers(self.layers, self.num_layers, self.mixer, self.mlp)

    def block_names(self) -> list[str]:
        """Every block this config builds, in first-use order (the tables it may have)."""
        names: list[str] = []
        for mixer, mlp in self.layer_kinds():
            names += [mixer] + ([mlp] if mlp != NO_MLP else [])
        names.append(self.norm)
        if self.mtp_num_layers:
            names.append("mtp")
        return list(dict.fromkeys(names))

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> GPTConfig:
        """A config from ``[model]``-style values: tables (dicts) that are not fields are block sections."""
        names = {f.name for f in dataclasses.fields(cls)}
        blocks = {k: dict(v) for k, v in values.items() if isinstance(v, Mapping) and k not in names}
        plain = {k: v for k, v in values.items() if k not in blocks}
        given = dict(plain.pop("blocks", None) or {})
        return cls(**plain, blocks={**given, **blocks})


def parse_layers(pattern: list[str] | None, num_layers: int, mixer: str, mlp: str) -> list[tuple[str, str]]:
    """The layer pattern as one ``(mixer, mlp)`` per layer; ``ValueError`` naming ``model.layers`` when it is wrong."""
    if num_layers > MAX_LAYERS:
        raise ValueError(f"num_layers = {num_layers}: at most {MAX_LAYERS}")
    if pattern is None:
        return [(mixer, mlp)] * num_layers
    if isinstance(pattern, str) or not all(isinstance(item, str) for item in pattern):
        raise ValueError(f"layers = {pattern!r}: expected a list of '[N*]mixer[/mlp]' strings")
    kinds: list[tuple[str, str]] = []
    for item in pattern:
        match = _LAYER_ITEM.match(item)
        if match is None or (match.group(1) is not None and int(match.group(1)) < 1):
            raise ValueError(
                f"layers item {item!r}: expected '[N*]mixer[/mlp]' with N >= 1, e.g. '3*attention/swiglu' or 'mla/moe'"
            )
        count = int(match.group(1) or 1)
        if len(kinds) + count > MAX_LAYERS:
            raise ValueError(f"layers item {item!r}: the pattern gives more than {MAX_LAYERS} layers")
        kinds += [(match.group(2), match.group(3) or mlp)] * count
    if len(kinds) != num_layers:
        raise ValueError(
            f"layers = {pattern!r} gives {len(kinds)} layers but num_layers = {num_layers}; make them agree"
        )
    return kinds


def check_config(cfg: GPTConfig) -> None:
    """``ValueError`` naming the key, the value and what is allowed, for settings no model can be built from."""
    for key in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "max_position_embeddings",
        "mup_base_width",
        "loss_chunk_size",
        "loss_vocab_chunk_size",
        "init_std",
    ):
        check_positive("model", key, getattr(cfg, key))
    check_non_negative("model", "mtp_num_layers", cfg.mtp_num_layers)
    check_non_negative("model", "mtp_loss_weight", cfg.mtp_loss_weight)
    for key in ("mixer", "norm"):
        if getattr(cfg, key) == NO_MLP:
            raise ValueError(f"{key} = {NO_MLP!r}: only an MLP may be none")
    kinds = cfg.layer_kinds()
    if any(mixer == NO_MLP for mixer, _ in kinds):
        raise ValueError(f"layers = {cfg.layers!r}: every layer needs a mixer ('none' is for the MLP only)")
    if not isinstance(cfg.blocks, Mapping) or not all(isinstance(k, str) for k in cfg.blocks):
        raise ValueError(f"blocks = {cfg.blocks!r}: expected block name -> that block's Config")
    if not isinstance(cfg.hf_model_type, str) or not cfg.hf_model_type.strip():
        raise ValueError(
            f"hf_model_type = {cfg.hf_model_type!r}: expected a Hugging Face family name such as 'llama' or 'qwen2'"
        )


def shared_values(cfg: GPTConfig) -> BlockShared:
    """What the model passes every block: widths, layer count, init stds (muP-scaled), muP multiplier."""
    width_mult = cfg.hidden_size / cfg.mup_base_width if cfg.mup_base_width else None
    init_std = cfg.init_std / math.sqrt(width_mult or 1.0)
    return BlockShared(
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        init_std=init_std,
        output_init_std=init_std / math.sqrt(2 * cfg.num_layers),
        mup_width_mult=width_mult,
    )


def block_config(cls: Any, name: str, given: Any) -> Any:
    """Block ``name``'s ``Config``: ``given`` (an instance or a dict of its fields) or the defaults."""
    config_cls = getattr(cls, "Config", None)
    if config_cls is None:
        if given:
            raise ValueError(f"model.{name}: block {name!r} takes no settings, got {given!r}")
        return None
    if given is None:
        return config_cls()
    if isinstance(given, Mapping):
        return build_dataclass(config_cls, dict(given), f"model.{name}", f"block {name!r}")
    if not isinstance(given, config_cls):
        raise ValueError(f"model.{name}: expected {config_cls.__qualname__}, got {type(given).__qualname__}")
    return given


def block_settings(cfg: GPTConfig, name: str) -> Any:
    """Block ``name``'s ``Config`` in ``cfg`` (its table validated, defaults when absent); this package's blocks."""
    return block_config(_local_block(name), name, cfg.blocks.get(name))


def make_block(cls: Any, config: Any, shared: BlockShared, **extra: Any) -> nn.Module:
    """``cls(config, hidden_size=..., shared=...)`` (``shared`` only for blocks whose constructor takes it)."""
    kwargs: dict[str, Any] = {"hidden_size": shared.hidden_size, **extra}
    if "shared" in inspect.signature(cls).parameters:
        kwargs["shared"] = shared
    return cls(config, **kwargs) if config is not None else cls(**kwargs)


class TransformerLayer(nn.Module):
    """``h + mixer(norm(h))``, then ``h + mlp(norm(h))`` (no second half for a layer without an MLP)."""

    attn_norm: Any
    attention: Any
    mlp_norm: Any
    mlp: Any

    def __init__(
        self, attention: nn.Module, mlp: nn.Module | None, attn_norm: nn.Module, mlp_norm: nn.Module | None
    ) -> None:
        super().__init__()
        self.attn_norm, self.attention, self.mlp_norm, self.mlp = attn_norm, attention, mlp_norm, mlp

    def forward(self, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        hidden = hidden + self.attention(self.attn_norm(hidden, ctx), ctx)  # (B, T, H)
        if self.mlp is None:
            return hidden
        return hidden + self.mlp(self.mlp_norm(hidden, ctx), ctx)

    def forward_residual(
        self, hidden: torch.Tensor, delta: torch.Tensor | None, ctx: BlockContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference (gradients off): this layer on the residual stream ``hidden + delta`` whose add is still
        pending (``delta`` None: nothing pending), each add done with the norm after it (``add_norm``). Returns the
        stream and the last sublayer's output, whose add is left to the next norm: ``forward``'s result is their sum."""
        hidden, normed = add_norm(hidden, delta, self.attn_norm, ctx)  # (B, T, H) each
        delta = self.attention(normed, ctx)
        if self.mlp is None:
            return hidden, delta
        hidden, normed = add_norm(hidden, delta, self.mlp_norm, ctx)
        return hidden, self.mlp(normed, ctx)

    def flops(self, shape: FlopsShape) -> int:
        return self.attention.flops(shape) + (self.mlp.flops(shape) if self.mlp is not None else 0)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for block in (self.attn_norm, self.attention, self.mlp_norm, self.mlp):
            if block is not None:
                block.reset_parameters(generator)


def runs_plain(module: nn.Module, cls: type[_M]) -> TypeGuard[_M]:
    """Whether ``module`` is exactly a ``cls`` whose call is its class's ``forward``: no hooks (a layout's gathers,
    splits, FSDP's unshard) and no ``forward`` replaced on the instance (``train.compile``, recompute), so code
    that bypasses the call (a fused kernel, ``forward_residual``) computes what the call would."""
    plain = not (module._forward_hooks or module._forward_pre_hooks) and "forward" not in module.__dict__
    return type(module) is cls and plain


def add_norm(
    hidden: torch.Tensor, delta: torch.Tensor | None, norm: Any, ctx: BlockContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden + delta`` (``hidden`` when ``delta`` is None) and ``norm`` of it: one fused kernel when ``norm`` is a
    plain ``RMSNorm`` (``kernels/add_rmsnorm.py``, the same values), else the add and the norm module's call."""
    if delta is not None and runs_plain(norm, RMSNorm):
        return add_rms_norm(hidden, delta, norm.weight, norm.eps, norm.offset)
    hidden = hidden if delta is None else hidden + delta  # (B, T, H)
    return hidden, norm(hidden, ctx)


def batch_context(tokens: torch.Tensor, ctx: BlockContext | None, attention: Any = None) -> BlockContext:
    """The context of one model (or stage) call on ``tokens (B, T)``: ``ctx`` (or an empty one) with the
    per-document positions of ``cu_seqlens`` (under a ``kv_cache``: each new token's position in its whole
    sequence, from the cache's ``seq_lens``), unless it brings them, the input ids as ``token_ids`` (blocks
    that route by token: hash MoE), an ``AuxLosses`` collector of its own and ``attention`` as the backend
    (one for every layer, so a document mask is built once per call)."""
    batch, seq = tokens.shape
    ctx = ctx if ctx is not None else BlockContext()
    if ctx.positions is None and ctx.kv_cache is not None:  # a step of new tokens: positions in whole sequences
        bounds = step_bounds(ctx, batch, seq)
        positions = step_positions(ctx.kv_cache.seq_lens, bounds, batch, seq).to(tokens.device)
        ctx = dataclasses.replace(ctx, positions=positions)
    elif ctx.positions is None and ctx.cu_seqlens is not None:
        ctx = dataclasses.replace(ctx, positions=positions_from_cu_seqlens(ctx.cu_seqlens, batch, seq))
    return dataclasses.replace(
        ctx,
        aux_losses=ctx.aux_losses if ctx.aux_losses is not None else AuxLosses(),
        attention=ctx.attention if ctx.attention is not None else attention,
        token_ids=ctx.token_ids if ctx.token_ids is not None else tokens,
    )


class GPT(SwappableLossHead):
    """Decoder-only transformer; ``forward(tokens (B, T), *, labels=None, ctx=None)``."""

    Config = GPTConfig
    #: Every parameter declares its ``init``: the core may build on the meta device and initialise after sharding.
    supports_meta_init = True
    #: ``[model]`` keys of run config schema 1 and where each lives now (for the error an old config gets).
    moved_keys: Mapping[str, str] = {
        **{k: f"attention.{k}" for k in ("num_kv_heads", "head_dim", "qkv_bias", "out_bias", "qk_norm")},
        **{
            k: f"mla.{k}" for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        },
        **{
            k: f"attention.{k} (or mla.{k})"
            for k in (
                "num_heads",
                "sliding_window",
                "rope_theta",
                "rope_scaling",
                "rope_factor",
                "rope_original_max_positions",
                "rope_low_freq_factor",
                "rope_high_freq_factor",
                "rope_beta_fast",
                "rope_beta_slow",
                "rope_mscale",
                "rope_mscale_all_dim",
                "rope_attention_factor",
                "rotary_fraction",
            )
        },
        "ffn_hidden_size": "swiglu.ffn_hidden_size (or the table of model.mlp's block)",
        "mlp_bias": "swiglu.mlp_bias (or the table of model.mlp's block)",
        "clamp_limit": "clamped-swiglu.clamp_limit",
        "gelu_approximate": "gelu-mlp.gelu_approximate",
        "norm_eps": "rmsnorm.norm_eps (and attention.norm_eps, mla.norm_eps, mtp.norm_eps)",
        "zero_centered_gamma": "rmsnorm.zero_centered_gamma (or layernorm.zero_centered_gamma)",
        "attention": "mixer (the block's name; its settings are in [model.attention] or [model.mla])",
    }
    final_norm: Any
    #: The end of the model (``mcore.protocols.model.LossHead``); a layout swaps it by assignment.
    loss_head: LossHead

    def __init__(self, config: GPTConfig, *, block_lookup: Callable[[str], Any] | None = None) -> None:
        super().__init__()
        check_config(config)
        self.config = cfg = config
        lookup = block_lookup or _local_block
        shared = shared_values(cfg)
        hidden = cfg.hidden_size
        configs: dict[str, Any] = {}

        def block(name: str, layer_index: int | None = None, **extra: Any) -> nn.Module:
            try:
                cls = lookup(name)
            except (KeyError, ValueError) as exc:  # the registry's message lists what is installed
                raise ValueError(f"model.mixer/mlp/norm/layers name block {name!r}: {exc}") from None
            try:
                if name not in configs:
                    configs[name] = block_config(cls, name, cfg.blocks.get(name))
                return make_block(cls, configs[name], dataclasses.replace(shared, layer_index=layer_index), **extra)
            except ValueError as exc:  # name the block's table: model.attention.num_heads = ...
                raise ValueError(in_section(str(exc), f"model.{name}", _field_names(cls))) from None

        def layer(index: int, mixer: str, mlp: str) -> TransformerLayer:
            has_mlp = mlp != NO_MLP
            return TransformerLayer(
                block(mixer, index),
                block(mlp, index) if has_mlp else None,
                block(cfg.norm, index),
                block(cfg.norm, index) if has_mlp else None,
            )

        kinds = cfg.layer_kinds()
        self.embed = nn.Embedding(cfg.vocab_size, hidden)
        self.layers = nn.ModuleList(layer(i, mixer, mlp) for i, (mixer, mlp) in enumerate(kinds))
        self.final_norm = block(cfg.norm)
        self.head = None if cfg.tie_embeddings else nn.Linear(hidden, cfg.vocab_size, bias=False)
        last = kinds[-1]  # an MTP depth runs a layer like the model's last one
        self.mtp = nn.ModuleList(
            block("mtp", len(kinds) + d, layer=layer(len(kinds) + d, *last)) for d in range(cfg.mtp_num_layers)
        )
        self.mtp_norms = nn.ModuleList(block(cfg.norm, len(kinds) + d) for d in range(cfg.mtp_num_layers))
        self.logit_scale = cfg.mup_base_width / hidden if cfg.mup_base_width else 1.0
        self.loss_head = GPTLossHead(  # a seam, not a child: it computes with the modules above
            LossHeadParts(
                final_norm=self.final_norm,
                embed=self.embed,
                head=self.head,
                mtp=self.mtp,
                mtp_norms=self.mtp_norms,
                logit_scale=self.logit_scale,
                chunk_size=cfg.loss_chunk_size,
                vocab_chunk_size=cfg.loss_vocab_chunk_size,
                mtp_loss_weight=cfg.mtp_loss_weight,
                first_mtp_layer=len(kinds),
            )
        )
        #: the attention backend of every layer when the context names none (one document mask per call)
        self.attention_backend: AttentionBackend = AutoBackend()
        share_rotaries(self)  # one RoPE table per call, not per layer (no parameters: state dicts unchanged)
        self.reset_parameters()

    def param_specs(self) -> dict[str, ParamSpec]:
        """The embedding and the untied head, normal(``init_std``); a tied head is the embedding (one
        parameter). Blocks declare their own parameters (``mcore.params``)."""
        init = Init("normal", std=shared_values(self.config).init_std)
        specs = {"embed.weight": ParamSpec("embedding", init=init)}
        if self.head is not None:
            specs["head.weight"] = ParamSpec("head", init=init)
        return specs

    # -- the network ------------------------------------------------------------------------
    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight  # (V, H)

    def forward(
        self, tokens: torch.Tensor, *, labels: torch.Tensor | None = None, ctx: BlockContext | None = None
    ) -> torch.Tensor:
        ctx = batch_context(tokens, ctx, self.attention_backend)  # positions, aux collector, shared attention
        hidden = self.run_layers(self.embed(tokens), ctx)  # (B, T, H)
        if labels is None and LOGIT_ROWS in ctx.extra:  # the engine's rows only: (1, R, H) -> logits (1, R, V)
            hidden, tokens = logit_rows(hidden, tokens, ctx.extra[LOGIT_ROWS])
        out = self.loss_head(hidden, tokens=tokens, labels=labels, ctx=ctx)  # logits (B, T, V), or the loss
        if labels is None:
            return out
        assert ctx.aux_losses is not None
        # once, after every layer: one entry per (layer, name); a split micro-batch's ranks: their mean
        return add_aux_losses(out, ctx.aux_losses, divisor=ctx.loss_group_size())

    def run_layers(self, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """The layer stack on the embeddings ``hidden (B, T, H)``, each layer call with its own view of ``ctx``.
        With gradients off (inference) each residual add is fused with the RMSNorm after it: a plain
        ``TransformerLayer`` (``runs_plain``) runs ``forward_residual`` and leaves its last add pending; any other
        layer gets the stream with the pending add done; the last add is a plain one. The same values either way."""
        if torch.is_grad_enabled():
            for index, layer in enumerate(self.layers):
                hidden = layer(hidden, ctx.for_layer(index))
            return hidden
        delta: torch.Tensor | None = None  # the pending add's other term
        for index, layer in enumerate(self.layers):
            if runs_plain(layer, TransformerLayer):
                hidden, delta = layer.forward_residual(hidden, delta, ctx.for_layer(index))
                continue
            hidden = layer(hidden if delta is None else hidden + delta, ctx.for_layer(index))
            delta = None
        return hidden if delta is None else hidden + delta

    # -- inference --------------------------------------------------------------------------
    def cache_specs(self) -> dict[int, LayerCacheSpec]:
        """``{layer_index: spec}`` of every layer whose blocks use the inference cache (``DeclaresCache``), MTP
        depths included under their indices after the main stack: what an engine sizes its cache from."""
        return cache_specs(self)

    def pack_for_inference(self) -> int:
        """Lay out each block's jointly projected weights (attention's q/k/v, gated MLPs' gate/up; blocks list them
        in ``fused_groups()``) back to back in one buffer, so the one-GEMM projection reads them without a
        concatenated copy under ``torch.no_grad``. A submodule with a ``pack_for_inference()`` of its own (a plugin's
        block, e.g. the MoE experts' gate/up) packs itself and returns its count. An engine calls it once after
        loading. Returns the groups packed."""
        from mcore_models.blocks.base import pack_linears

        packed = 0
        for module in self.modules():
            groups = getattr(module, "fused_groups", None)
            if callable(groups):
                packed += sum(pack_linears(group) for group in groups())
            own = getattr(module, "pack_for_inference", None)
            if module is not self and callable(own):
                packed += int(own())
        return packed

    # -- speculative decoding (mcore-inference drafts with the MTP depths) ---------------------
    def mtp_layer_indices(self) -> list[int]:
        """The layer index of each MTP depth ``1, 2, ...`` (its ``BlockContext.layer_index`` and cache layer): the
        main stack's indices go on."""
        return [len(self.layers) + d for d in range(len(self.mtp))]

    def forward_with_hidden(
        self, tokens: torch.Tensor, *, ctx: BlockContext | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference: ``forward``'s logits (``(1, R, V)`` of the ``LOGIT_ROWS`` rows when given, else ``(B, T, V)``)
        and the main stack's output ``(B, T, H)`` of every token, before the final norm: what MTP depth 1 reads."""
        ctx = batch_context(tokens, ctx, self.attention_backend)
        hidden = self.run_layers(self.embed(tokens), ctx)  # (B, T, H)
        rows, row_tokens = hidden, tokens
        if LOGIT_ROWS in ctx.extra:
            rows, row_tokens = logit_rows(hidden, tokens, ctx.extra[LOGIT_ROWS])
        return self.loss_head(rows, tokens=row_tokens, labels=None, ctx=ctx), hidden

    def mtp_forward(
        self, depth: int, hidden: torch.Tensor, next_tokens: torch.Tensor, *, ctx: BlockContext | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference: MTP depth ``depth`` (1-based) on ``hidden (B, T, H)`` (``forward_with_hidden``'s for depth 1,
        depth ``depth - 1``'s output after) and ``next_tokens (B, T)`` (token ``i + depth`` at each position ``i``,
        whose positions ``ctx.positions`` carries under a cache). Returns the depth's output ``(B, T, H)`` (the next
        depth's input) and its logits, which predict token ``i + depth + 1`` (``(1, R, V)`` of the ``LOGIT_ROWS``
        rows when given). Under a cache the depth appends to layer ``mtp_layer_indices()[depth - 1]``."""
        ctx = batch_context(next_tokens, ctx, self.attention_backend)
        view = ctx.for_layer(len(self.layers) + depth - 1, extra={NEXT_EMBEDDINGS: self.embed(next_tokens)})
        out = self.mtp[depth - 1](hidden, view)  # (B, T, H)
        rows = out
        if LOGIT_ROWS in ctx.extra:
            rows, _ = logit_rows(out, next_tokens, ctx.extra[LOGIT_ROWS])
        head: Any = self.loss_head  # GPTLossHead or its vocab-parallel form: both have ``logits``
        return out, head.logits(self.mtp_norms[depth - 1](rows, view))

    # -- pipeline stages (mcore.protocols.model.StagedModel) ----------------------------------
    def stage_layers(self) -> int:
        """Layers a pipeline layout distributes over stages (MTP depths stay with the loss head)."""
        return len(self.layers)

    def pipeline_stage(self, layers: range, *, first: bool, last: bool) -> nn.Module:
        """A ``GPTStage`` running ``layers`` (and the embedding when ``first``, the loss head when
        ``last``), sharing this model's parameters under this model's names (``stages.py``)."""
        from mcore_models.stages import GPTStage  # stages.py builds on this module

        return GPTStage(self, layers, first=first, last=last)

    # -- init, counting ---------------------------------------------------------------------
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        init_std = shared_values(self.config).init_std
        normal_(self.embed.weight, init_std, generator)
        for layer in self.layers:
            layer.reset_parameters(generator)  # type: ignore[operator]
        self.final_norm.reset_parameters(generator)
        if self.head is not None:
            normal_(self.head.weight, init_std, generator)
        for module, norm in zip(self.mtp, self.mtp_norms, strict=True):
            module.reset_parameters(generator)  # type: ignore[operator]
            norm.reset_parameters(generator)  # type: ignore[operator]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward_flops(self, batch: int, seq_len: int) -> int:
        """Forward FLOPs of ``batch`` rows of ``seq_len`` tokens (matmuls and attention scores only).

        Each layer's attended pairs follow its own mixer's ``sliding_window`` (a mixer config field, if any).
        """
        tokens = batch * seq_len

        def shape(layer: Any) -> FlopsShape:
            window = getattr(getattr(layer.attention, "config", None), "sliding_window", None)
            w = min(window or seq_len, seq_len)
            attended = batch * (w * (w + 1) // 2 + (seq_len - w) * w)  # sum over positions of min(i + 1, W)
            return FlopsShape(tokens=tokens, attended=attended)

        head = 2 * tokens * self.config.hidden_size * self.config.vocab_size
        total = sum(layer.flops(shape(layer)) for layer in self.layers) + head  # type: ignore[operator]
        return total + sum(module.flops(shape(module.layer)) + head for module in self.mtp)  # type: ignore[operator]

    # -- the ModelFactory side ---------------------------------------------------------------
    @classmethod
    def build(
        cls,
        config: GPTConfig,
        *,
        seed: int,
        device: torch.device | str = "cpu",
        block_lookup: Callable[[str], Any] | None = None,
    ) -> GPT:
        """Build on ``device`` with weights drawn from ``seed``: each parameter from its declared
        ``init`` keyed by (seed, name, element index), so the values are the same for every layout,
        world size and device type (``mcore.construct``). On ``"meta"`` nothing is allocated: the core
        shards the model first and initialises each rank's part (``supports_meta_init``)."""
        with torch.device("meta"):
            model = cls(config, block_lookup=block_lookup)
        if torch.device(device).type != "meta":
            init_params(model, seed=seed, device=device)
        return model

    @classmethod
    def check_blocks(cls, config: GPTConfig, *, block_lookup: Callable[[str], Any] | None = None) -> None:
        """Rules that need the blocks (a head count against ``hidden_size``): builds the model on the meta device.

        A size no tensor can have (``hidden_size = 10**10``: a weight of 10**20 elements) is a ``ValueError``."""
        try:
            with torch.device("meta"):
                cls(config, block_lookup=block_lookup)
        except RuntimeError as exc:
            if "overflow" not in str(exc):
                raise
            raise ValueError(
                f"model sizes too large for a tensor (hidden_size = {config.hidden_size}, vocab_size = "
                f"{config.vocab_size}; {' '.join(str(exc).split())})"
            ) from None

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
    def flops_per_token(
        cls, config: GPTConfig, seq_len: int, *, block_lookup: Callable[[str], Any] | None = None
    ) -> int:
        """Training FLOPs per token: ``3 * forward`` (backward = 2x forward).

        Forward per token = ``2 * (matmul weights of attention, MLP, output head and MTP)``
        ``+ 4 * layers * heads * qk_head_dim * attended / seq_len`` (QK^T and PV; for MLA the
        head dims are ``(dn + dr)`` for scores and ``dv`` for values); ``attended`` is
        ``seq_len * (seq_len + 1) / 2`` for causal rows (capped by the sliding window). Embedding
        lookups and norms are not counted.
        """
        with torch.device("meta"):
            model = cls(config, block_lookup=block_lookup)
        return 3 * model.forward_flops(1, seq_len) // seq_len

    @classmethod
    def hf_family(cls, config: GPTConfig) -> str:
        """The registered Hugging Face family (kind ``"hf"``) this config exports as."""
        return config.hf_model_type


def logit_rows(hidden: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden (B, T, H)`` and ``tokens (B, T)`` narrowed to the flattened rows ``rows (R,)``: ``(1, R, H)``,
    ``(1, R)`` (``mcore.protocols.block.LOGIT_ROWS``: the head then runs on ``R`` rows, not ``B * T``)."""
    rows = rows.to(device=hidden.device, dtype=torch.long)
    return hidden.flatten(0, 1)[rows][None], tokens.flatten()[rows][None]


def cache_specs(model: nn.Module) -> dict[int, LayerCacheSpec]:
    """``{layer_index: spec}`` over ``model.layers`` and then ``model.mtp`` (depth ``d`` is layer
    ``len(model.layers) + d - 1``): the spec of each layer's block that declares one (``DeclaresCache``)."""
    layers: list[Any] = list(getattr(model, "layers", []))
    layers += [getattr(module, "layer", None) for module in getattr(model, "mtp", [])]
    specs: dict[int, LayerCacheSpec] = {}
    for index, layer in enumerate(layers):
        blocks = [b for b in (getattr(layer, "attention", None), getattr(layer, "mlp", None)) if b is not None]
        declared = [b.cache_spec() for b in blocks if isinstance(b, DeclaresCache)]
        if len(declared) > 1:
            raise ValueError(f"layer {index}: {len(declared)} blocks declare a cache spec; a layer may have one")
        if declared:
            specs[index] = declared[0]
    return specs


def _local_block(name: str) -> Any:
    try:
        return LOCAL_BLOCKS[name]
    except KeyError:
        raise ValueError(
            f"block {name!r} is not one of mcore-models' ({', '.join(LOCAL_BLOCKS)}); a plugin's block is found "
            "when the model is built through mcore (block_lookup)"
        ) from None


def _field_names(cls: Any) -> list[str]:
    config_cls = getattr(cls, "Config", None)
    return [f.name for f in dataclasses.fields(config_cls)] if config_cls is not None else []
