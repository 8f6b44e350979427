"""Hugging Face interop for DeepSeek-V3-style ``gpt`` models: MLA attention, dense and MoE MLPs, MTP layers.

Shape legend: nh heads, dn/dr/dv the no-RoPE, RoPE and value head dims, c ``kv_lora_rank``.

The dense MLP's ``gate``, ``up`` and ``down`` are ``gate_proj``, ``up_proj`` and ``down_proj``
renamed. Other differences from our layout, all exact permutations or copies:
* Real DeepSeek checkpoints (``rope_interleave = true``) store the RoPE dims of ``q_b_proj`` and
  ``kv_a_proj_with_mqa`` as interleaved pairs ``(x0, x1), (x2, x3), ...``; our MLA rotates pair
  ``(j, j + dr/2)``. Rows are permuted on import and back on export.
* MTP depth ``k`` is stored as decoder layer ``num_hidden_layers + k - 1`` with ``enorm``,
  ``hnorm``, ``eh_proj``, ``shared_head.norm`` and copies of the shared embedding and head.
* Layers from ``first_k_dense_replace`` on are MoE (``["3*mla/swiglu", "58*mla/moe"]``): their router,
  experts and shared experts (under ``mlp.``) are mapped by the ``moe`` block's own ``hf`` attribute
  (``hf_blocks``), so a MoE checkpoint needs the MoE plugin; an MTP depth's layer is like the last one
  (MoE when it is), as in DeepSeek's checkpoints.
Attention biases are refused. ``transformers`` fixes the MLA latent norms' eps at 1e-6, while ours use
``norm_eps``, so ``rms_norm_eps`` must be 1e-6.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from mcore.errors import UserError
from mcore_models.blocks.mla import MLA
from mcore_models.blocks.mlp import SwiGLU
from mcore_models.blocks.mtp import MTP
from mcore_models.blocks.norms import RMSNorm
from mcore_models.gpt import GPTConfig, block_settings
from mcore_models.hf import _DTYPES, Family, check_all_taken, check_layout, rope_fields, rope_from_hf, take_tensor
from mcore_models.hf_blocks import HFBlocks, block_from_hf, block_to_hf, layer_pattern

_LATENT_NORM_EPS = 1e-6
_MOE = "moe"


def _dense_layers(cfg: GPTConfig) -> int:
    """``first_k_dense_replace``: the leading ``swiglu`` layers."""
    return [mlp for _, mlp in cfg.layer_kinds()].count("swiglu")


def _check(cfg: GPTConfig) -> None:
    problems = check_layout(cfg, "deepseek_v3", "mla", ("swiglu", _MOE), dense_first=True)
    if not problems:
        mla = block_settings(cfg, "mla")
        eps = {"mla.norm_eps": mla.norm_eps, "rmsnorm.norm_eps": block_settings(cfg, "rmsnorm").norm_eps}
        if cfg.mtp_num_layers:
            eps["mtp.norm_eps"] = block_settings(cfg, "mtp").norm_eps
        problems += [f"{key} = {value!r} (needs 1e-06)" for key, value in eps.items() if value != _LATENT_NORM_EPS]
        if mla.sliding_window is not None:
            problems.append(f"mla.sliding_window = {mla.sliding_window} (needs none)")
        if mla.attention_scale is not None:
            problems.append(f"mla.attention_scale = {mla.attention_scale} (needs none)")
    if problems:
        raise ValueError("model cannot be exported as Hugging Face 'deepseek_v3': " + "; ".join(problems))


def config_to_hf(cfg: GPTConfig, dtype: torch.dtype = torch.float32, blocks: HFBlocks | None = None) -> dict[str, Any]:
    _check(cfg)
    mla = block_settings(cfg, "mla")
    moe: dict[str, Any] = {}
    if _dense_layers(cfg) < cfg.num_layers:
        blocks = blocks or HFBlocks(None, "deepseek_v3")
        moe = blocks.mapping(_MOE).config_to_hf(blocks.config(_MOE, cfg), "deepseek_v3")
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": block_settings(cfg, "swiglu").ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": mla.num_heads,
        "num_key_value_heads": mla.num_heads,
        "first_k_dense_replace": _dense_layers(cfg),
        "q_lora_rank": mla.q_lora_rank,
        "kv_lora_rank": mla.kv_lora_rank,
        "qk_nope_head_dim": mla.qk_nope_head_dim,
        "qk_rope_head_dim": mla.qk_rope_head_dim,
        "v_head_dim": mla.v_head_dim,
        "head_dim": mla.qk_rope_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": _LATENT_NORM_EPS,
        "tie_word_embeddings": cfg.tie_embeddings,
        **rope_fields(mla),
        "rope_interleave": True,
        "attention_bias": False,
        "num_nextn_predict_layers": cfg.mtp_num_layers,
        "initializer_range": cfg.init_std,
        "torch_dtype": _DTYPES.get(dtype, "float32"),
        "use_cache": True,
        **moe,
    }


def config_from_hf(hf: dict[str, Any], blocks: HFBlocks | None = None) -> GPTConfig:
    layers = hf["num_hidden_layers"]
    dense = min(max(hf.get("first_k_dense_replace", layers), 0), layers)
    if hf.get("attention_bias"):
        raise ValueError("config.json attention_bias = true: not supported for MLA")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act = {hf['hidden_act']!r}: allowed: silu")
    if hf.get("rms_norm_eps", _LATENT_NORM_EPS) != _LATENT_NORM_EPS:
        raise ValueError(
            f"config.json rms_norm_eps = {hf['rms_norm_eps']}: allowed: 1e-06 (see mcore_models.hf_deepseek)"
        )
    mtp = hf.get("num_nextn_predict_layers", 0) or 0
    tables: dict[str, Any] = {
        "mla": MLA.Config(
            num_heads=hf["num_attention_heads"],
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            norm_eps=_LATENT_NORM_EPS,
            **rope_from_hf(hf),
        ),
        "rmsnorm": RMSNorm.Config(norm_eps=_LATENT_NORM_EPS),
    }
    if dense:
        tables["swiglu"] = SwiGLU.Config(ffn_hidden_size=hf["intermediate_size"])
    pattern = None
    if dense < layers:  # the MoE layers: the moe block maps its own keys (before any weight is read)
        tables[_MOE] = (blocks or HFBlocks(None, "deepseek_v3")).mapping(_MOE).config_from_hf(hf, "deepseek_v3")
        pattern = layer_pattern([("mla", "swiglu")] * dense + [("mla", _MOE)] * (layers - dense))
    if mtp:
        tables["mtp"] = MTP.Config(norm_eps=_LATENT_NORM_EPS)
    return GPTConfig(
        hf_model_type="deepseek_v3",
        mixer="mla",
        layers=pattern,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=layers,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        init_std=hf.get("initializer_range", 0.02),
        mtp_num_layers=mtp,
        blocks=tables,
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
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_MTP = {"embed_norm.weight": "enorm.weight", "hidden_norm.weight": "hnorm.weight", "proj.weight": "eh_proj.weight"}


def _q_up_name(mla: MLA.Config) -> str:
    return "self_attn.q_b_proj.weight" if mla.q_lora_rank else "self_attn.q_proj.weight"


def _layer_to_hf(ours: dict[str, torch.Tensor], src: str, dst: str, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    out = {dst + theirs: ours[src + mine] for mine, theirs in _LAYER.items() if src + mine in ours}
    mla = block_settings(cfg, "mla")
    dr, c = mla.qk_rope_head_dim, mla.kv_lora_rank
    out[dst + _q_up_name(mla)] = _to_interleaved(ours[src + "attention.q_up.weight"], mla.qk_nope_head_dim + dr, dr)
    out[dst + "self_attn.kv_a_proj_with_mqa.weight"] = _to_interleaved(
        ours[src + "attention.kv_down.weight"], c + dr, dr
    )
    return out


def _mlp_kinds(cfg: GPTConfig) -> list[str]:
    """Each decoder layer's MLP, then each MTP depth's (like the last layer's)."""
    kinds = [mlp for _, mlp in cfg.layer_kinds()]
    return kinds + kinds[-1:] * cfg.mtp_num_layers


def state_to_hf(model: torch.nn.Module, cfg: GPTConfig, blocks: HFBlocks | None = None) -> dict[str, torch.Tensor]:
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    kinds = _mlp_kinds(cfg)
    if _MOE in kinds:
        blocks = blocks or HFBlocks(None, "deepseek_v3")
        mapping, moe_cfg = blocks.mapping(_MOE), blocks.config(_MOE, cfg)
    out = {"model.embed_tokens.weight": ours["embed.weight"], "model.norm.weight": ours["final_norm.weight"]}
    head = ours["embed.weight"] if cfg.tie_embeddings else ours["head.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = head
    sources = [f"layers.{i}." for i in range(cfg.num_layers)] + [f"mtp.{j}.layer." for j in range(cfg.mtp_num_layers)]
    for k, (src, kind) in enumerate(zip(sources, kinds, strict=True)):
        out.update(_layer_to_hf(ours, src, f"model.layers.{k}.", cfg))
        if kind == _MOE:
            out.update(block_to_hf(ours, src + "mlp.", f"model.layers.{k}.mlp.", mapping, moe_cfg, "deepseek_v3"))
    for j in range(cfg.mtp_num_layers):
        dst = f"model.layers.{cfg.num_layers + j}."
        out.update({dst + theirs: ours[f"mtp.{j}.{mine}"] for mine, theirs in _MTP.items()})
        out[dst + "shared_head.norm.weight"] = ours[f"mtp_norms.{j}.weight"]
        out[dst + "embed_tokens.weight"] = ours["embed.weight"].clone()  # safetensors stores no shared tensors
        out[dst + "shared_head.head.weight"] = head.clone()
    return {k: v.contiguous().cpu() for k, v in out.items()}


def _layer_from_hf(hf: dict[str, torch.Tensor], src: str, dst: str, cfg: GPTConfig, interleaved: bool, dense: bool):  # type: ignore[no-untyped-def]
    def take(name: str) -> torch.Tensor:
        return take_tensor(hf, src + name)

    mla = block_settings(cfg, "mla")
    dr, c = mla.qk_rope_head_dim, mla.kv_lora_rank
    half = _to_half_split if interleaved else (lambda w, block, rope: w)
    out = {}
    for mine, theirs in _LAYER.items():
        if (mine.startswith("attention.q_") and not mla.q_lora_rank) or (mine.startswith("mlp.") and not dense):
            continue
        out[dst + mine] = take(theirs)
    out[dst + "attention.q_up.weight"] = half(take(_q_up_name(mla)), mla.qk_nope_head_dim + dr, dr)
    out[dst + "attention.kv_down.weight"] = half(out[dst + "attention.kv_down.weight"], c + dr, dr)
    return out


def state_from_hf(
    hf: dict[str, torch.Tensor], cfg: GPTConfig, hf_config: dict[str, Any], blocks: HFBlocks | None = None
) -> dict[str, torch.Tensor]:
    interleaved = bool(hf_config.get("rope_interleave", True))
    out = {
        "embed.weight": take_tensor(hf, "model.embed_tokens.weight"),
        "final_norm.weight": take_tensor(hf, "model.norm.weight"),
    }
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)
    else:
        out["head.weight"] = take_tensor(hf, "lm_head.weight")
    kinds = _mlp_kinds(cfg)
    if _MOE in kinds:
        blocks = blocks or HFBlocks(None, "deepseek_v3")
        mapping, moe_cfg = blocks.mapping(_MOE), blocks.config(_MOE, cfg)
    targets = [f"layers.{i}." for i in range(cfg.num_layers)] + [f"mtp.{j}.layer." for j in range(cfg.mtp_num_layers)]
    for k, (dst, kind) in enumerate(zip(targets, kinds, strict=True)):
        src = f"model.layers.{k}."
        if k >= cfg.num_layers and not any(name.startswith(src) for name in hf):
            raise UserError(
                f"config.json num_nextn_predict_layers = {cfg.mtp_num_layers} but the checkpoint has no layer {k} "
                "(its MTP module; transformers does not save one): set num_nextn_predict_layers = 0 to import "
                "without multi-token prediction"
            )
        out.update(_layer_from_hf(hf, src, dst, cfg, interleaved, dense=kind != _MOE))
        if kind == _MOE:
            out.update(block_from_hf(hf, src + "mlp.", dst + "mlp.", mapping, moe_cfg, "deepseek_v3"))
    for j in range(cfg.mtp_num_layers):
        src = f"model.layers.{cfg.num_layers + j}."
        out.update({f"mtp.{j}.{mine}": take_tensor(hf, src + theirs) for mine, theirs in _MTP.items()})
        out[f"mtp_norms.{j}.weight"] = take_tensor(hf, src + "shared_head.norm.weight")
        for shared in ("embed_tokens.weight", "shared_head.head.weight"):  # copies of the shared tensors
            hf.pop(src + shared, None)
    check_all_taken(hf)
    return out


#: The registered family (kind ``"hf"``, name ``deepseek_v3``).
DEEPSEEK_V3 = Family("deepseek_v3", sys.modules[__name__])
