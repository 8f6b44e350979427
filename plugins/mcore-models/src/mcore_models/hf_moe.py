"""Hugging Face interop for Llama-like MoE ``gpt`` models: Qwen3-MoE (``qwen3_moe``) and Mixtral (``mixtral``).

The skeleton is Llama's (``hf``): embeddings, ``attention`` (GQA, RoPE) and RMSNorms renamed, never changed.
The differences mapped here:

* ``qwen3_moe``: QK-norm (``self_attn.q_norm``/``k_norm``, ``attention.qk_norm`` with ``rms_norm_eps``),
  ``head_dim`` of its own, ``attention_bias``; a layer is MoE unless it is in ``mlp_only_layers`` or
  ``(i + 1) % decoder_sparse_step != 0`` (dense layers: ``swiglu`` of ``intermediate_size``). Export
  writes ``decoder_sparse_step = 1`` and the dense layers as ``mlp_only_layers``. Per-layer sliding
  windows (``use_sliding_window``) are refused.
* ``mixtral``: every layer MoE, in ``block_sparse_moe``; one ``sliding_window`` for every layer.

The MoE layers (router, experts) are the ``moe`` block's own mapping (``hf_blocks``; the MoE plugin).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from mcore_models.blocks.attention import Attention
from mcore_models.blocks.mlp import SwiGLU
from mcore_models.blocks.norms import RMSNorm
from mcore_models.gpt import GPT, GPTConfig, block_settings
from mcore_models.hf import (
    Family,
    attention_from_hf,
    check_all_taken,
    check_layout,
    decoder_fields,
    take_tensor,
)
from mcore_models.hf_blocks import HFBlocks, block_from_hf, block_to_hf, layer_pattern

ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
#: The module of a MoE layer under ``model.layers.i.``.
MOE_MODULE = {"qwen3_moe": "mlp.", "mixtral": "block_sparse_moe."}
_MOE = "moe"


# -- config ------------------------------------------------------------------------------------
def _unsupported(cfg: GPTConfig, family: str) -> list[str]:
    mlps = ("swiglu", _MOE) if family == "qwen3_moe" else (_MOE,)
    problems = check_layout(cfg, family, "attention", mlps)
    if problems:
        return problems
    att = block_settings(cfg, "attention")
    if family == "qwen3_moe":
        if not att.qk_norm:
            problems.append("attention.qk_norm = false (qwen3_moe needs true)")
        eps = block_settings(cfg, "rmsnorm").norm_eps
        if att.qk_norm and att.norm_eps != eps:
            problems.append(f"attention.norm_eps = {att.norm_eps} (qwen3_moe needs rmsnorm.norm_eps = {eps})")
        if att.qkv_bias != att.out_bias:
            problems.append("attention.qkv_bias != out_bias (qwen3_moe's attention_bias covers both)")
        if att.sliding_window is not None:
            problems.append(f"attention.sliding_window = {att.sliding_window} (qwen3_moe here has none)")
    else:
        if att.qk_norm:
            problems.append("attention.qk_norm = true (mixtral needs false)")
        if att.qkv_bias or att.out_bias:
            problems.append("attention.qkv_bias/out_bias (mixtral has no attention bias)")
    if att.rotary_fraction != 1.0:
        problems.append(f"attention.rotary_fraction = {att.rotary_fraction} (needs 1.0)")
    if att.no_rope:
        problems.append("attention.no_rope = true (needs false; nemotron_h has NoPE attention)")
    if att.output_gate:
        problems.append("attention.output_gate = true (needs false; qwen3_next has gated attention)")
    if att.qk_norm_zero_centered:
        problems.append("attention.qk_norm_zero_centered = true (needs false)")
    if att.attention_scale is not None:
        problems.append(f"attention.attention_scale = {att.attention_scale} (needs none)")
    if cfg.mtp_num_layers:
        problems.append(f"mtp_num_layers = {cfg.mtp_num_layers} (needs 0)")
    return problems


def config_to_hf(cfg: GPTConfig, dtype: torch.dtype = torch.float32, blocks: HFBlocks | None = None) -> dict[str, Any]:
    family = cfg.hf_model_type
    if family not in ARCHITECTURES:
        raise ValueError(f"hf_model_type = {family!r}: this family maps {', '.join(ARCHITECTURES)}")
    problems = _unsupported(cfg, family)
    if problems:
        raise ValueError(f"model cannot be exported as Hugging Face {family!r}: " + "; ".join(problems))
    att, norm = block_settings(cfg, "attention"), block_settings(cfg, "rmsnorm")
    kinds = [mlp for _, mlp in cfg.layer_kinds()]
    out = decoder_fields(cfg, ARCHITECTURES[family], att, norm, dtype)
    out |= {"head_dim": att.head_dim or cfg.hidden_size // att.num_heads, "output_router_logits": False}
    if family == "qwen3_moe":
        out.update(
            intermediate_size=block_settings(cfg, "swiglu").ffn_hidden_size,
            attention_bias=att.qkv_bias,
            use_sliding_window=False,
            sliding_window=None,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i, kind in enumerate(kinds) if kind != _MOE],
        )
    else:
        out["sliding_window"] = att.sliding_window
    if _MOE in kinds:
        blocks = blocks or HFBlocks(None, family)
        out.update(blocks.mapping(_MOE).config_to_hf(blocks.config(_MOE, cfg), family))
    elif family == "qwen3_moe":
        out["num_experts"] = 0  # every layer dense
    return out


def _moe_layers(hf: dict[str, Any], family: str) -> list[bool]:
    layers = hf["num_hidden_layers"]
    if family == "mixtral":
        return [True] * layers
    experts = hf["num_experts"] if "num_experts" in hf else hf.get("num_local_experts", 0)
    only, step = hf.get("mlp_only_layers") or [], hf.get("decoder_sparse_step", 1) or 1
    return [i not in only and experts > 0 and (i + 1) % step == 0 for i in range(layers)]


def config_from_hf(hf: dict[str, Any], blocks: HFBlocks | None = None) -> GPTConfig:
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise ValueError(f"config.json model_type = {family!r}: this family reads {', '.join(ARCHITECTURES)}")
    eps = hf.get("rms_norm_eps", 1e-6)
    attention = attention_from_hf(hf)
    if family == "qwen3_moe":
        if hf.get("use_sliding_window"):
            raise ValueError("config.json use_sliding_window = true: Qwen3-MoE sliding windows are not supported")
        bias = bool(hf.get("attention_bias"))
        attention.update(qk_norm=True, norm_eps=eps, qkv_bias=bias, out_bias=bias)
    else:
        attention["sliding_window"] = hf.get("sliding_window")
    moe = _moe_layers(hf, family)
    tables: dict[str, Any] = {"attention": Attention.Config(**attention), "rmsnorm": RMSNorm.Config(norm_eps=eps)}
    if not all(moe):
        tables["swiglu"] = SwiGLU.Config(ffn_hidden_size=hf["intermediate_size"])
    if any(moe):  # the moe block maps its own keys (before any weight is read)
        tables[_MOE] = (blocks or HFBlocks(None, family)).mapping(_MOE).config_from_hf(hf, family)
    return GPTConfig(
        hf_model_type=family,
        layers=layer_pattern([("attention", _MOE if m else "swiglu") for m in moe]),
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        init_std=hf.get("initializer_range", 0.02),
        blocks=tables,
    )


# -- weights -----------------------------------------------------------------------------------
_SKELETON = {  # ours (under layers.i.) -> Hugging Face (under model.layers.i.)
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "attention.q.weight": "self_attn.q_proj.weight",
    "attention.k.weight": "self_attn.k_proj.weight",
    "attention.v.weight": "self_attn.v_proj.weight",
    "attention.out.weight": "self_attn.o_proj.weight",
}
_DENSE = {"mlp.gate.weight": "mlp.gate_proj.weight", "mlp.up.weight": "mlp.up_proj.weight"}
_DENSE["mlp.down.weight"] = "mlp.down_proj.weight"


def _layer_names(cfg: GPTConfig, dense: bool) -> list[tuple[str, str]]:
    """``(ours, theirs)`` of a layer's tensors outside the MoE block, relative to the layer."""
    names = list(_SKELETON.items()) + (list(_DENSE.items()) if dense else [])
    att = block_settings(cfg, "attention")
    if att.qkv_bias:
        names += [(f"attention.{n}.bias", f"self_attn.{n}_proj.bias") for n in "qkv"]
    if att.out_bias:
        names.append(("attention.out.bias", "self_attn.o_proj.bias"))
    if att.qk_norm:
        names += [("attention.q_norm.weight", "self_attn.q_norm.weight")]
        names += [("attention.k_norm.weight", "self_attn.k_norm.weight")]
    return names


