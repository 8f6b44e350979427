"""Hugging Face interop for hybrid ``gpt`` models of the Qwen3-Next family (``qwen3_next``).

A Qwen3-Next layer's mixer is Gated DeltaNet (``layer_types`` ``linear_attention``: our ``gdn`` block, a plugin's,
mapped by its own ``hf`` attribute under ``linear_attn.``) or gated attention (``full_attention``: our
``attention`` with ``output_gate``, ``qk_norm`` and ``qk_norm_zero_centered``, under ``self_attn.``); its MLP is
the ``moe`` block (a plugin's, mapped by its ``hf`` under ``mlp.``: routed experts plus one shared expert behind a
sigmoid gate) unless the layer is in ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0`` (dense:
``swiglu`` of ``intermediate_size``). What differs from the Llama skeleton (``hf``):

* every RMSNorm (the layers', the final one, QK-norm) is zero-centred (``1 + w``): ``rmsnorm.zero_centered_gamma``
  and ``attention.qk_norm_zero_centered`` are required, and the stored weights are copied as they are;
* partial RoPE: ``rope_parameters.partial_rotary_factor`` (default 0.25) is ``attention.rotary_fraction``;
* ``self_attn.q_proj`` holds, per query head, ``[q (head_dim) | gate (head_dim)]`` rows: import splits them into
  our ``attention.q`` and ``attention.gate``, export interleaves them back (rows moved, values copied).

``layer_types`` is read (or derived from ``full_attention_interval``, default 4) and always written. Tensors
under ``mtp.`` (a multi-token-prediction head ``transformers`` does not load either) are ignored on import.
A block's ``config.json`` keys that the skeleton also writes (``rms_norm_eps`` of the gdn norm) must agree.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from mcore_models.blocks.attention import Attention
from mcore_models.blocks.mlp import SwiGLU
from mcore_models.blocks.norms import RMSNorm
from mcore_models.gpt import GPT, GPTConfig, block_settings
from mcore_models.hf import Family, attention_from_hf, check_all_taken, decoder_fields, take_tensor
from mcore_models.hf_blocks import HFBlocks, block_from_hf, block_to_hf, layer_pattern

MODEL_TYPE = "qwen3_next"
ARCHITECTURE = "Qwen3NextForCausalLM"
_GDN, _ATTENTION, _MOE, _DENSE = "gdn", "attention", "moe", "swiglu"
#: Hugging Face ``layer_types`` <-> our mixer block.
MIXERS = {"linear_attention": _GDN, "full_attention": _ATTENTION}
_LAYER_TYPES = {ours: theirs for theirs, ours in MIXERS.items()}
#: Where each mixer lives under ``model.layers.i.``.
_MIXER_MODULE = {_GDN: "linear_attn.", _ATTENTION: "self_attn."}
_DEFAULT_PARTIAL_ROTARY = 0.25  # Qwen3NextConfig's default when config.json names none


# -- config ------------------------------------------------------------------------------------
def _blocks(blocks: HFBlocks | None) -> HFBlocks:
    return blocks or HFBlocks(None, MODEL_TYPE)


def _unsupported(cfg: GPTConfig) -> list[str]:
    """Config values that Hugging Face ``qwen3_next`` cannot express (the plugin blocks check their own)."""
    problems = []
    kinds = cfg.layer_kinds()
    if any(mixer not in _MIXER_MODULE or mlp not in (_MOE, _DENSE) for mixer, mlp in kinds):
        problems.append(
            f"layers = {cfg.layers!r}, mixer = {cfg.mixer!r}, mlp = {cfg.mlp!r} "
            "(needs every layer gdn or attention, with moe or swiglu)"
        )
    if cfg.norm != "rmsnorm":
        problems.append(f"norm = {cfg.norm!r} (needs 'rmsnorm')")
    if cfg.mup_base_width is not None:
        problems.append(f"mup_base_width = {cfg.mup_base_width} (needs none)")
    if cfg.mtp_num_layers:
        problems.append(f"mtp_num_layers = {cfg.mtp_num_layers} (needs 0)")
    if problems:
        return problems
    norm = block_settings(cfg, "rmsnorm")
    if not norm.zero_centered_gamma:
        problems.append("rmsnorm.zero_centered_gamma = false (qwen3_next's norms are zero-centred: needs true)")
    if any(mlp == _DENSE for _, mlp in kinds) and block_settings(cfg, _DENSE).mlp_bias:
        problems.append("swiglu.mlp_bias = true (needs false)")
    if not any(mixer == _ATTENTION for mixer, _ in kinds):
        return problems
    att = block_settings(cfg, _ATTENTION)
    for key in ("qk_norm", "qk_norm_zero_centered", "output_gate"):
        if not getattr(att, key):
            problems.append(f"attention.{key} = false (qwen3_next needs true)")
    if att.qk_norm and att.norm_eps != norm.norm_eps:
        problems.append(f"attention.norm_eps = {att.norm_eps} (qwen3_next needs rmsnorm.norm_eps = {norm.norm_eps})")
    if att.qkv_bias != att.out_bias:
        problems.append("attention.qkv_bias != out_bias (qwen3_next's attention_bias covers both)")
    if att.sliding_window is not None:
        problems.append(f"attention.sliding_window = {att.sliding_window} (qwen3_next has none)")
    if att.attention_scale is not None:
        problems.append(f"attention.attention_scale = {att.attention_scale} (needs none)")
    if getattr(att, "no_rope", False):
        problems.append("attention.no_rope = true (qwen3_next's attention has partial RoPE: needs false)")
    return problems


def _merge(out: dict[str, Any], block: str, keys: dict[str, Any], problems: list[str]) -> None:
    """``out |= keys`` (a block's ``config.json`` keys); a problem for each key both write with different values."""
    for key, value in keys.items():
        if key in out and out[key] != value:
            problems.append(f"{block} writes {key} = {value!r} but the model's is {out[key]!r} (they must agree)")
        else:
            out[key] = value


def config_to_hf(cfg: GPTConfig, dtype: torch.dtype = torch.float32, blocks: HFBlocks | None = None) -> dict[str, Any]:
    if cfg.hf_model_type != MODEL_TYPE:
        raise ValueError(f"hf_model_type = {cfg.hf_model_type!r}: this family maps {MODEL_TYPE}")
    problems = _unsupported(cfg)
    if problems:
        raise ValueError(f"model cannot be exported as Hugging Face {MODEL_TYPE!r}: " + "; ".join(problems))
    kinds = cfg.layer_kinds()
    att, norm = block_settings(cfg, _ATTENTION), block_settings(cfg, "rmsnorm")
    out = decoder_fields(cfg, ARCHITECTURE, att, norm, dtype)
    out["rope_parameters"] = dict(out["rope_parameters"], partial_rotary_factor=att.rotary_fraction)
    if out["rope_scaling"] is not None:
        out["rope_scaling"] = dict(out["rope_scaling"], partial_rotary_factor=att.rotary_fraction)
    out |= {
        "head_dim": att.head_dim or cfg.hidden_size // att.num_heads,
        "attention_bias": att.qkv_bias,
        "layer_types": [_LAYER_TYPES[mixer] for mixer, _ in kinds],
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, (_, mlp) in enumerate(kinds) if mlp != _MOE],
        "intermediate_size": block_settings(cfg, _DENSE).ffn_hidden_size,
        "output_router_logits": False,
    }
    blocks = _blocks(blocks)
    for name in (_GDN, _MOE):
        if any(name in kind for kind in kinds):
            _merge(out, name, blocks.mapping(name).config_to_hf(blocks.config(name, cfg), MODEL_TYPE), problems)
    if not any(mlp == _MOE for _, mlp in kinds):
        out["num_experts"] = 0  # every layer dense
    if problems:
        raise ValueError(f"model cannot be exported as Hugging Face {MODEL_TYPE!r}: " + "; ".join(problems))
    return out


