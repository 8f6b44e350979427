"""Hugging Face interop for hybrid ``gpt`` models of the Nemotron-H family (``nemotron_h``).

A Nemotron-H layer is ``h + mixer(norm(h))`` with ONE block: Mamba2 (``layers_block_type`` ``linear_attention``,
or ``M`` in the older ``hybrid_override_pattern``), attention (``full_attention``, ``*``) or an MLP (``mlp``,
``-``). Ours are mixer-only layers (``mixer/none``): ``mamba2`` (a plugin's block, mapped by its own ``hf``
attribute), ``attention`` with ``no_rope`` (Nemotron-H's attention has no positional encoding; q/k/v/o without
biases) and ``gelu-mlp`` with ``activation = "relu2"`` (``up``/``down``, squared ReLU) in the mixer's place. Each
layer's norm is ``attn_norm`` (``layers.i.norm``), its block ``attention.`` (``layers.i.mixer.``). The embedding
is ``embeddings``, the final norm ``norm_f``; the head ``lm_head`` is never tied (the Hugging Face class ties
nothing). The checkpoint's prefix is ``backbone.`` (NVIDIA's checkpoints, and what ``transformers`` writes);
``model.`` (the module names ``transformers`` loads into) is read too. Every RMSNorm, the Mamba gated norms
included, shares ``layer_norm_epsilon``.

Not mapped (a one-line error names it): MoE layers (``moe``, ``E``: non-gated squared-ReLU experts with a latent
projection), which the ``moe`` block does not express yet. Tensors under ``mtp.`` (multi-token prediction, which
``transformers`` does not load either) are ignored on import.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from mcore_models.blocks.attention import Attention
from mcore_models.blocks.mlp import GeluMLP
from mcore_models.blocks.norms import RMSNorm
from mcore_models.gpt import GPT, NO_MLP, GPTConfig, block_settings
from mcore_models.hf import Family, check_all_taken, take_tensor
from mcore_models.hf_blocks import HFBlocks, block_from_hf, block_to_hf, layer_pattern

MODEL_TYPE = "nemotron_h"
ARCHITECTURE = "NemotronHForCausalLM"
_MAMBA, _ATTENTION, _MLP = "mamba2", "attention", "gelu-mlp"
#: Hugging Face ``layers_block_type`` <-> the block of our mixer-only layer.
BLOCKS = {"linear_attention": _MAMBA, "full_attention": _ATTENTION, "mlp": _MLP}
_LAYER_TYPES = {ours: theirs for theirs, ours in BLOCKS.items()}
#: ``hybrid_override_pattern`` characters (older configs).
_PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
_ATTENTION_NAMES = {n: f"{n}_proj" for n in "qkv"} | {"out": "o_proj"}
_MLP_NAMES = {"up": "up_proj", "down": "down_proj"}
#: The prefix of every tensor but ``lm_head`` in the files (``transformers`` renames it to ``model.`` on load).
PREFIX = "backbone."


def _blocks(blocks: HFBlocks | None) -> HFBlocks:
    return blocks or HFBlocks(None, MODEL_TYPE)


# -- config ------------------------------------------------------------------------------------
def _unsupported(cfg: GPTConfig) -> list[str]:
    """Config values that Hugging Face ``nemotron_h`` cannot express (the ``mamba2`` block checks its own)."""
    problems = []
    kinds = cfg.layer_kinds()
    if any(mixer not in _LAYER_TYPES or mlp != NO_MLP for mixer, mlp in kinds):
        problems.append(
            f"layers = {cfg.layers!r}, mixer = {cfg.mixer!r}, mlp = {cfg.mlp!r} "
            "(needs every layer mamba2/none, attention/none or gelu-mlp/none)"
        )
    if cfg.norm != "rmsnorm":
        problems.append(f"norm = {cfg.norm!r} (needs 'rmsnorm')")
    for key, bad in (("tie_embeddings", cfg.tie_embeddings), ("mup_base_width", cfg.mup_base_width)):
        if bad:
            problems.append(f"{key} = {bad!r} (needs {'false' if key == 'tie_embeddings' else 'none'})")
    if cfg.mtp_num_layers:
        problems.append(f"mtp_num_layers = {cfg.mtp_num_layers} (needs 0)")
    if problems:
        return problems
    if block_settings(cfg, "rmsnorm").zero_centered_gamma:
        problems.append("rmsnorm.zero_centered_gamma = true (needs false)")
    used = {mixer for mixer, _ in kinds}
    if _ATTENTION in used:
        att = block_settings(cfg, _ATTENTION)
        wants: dict[str, Any] = {
            "no_rope": True,
            "qkv_bias": False,
            "out_bias": False,
            "qk_norm": False,
            "output_gate": False,
        }
        wants |= {"sliding_window": None, "attention_scale": None}
        problems += [
            f"attention.{key} = {getattr(att, key)!r} (needs {value!r})"
            for key, value in wants.items()
            if getattr(att, key) != value
        ]
    if _MLP in used and block_settings(cfg, _MLP).activation != "relu2":
        problems.append(f"{_MLP}.activation = {block_settings(cfg, _MLP).activation!r} (needs 'relu2')")
    return problems


def config_to_hf(cfg: GPTConfig, dtype: torch.dtype = torch.float32, blocks: HFBlocks | None = None) -> dict[str, Any]:
    if cfg.hf_model_type != MODEL_TYPE:
        raise ValueError(f"hf_model_type = {cfg.hf_model_type!r}: this family maps {MODEL_TYPE}")
    problems = _unsupported(cfg)
    if problems:
        raise ValueError(f"model cannot be exported as Hugging Face {MODEL_TYPE!r}: " + "; ".join(problems))
    kinds = cfg.layer_kinds()
    att, mlp, norm = (block_settings(cfg, name) for name in (_ATTENTION, _MLP, "rmsnorm"))
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "layers_block_type": [_LAYER_TYPES[mixer] for mixer, _ in kinds],
        "num_attention_heads": att.num_heads,
        "num_key_value_heads": att.num_kv_heads or att.num_heads,
        "head_dim": att.head_dim or cfg.hidden_size // att.num_heads,
        "attention_bias": False,
        "max_position_embeddings": cfg.max_position_embeddings,
        "intermediate_size": mlp.ffn_hidden_size,
        "mlp_hidden_act": "relu2",
        "mlp_bias": mlp.mlp_bias,
        "layer_norm_epsilon": norm.norm_eps,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "torch_dtype": {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32"),
        "use_cache": True,
    }
    if any(mixer == _MAMBA for mixer, _ in kinds):  # the block maps its own keys; shared ones must agree
        blocks = _blocks(blocks)
        keys = blocks.mapping(_MAMBA).config_to_hf(blocks.config(_MAMBA, cfg), MODEL_TYPE)
        clashes = [
            f"mamba2 writes {k} = {v!r} but the model's is {out[k]!r}" for k, v in keys.items() if out.get(k, v) != v
        ]
        if clashes:
            raise ValueError(f"model cannot be exported as Hugging Face {MODEL_TYPE!r}: " + "; ".join(clashes))
        out |= keys
    return out


def layer_types(hf: dict[str, Any]) -> list[str]:
    """``layers_block_type`` (or the older ``hybrid_override_pattern``), checked: every entry one we map."""
    types = hf.get("layers_block_type") or hf.get("layer_types")
    if types is None and isinstance(hf.get("hybrid_override_pattern"), str):
        pattern = hf["hybrid_override_pattern"]
        if any(char not in _PATTERN for char in pattern):
            raise ValueError(f"config.json hybrid_override_pattern = {pattern!r}: allowed characters: M * - E")
        types = [_PATTERN[char] for char in pattern]
    if not isinstance(types, list) or not types:
        raise ValueError(f"config.json layers_block_type = {types!r}: needs a list with one entry per layer")
    for kind in types:
        if kind == "moe":
            raise ValueError(
                "config.json layers_block_type has 'moe' layers: Nemotron-H MoE layers (squared-ReLU experts) are "
                f"not mapped yet; allowed: {', '.join(BLOCKS)}"
            )
        if kind not in BLOCKS:
            raise ValueError(f"config.json layers_block_type entry {kind!r}: allowed: {', '.join(BLOCKS)}")
    return list(types)


def config_from_hf(hf: dict[str, Any], blocks: HFBlocks | None = None) -> GPTConfig:
    if hf.get("model_type") != MODEL_TYPE:
        raise ValueError(f"config.json model_type = {hf.get('model_type')!r}: this family reads {MODEL_TYPE}")
    if hf.get("mlp_hidden_act", "relu2") != "relu2":
        raise ValueError(f"config.json mlp_hidden_act = {hf['mlp_hidden_act']!r}: allowed: relu2")
    mixers = [BLOCKS[kind] for kind in layer_types(hf)]
    eps = hf.get("layer_norm_epsilon", 1e-5)
    tables: dict[str, Any] = {"rmsnorm": RMSNorm.Config(norm_eps=eps)}
    if _ATTENTION in mixers:
        heads, head_dim = hf.get("num_attention_heads", 32), hf.get("head_dim", 128)
        tables[_ATTENTION] = Attention.Config(
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=None if head_dim == hf["hidden_size"] // heads else head_dim,
            no_rope=True,
        )
    if _MLP in mixers:
        tables[_MLP] = GeluMLP.Config(
            ffn_hidden_size=hf.get("intermediate_size", 21504), mlp_bias=bool(hf.get("mlp_bias")), activation="relu2"
        )
    if _MAMBA in mixers:  # the plugin block maps its own keys (before any weight is read)
        tables[_MAMBA] = _blocks(blocks).mapping(_MAMBA).config_from_hf(hf, MODEL_TYPE)
    return GPTConfig(
        hf_model_type=MODEL_TYPE,
        layers=layer_pattern([(mixer, NO_MLP) for mixer in mixers]),
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=len(mixers),
        tie_embeddings=False,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        init_std=hf.get("initializer_range", 0.02),
        blocks=tables,
    )


# -- weights -----------------------------------------------------------------------------------
def _names(mixer: str, cfg: GPTConfig) -> list[tuple[str, str]]:
    """``(ours, theirs)`` under ``attention.`` / ``mixer.`` of an attention or MLP layer's tensors."""
    if mixer == _ATTENTION:
        return [(f"{mine}.weight", f"{theirs}.weight") for mine, theirs in _ATTENTION_NAMES.items()]
    names = [(f"{mine}.weight", f"{theirs}.weight") for mine, theirs in _MLP_NAMES.items()]
    if block_settings(cfg, _MLP).mlp_bias:
        names += [(f"{mine}.bias", f"{theirs}.bias") for mine, theirs in _MLP_NAMES.items()]
    return names