def _moe_parts(cfg: GPTConfig, blocks: HFBlocks | None) -> tuple[list[bool], Any, Any]:
    """Which layers are MoE, and (when any is) the moe block's mapping and config."""
    moe = [mlp == _MOE for _, mlp in cfg.layer_kinds()]
    if not any(moe):
        return moe, None, None
    blocks = blocks or HFBlocks(None, cfg.hf_model_type)
    return moe, blocks.mapping(_MOE), blocks.config(_MOE, cfg)


def state_to_hf(model: GPT, cfg: GPTConfig, blocks: HFBlocks | None = None) -> dict[str, torch.Tensor]:
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    family = cfg.hf_model_type
    out = {"model.embed_tokens.weight": ours["embed.weight"], "model.norm.weight": ours["final_norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ours["head.weight"]
    moe, mapping, moe_cfg = _moe_parts(cfg, blocks)
    for i, is_moe in enumerate(moe):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out.update({dst + theirs: ours[src + mine] for mine, theirs in _layer_names(cfg, not is_moe)})
        if is_moe:
            out.update(block_to_hf(ours, src + "mlp.", dst + MOE_MODULE[family], mapping, moe_cfg, family))
    return {k: v.contiguous().cpu() for k, v in out.items()}


def state_from_hf(
    hf: dict[str, torch.Tensor], cfg: GPTConfig, hf_config: dict[str, Any], blocks: HFBlocks | None = None
) -> dict[str, torch.Tensor]:
    family = cfg.hf_model_type
    out = {"embed.weight": take_tensor(hf, "model.embed_tokens.weight")}
    out["final_norm.weight"] = take_tensor(hf, "model.norm.weight")
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)
    else:
        out["head.weight"] = take_tensor(hf, "lm_head.weight")
    moe, mapping, moe_cfg = _moe_parts(cfg, blocks)
    for i, is_moe in enumerate(moe):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out.update({dst + mine: take_tensor(hf, src + theirs) for mine, theirs in _layer_names(cfg, not is_moe)})
        if is_moe:
            out.update(block_from_hf(hf, src + MOE_MODULE[family], dst + "mlp.", mapping, moe_cfg, family))
    check_all_taken(hf)
    return out


#: The registered families (kind ``"hf"``).
QWEN3_MOE = Family("qwen3_moe", sys.modules[__name__])
MIXTRAL = Family("mixtral", sys.modules[__name__])