def _layer_types(hf: dict[str, Any]) -> list[str]:
    layers = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        interval = hf.get("full_attention_interval", 4)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"config.json full_attention_interval = {interval!r}: allowed: an int >= 1")
        types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers:
        raise ValueError(f"config.json layer_types = {types!r}: needs one entry per layer ({layers})")
    for kind in types:
        if kind not in MIXERS:
            raise ValueError(f"config.json layer_types entry {kind!r}: allowed: {', '.join(MIXERS)}")
    return list(types)


def _moe_layers(hf: dict[str, Any]) -> list[bool]:
    experts, only = hf.get("num_experts", 512), hf.get("mlp_only_layers") or []
    step = hf.get("decoder_sparse_step", 1) or 1
    return [i not in only and experts > 0 and (i + 1) % step == 0 for i in range(hf["num_hidden_layers"])]


def _partial_rotary(hf: dict[str, Any]) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", _DEFAULT_PARTIAL_ROTARY)))


def config_from_hf(hf: dict[str, Any], blocks: HFBlocks | None = None) -> GPTConfig:
    if hf.get("model_type") != MODEL_TYPE:
        raise ValueError(f"config.json model_type = {hf.get('model_type')!r}: this family reads {MODEL_TYPE}")
    eps = hf.get("rms_norm_eps", 1e-6)
    attention = attention_from_hf(hf)
    heads, head_dim = hf["num_attention_heads"], hf.get("head_dim", 256)
    bias = bool(hf.get("attention_bias", False))
    attention.update(
        head_dim=None if head_dim == hf["hidden_size"] // heads else head_dim,
        qk_norm=True,
        qk_norm_zero_centered=True,
        output_gate=True,
        norm_eps=eps,
        qkv_bias=bias,
        out_bias=bias,
        rotary_fraction=_partial_rotary(hf),
    )
    mixers = [MIXERS[kind] for kind in _layer_types(hf)]
    moe = _moe_layers(hf)
    tables: dict[str, Any] = {"rmsnorm": RMSNorm.Config(norm_eps=eps, zero_centered_gamma=True)}
    if _ATTENTION in mixers:
        tables[_ATTENTION] = Attention.Config(**attention)
    if not all(moe):
        tables[_DENSE] = SwiGLU.Config(ffn_hidden_size=hf["intermediate_size"])
    blocks = _blocks(blocks)
    if _GDN in mixers:  # the plugin blocks map their own keys (before any weight is read)
        tables[_GDN] = blocks.mapping(_GDN).config_from_hf(hf, MODEL_TYPE)
    if any(moe):
        tables[_MOE] = blocks.mapping(_MOE).config_from_hf(hf, MODEL_TYPE)
    return GPTConfig(
        hf_model_type=MODEL_TYPE,
        layers=layer_pattern([(mixer, _MOE if m else _DENSE) for mixer, m in zip(mixers, moe, strict=True)]),
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        init_std=hf.get("initializer_range", 0.02),
        blocks=tables,
    )


