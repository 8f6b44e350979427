"""Hugging Face interop for DeepSeek-V3-style ``gpt`` models: MLA attention, dense MLPs, MTP layers.

Shape legend: nh heads, dn/dr/dv the no-RoPE, RoPE and value head dims, c ``kv_lora_rank``.

Differences from our layout, all exact permutations or copies:
* Real DeepSeek checkpoints (``rope_interleave = true``) store the RoPE dims of ``q_b_proj`` and
  ``kv_a_proj_with_mqa`` as interleaved pairs ``(x0, x1), (x2, x3), ...``; our MLA rotates pair
  ``(j, j + dr/2)``. Rows are permuted on import and back on export.
* MTP depth ``k`` is stored as decoder layer ``num_hidden_layers + k - 1`` with ``enorm``,
  ``hnorm``, ``eh_proj``, ``shared_head.norm`` and copies of the shared embedding and head.
MoE layers (``first_k_dense_replace < num_hidden_layers``) are the MoE plugin's and are refused here,
as are attention biases. ``transformers`` fixes the MLA latent norms' eps at 1e-6, while ours use
``norm_eps``, so ``rms_norm_eps`` must be 1e-6.
"""

from __future__ import annotations

from typing import Any

import torch

from mcore_models.gpt import GPTConfig
from mcore_models.hf import _DTYPES, rope_from_hf, rope_parameters

_LATENT_NORM_EPS = 1e-6


def _check(cfg: GPTConfig) -> None:
    default = GPTConfig()
    checks = {
        "attention": cfg.attention == "mla",
        "mlp": cfg.mlp == "swiglu",
        "norm": cfg.norm == "rmsnorm",
        "mlp_bias": not cfg.mlp_bias,
        "zero_centered_gamma": not cfg.zero_centered_gamma,
        "mup_base_width": cfg.mup_base_width is None,
        "sliding_window": cfg.sliding_window is None,
        "norm_eps": cfg.norm_eps == _LATENT_NORM_EPS,
    }
    wanted = {"attention": "'mla'", "norm_eps": "1e-06"}
    problems = [
        f"{key} = {getattr(cfg, key)!r} (needs {wanted.get(key, repr(getattr(default, key)))})"
        for key, ok in checks.items()
        if not ok
    ]
    if problems:
        raise ValueError("model cannot be exported as Hugging Face 'deepseek_v3': " + "; ".join(problems))


def config_to_hf(cfg: GPTConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    _check(cfg)
    rope = rope_parameters(cfg)
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "first_k_dense_replace": cfg.num_layers,  # every layer dense
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "head_dim": cfg.qk_rope_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling == "none" else {k: v for k, v in rope.items() if k != "rope_theta"},
        "rope_parameters": rope,
        "rope_interleave": True,
        "attention_bias": False,
        "num_nextn_predict_layers": cfg.mtp_num_layers,
        "initializer_range": cfg.init_std,
        "torch_dtype": _DTYPES.get(dtype, "float32"),
        "use_cache": True,
    }


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    layers = hf["num_hidden_layers"]
    if hf.get("first_k_dense_replace", layers) < layers:
        raise ValueError(
            f"config.json first_k_dense_replace = {hf['first_k_dense_replace']}: layers from there on are MoE, "
            f"which this importer does not map; only dense models (>= num_hidden_layers = {layers}) are supported"
        )
    if hf.get("attention_bias"):
        raise ValueError("config.json attention_bias = true: not supported for MLA")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act = {hf['hidden_act']!r}: allowed: silu")
    if hf.get("rms_norm_eps", _LATENT_NORM_EPS) != _LATENT_NORM_EPS:
        raise ValueError(
            f"config.json rms_norm_eps = {hf['rms_norm_eps']}: allowed: 1e-06 (see mcore_models.hf_deepseek)"
        )
    return GPTConfig(
        hf_model_type="deepseek_v3",
        attention="mla",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=layers,
        num_heads=hf["num_attention_heads"],
        ffn_hidden_size=hf["intermediate_size"],
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        norm_eps=_LATENT_NORM_EPS,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        init_std=hf.get("initializer_range", 0.02),
        mtp_num_layers=hf.get("num_nextn_predict_layers", 0) or 0,
        **rope_from_hf(hf),
    )


# -- RoPE row order ----------------------------------------------------------------------------
def _to_half_split(weight: torch.Tensor, block: int, rope: int) -> torch.Tensor:
    """Rows ``(groups * block, in)`` whose last ``rope`` rows of each block are interleaved pairs."""
    w = weight.view(-1, block, weight.shape[-1])  # (groups, block, in)
    head, rot = w[:, : block - rope], w[:, block - rope :]
    return torch.cat([head, rot[:, 0::2], rot[:, 1::2]], dim=1).reshape(weight.shape)