def _mamba(cfg: GPTConfig, blocks: HFBlocks | None) -> tuple[Any, Any] | None:
    """The ``mamba2`` block's mapping and config when a layer uses it."""
    if not any(mixer == _MAMBA for mixer, _ in cfg.layer_kinds()):
        return None
    blocks = _blocks(blocks)
    return blocks.mapping(_MAMBA), blocks.config(_MAMBA, cfg)


def state_to_hf(model: GPT, cfg: GPTConfig, blocks: HFBlocks | None = None) -> dict[str, torch.Tensor]:
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    out = {f"{PREFIX}embeddings.weight": ours["embed.weight"], f"{PREFIX}norm_f.weight": ours["final_norm.weight"]}
    out["lm_head.weight"] = ours["head.weight"]
    mamba = _mamba(cfg, blocks)
    for i, (mixer, _) in enumerate(cfg.layer_kinds()):
        src, dst = f"layers.{i}.", f"{PREFIX}layers.{i}."
        out[dst + "norm.weight"] = ours[src + "attn_norm.weight"]
        if mixer == _MAMBA:
            assert mamba is not None
            out.update(block_to_hf(ours, src + "attention.", dst + "mixer.", *mamba, MODEL_TYPE))
        else:
            out.update({f"{dst}mixer.{theirs}": ours[f"{src}attention.{mine}"] for mine, theirs in _names(mixer, cfg)})
    return {k: v.contiguous().cpu() for k, v in out.items()}