# -- weights -----------------------------------------------------------------------------------
_NORMS = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight"}
_DENSE_NAMES = {"mlp.gate.weight": "mlp.gate_proj.weight", "mlp.up.weight": "mlp.up_proj.weight"}
_DENSE_NAMES["mlp.down.weight"] = "mlp.down_proj.weight"


def _attention_names(att: Any) -> list[tuple[str, str]]:
    """``(ours, theirs)`` of an attention layer's tensors other than ``q``/``gate`` (which share ``q_proj``)."""
    names = [(f"attention.{n}.weight", f"self_attn.{n}_proj.weight") for n in "kv"]
    names += [("attention.out.weight", "self_attn.o_proj.weight")]
    names += [(f"attention.{n}_norm.weight", f"self_attn.{n}_norm.weight") for n in "qk"]
    if att.qkv_bias:
        names += [(f"attention.{n}.bias", f"self_attn.{n}_proj.bias") for n in "kv"]
    if att.out_bias:
        names.append(("attention.out.bias", "self_attn.o_proj.bias"))
    return names


def _q_suffixes(att: Any) -> list[str]:
    return ["weight", "bias"] if att.qkv_bias else ["weight"]


def _parts(cfg: GPTConfig, blocks: HFBlocks | None) -> dict[str, tuple[Any, Any]]:
    """The mapping and config of each plugin block the layers use (``gdn``, ``moe``)."""
    blocks = _blocks(blocks)
    used = {name for kind in cfg.layer_kinds() for name in kind}
    return {name: (blocks.mapping(name), blocks.config(name, cfg)) for name in (_GDN, _MOE) if name in used}