def _to_interleaved(weight: torch.Tensor, block: int, rope: int) -> torch.Tensor:
    w = weight.view(-1, block, weight.shape[-1])  # (groups, block, in)
    head, rot = w[:, : block - rope], w[:, block - rope :]
    pairs = torch.stack([rot[:, : rope // 2], rot[:, rope // 2 :]], dim=2).reshape(rot.shape)  # (g, rope, in)
    return torch.cat([head, pairs], dim=1).reshape(weight.shape)


# -- weights -----------------------------------------------------------------------------------
_LAYER = {  # ours (under layers.i. or mtp.j.layer.) -> Hugging Face (under model.layers.k.)
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "attention.q_down.weight": "self_attn.q_a_proj.weight",
    "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attention.kv_down.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attention.kv_up.weight": "self_attn.kv_b_proj.weight",
    "attention.out.weight": "self_attn.o_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_MTP = {"embed_norm.weight": "enorm.weight", "hidden_norm.weight": "hnorm.weight", "proj.weight": "eh_proj.weight"}


def _q_up_name(cfg: GPTConfig) -> str:
    return "self_attn.q_b_proj.weight" if cfg.q_lora_rank else "self_attn.q_proj.weight"


def _layer_to_hf(ours: dict[str, torch.Tensor], src: str, dst: str, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    out = {dst + theirs: ours[src + mine] for mine, theirs in _LAYER.items() if src + mine in ours}
    dr, c = cfg.qk_rope_head_dim, cfg.kv_lora_rank
    out[dst + _q_up_name(cfg)] = _to_interleaved(ours[src + "attention.q_up.weight"], cfg.qk_nope_head_dim + dr, dr)
    out[dst + "self_attn.kv_a_proj_with_mqa.weight"] = _to_interleaved(
        ours[src + "attention.kv_down.weight"], c + dr, dr
    )
    gate, up = ours[src + "mlp.up.weight"].chunk(2, dim=0)
    out.update({dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up})
    return out


def state_to_hf(model: torch.nn.Module, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": ours["embed.weight"], "model.norm.weight": ours["final_norm.weight"]}
    head = ours["embed.weight"] if cfg.tie_embeddings else ours["head.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = head
    for i in range(cfg.num_layers):
        out.update(_layer_to_hf(ours, f"layers.{i}.", f"model.layers.{i}.", cfg))
    for j in range(cfg.mtp_num_layers):
        dst = f"model.layers.{cfg.num_layers + j}."
        out.update(_layer_to_hf(ours, f"mtp.{j}.layer.", dst, cfg))
        out.update({dst + theirs: ours[f"mtp.{j}.{mine}"] for mine, theirs in _MTP.items()})
        out[dst + "shared_head.norm.weight"] = ours[f"mtp_norms.{j}.weight"]
        out[dst + "embed_tokens.weight"] = ours["embed.weight"].clone()  # safetensors stores no shared tensors
        out[dst + "shared_head.head.weight"] = head.clone()
    return {k: v.contiguous().cpu() for k, v in out.items()}


def _layer_from_hf(hf: dict[str, torch.Tensor], src: str, dst: str, cfg: GPTConfig, interleaved: bool):  # type: ignore[no-untyped-def]
    def take(name: str) -> torch.Tensor:
        if src + name not in hf:
            raise ValueError(f"checkpoint is missing tensor {src + name!r} needed for this config")
        return hf.pop(src + name)

    dr, c = cfg.qk_rope_head_dim, cfg.kv_lora_rank
    half = _to_half_split if interleaved else (lambda w, block, rope: w)
    out = {}
    for mine, theirs in _LAYER.items():
        if mine.startswith("attention.q_") and not cfg.q_lora_rank:
            continue
        out[dst + mine] = take(theirs)
    out[dst + "attention.q_up.weight"] = half(take(_q_up_name(cfg)), cfg.qk_nope_head_dim + dr, dr)
    out[dst + "attention.kv_down.weight"] = half(out[dst + "attention.kv_down.weight"], c + dr, dr)
    out[dst + "mlp.up.weight"] = torch.cat([take("mlp.gate_proj.weight"), take("mlp.up_proj.weight")])
    return out


def state_from_hf(hf: dict[str, torch.Tensor], cfg: GPTConfig, hf_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    interleaved = bool(hf_config.get("rope_interleave", True))
    out = {"embed.weight": hf.pop("model.embed_tokens.weight"), "final_norm.weight": hf.pop("model.norm.weight")}
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)
    else:
        out["head.weight"] = hf.pop("lm_head.weight")
    for i in range(cfg.num_layers):
        out.update(_layer_from_hf(hf, f"model.layers.{i}.", f"layers.{i}.", cfg, interleaved))
    for j in range(cfg.mtp_num_layers):
        src = f"model.layers.{cfg.num_layers + j}."
        out.update(_layer_from_hf(hf, src, f"mtp.{j}.layer.", cfg, interleaved))
        out.update({f"mtp.{j}.{mine}": hf.pop(src + theirs) for mine, theirs in _MTP.items()})
        out[f"mtp_norms.{j}.weight"] = hf.pop(src + "shared_head.norm.weight")
        for shared in ("embed_tokens.weight", "shared_head.head.weight"):  # copies of the shared tensors
            hf.pop(src + shared, None)
    leftover = [k for k in hf if "rotary_emb" not in k]
    if leftover:
        raise ValueError(f"checkpoint has tensors this config does not use, e.g. {leftover[:3]}")
    return out