def state_from_hf(
    hf: dict[str, torch.Tensor], cfg: GPTConfig, hf_config: dict[str, Any], blocks: HFBlocks | None = None
) -> dict[str, torch.Tensor]:
    for name in [k for k in hf if k.startswith("mtp.")]:  # transformers ignores them too
        hf.pop(name)
    for name in [k for k in hf if k.startswith("model.")]:  # the names transformers loads into: the files' prefix
        hf[PREFIX + name.removeprefix("model.")] = hf.pop(name)
    out = {"embed.weight": take_tensor(hf, f"{PREFIX}embeddings.weight")}
    out["final_norm.weight"] = take_tensor(hf, f"{PREFIX}norm_f.weight")
    out["head.weight"] = take_tensor(hf, "lm_head.weight")
    mamba = _mamba(cfg, blocks)
    for i, (mixer, _) in enumerate(cfg.layer_kinds()):
        src, dst = f"{PREFIX}layers.{i}.", f"layers.{i}."
        out[dst + "attn_norm.weight"] = take_tensor(hf, src + "norm.weight")
        if mixer == _MAMBA:
            assert mamba is not None
            out.update(block_from_hf(hf, src + "mixer.", dst + "attention.", *mamba, MODEL_TYPE))
        else:
            names = _names(mixer, cfg)
            out.update({f"{dst}attention.{mine}": take_tensor(hf, f"{src}mixer.{theirs}") for mine, theirs in names})
    check_all_taken(hf)
    return out


#: The registered family (kind ``"hf"``).
NEMOTRON_H = Family(MODEL_TYPE, sys.modules[__name__])