def state_to_hf(model: GPT, cfg: GPTConfig, blocks: HFBlocks | None = None) -> dict[str, torch.Tensor]:
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": ours["embed.weight"], "model.norm.weight": ours["final_norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ours["head.weight"]
    parts = _parts(cfg, blocks)
    for i, (mixer, mlp) in enumerate(cfg.layer_kinds()):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out.update({dst + theirs: ours[src + mine] for mine, theirs in _NORMS.items()})
        if mixer == _ATTENTION:
            att = block_settings(cfg, _ATTENTION)
            out.update({dst + theirs: ours[src + mine] for mine, theirs in _attention_names(att)})
            for suffix in _q_suffixes(att):  # per head [q | gate]: (nh, 2 hd, ...) -> (2 nh hd, ...)
                q, gate = ours[f"{src}attention.q.{suffix}"], ours[f"{src}attention.gate.{suffix}"]
                heads = q.shape[0] // att_head_dim(cfg)
                both = torch.cat([q.unflatten(0, (heads, -1)), gate.unflatten(0, (heads, -1))], dim=1)
                out[f"{dst}self_attn.q_proj.{suffix}"] = both.flatten(0, 1)
        else:
            mapping, block_cfg = parts[_GDN]
            out.update(block_to_hf(ours, src + "attention.", dst + "linear_attn.", mapping, block_cfg, MODEL_TYPE))
        if mlp == _MOE:
            mapping, block_cfg = parts[_MOE]
            out.update(block_to_hf(ours, src + "mlp.", dst + "mlp.", mapping, block_cfg, MODEL_TYPE))
        else:
            out.update({dst + theirs: ours[src + mine] for mine, theirs in _DENSE_NAMES.items()})
    return {k: v.contiguous().cpu() for k, v in out.items()}


def att_head_dim(cfg: GPTConfig) -> int:
    """The attention layers' head dim."""
    att = block_settings(cfg, _ATTENTION)
    return int(att.head_dim or cfg.hidden_size // att.num_heads)


def state_from_hf(
    hf: dict[str, torch.Tensor], cfg: GPTConfig, hf_config: dict[str, Any], blocks: HFBlocks | None = None
) -> dict[str, torch.Tensor]:
    for name in [k for k in hf if k.startswith("mtp.")]:  # transformers ignores them too
        hf.pop(name)
    out = {"embed.weight": take_tensor(hf, "model.embed_tokens.weight")}
    out["final_norm.weight"] = take_tensor(hf, "model.norm.weight")
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)
    else:
        out["head.weight"] = take_tensor(hf, "lm_head.weight")
    parts = _parts(cfg, blocks)
    for i, (mixer, mlp) in enumerate(cfg.layer_kinds()):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out.update({dst + mine: take_tensor(hf, src + theirs) for mine, theirs in _NORMS.items()})
        if mixer == _ATTENTION:
            att = block_settings(cfg, _ATTENTION)
            out.update({dst + mine: take_tensor(hf, src + theirs) for mine, theirs in _attention_names(att)})
            for suffix in _q_suffixes(att):  # per head [q | gate] -> q, gate
                both = take_tensor(hf, f"{src}self_attn.q_proj.{suffix}")  # (2 nh hd, ...)
                q, gate = both.unflatten(0, (-1, 2 * att_head_dim(cfg))).chunk(2, dim=1)  # (nh, hd, ...) each
                out[f"{dst}attention.q.{suffix}"] = q.flatten(0, 1).contiguous()
                out[f"{dst}attention.gate.{suffix}"] = gate.flatten(0, 1).contiguous()
        else:
            mapping, block_cfg = parts[_GDN]
            out.update(block_from_hf(hf, src + "linear_attn.", dst + "attention.", mapping, block_cfg, MODEL_TYPE))
        if mlp == _MOE:
            mapping, block_cfg = parts[_MOE]
            out.update(block_from_hf(hf, src + "mlp.", dst + "mlp.", mapping, block_cfg, MODEL_TYPE))
        else:
            out.update({dst + mine: take_tensor(hf, src + theirs) for mine, theirs in _DENSE_NAMES.items()})
    check_all_taken(hf)
    return out


#: The registered family (kind ``"hf"``).
QWEN3_NEXT = Family(MODEL_TYPE, sys.modules[__name__])
