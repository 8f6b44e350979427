"""Hugging Face interop for ``gpt``: safetensors + ``config.json`` for Llama, Qwen2, Mistral (here)
and DeepSeek-V3 with dense MLPs (``hf_deepseek``).

Our fused projections map to Hugging Face's separate ones: ``attention.qkv`` is
``cat([q_proj, k_proj, v_proj])`` along the output dim and ``mlp.up`` is ``cat([gate_proj,
up_proj])``; slicing and concatenation copy bits, so export -> import is exact. RoPE variants
(default, linear, llama3, yarn) are written both as ``rope_parameters`` (transformers >= 5) and
as ``rope_theta`` + ``rope_scaling`` (older releases). Tokenizer files are the runtime's job.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mcore.errors import UserError
from mcore.outputs import normalize_permissions
from mcore_models.gpt import GPT, GPTConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
FAMILIES = (*ARCHITECTURES, "deepseek_v3")
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# -- config ------------------------------------------------------------------------------------
def _unsupported(cfg: GPTConfig) -> list[str]:
    """Config values that no supported Hugging Face family can express."""
    default = GPTConfig()
    checks = {
        "attention": cfg.attention == "attention",
        "mlp": cfg.mlp == "swiglu",
        "norm": cfg.norm == "rmsnorm",
        "qk_norm": not cfg.qk_norm,
        "mlp_bias": not cfg.mlp_bias,
        "zero_centered_gamma": not cfg.zero_centered_gamma,
        "rotary_fraction": cfg.rotary_fraction == 1.0,
        "mtp_num_layers": cfg.mtp_num_layers == 0,
        "mup_base_width": cfg.mup_base_width is None,
    }
    return [f"{key} = {getattr(cfg, key)!r} (needs {getattr(default, key)!r})" for key, ok in checks.items() if not ok]


def rope_parameters(cfg: GPTConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling}
    params["rope_theta"] = cfg.rope_theta
    if cfg.rope_scaling != "none":
        params["factor"] = cfg.rope_factor
    if cfg.rope_scaling in ("llama3", "yarn"):
        params["original_max_position_embeddings"] = cfg.rope_original_max_positions
    if cfg.rope_scaling == "llama3":
        params.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    if cfg.rope_scaling == "yarn":
        params.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow)
        if cfg.rope_mscale and cfg.rope_mscale_all_dim:
            params.update(mscale=cfg.rope_mscale, mscale_all_dim=cfg.rope_mscale_all_dim)
        if cfg.rope_attention_factor is not None:
            params["attention_factor"] = cfg.rope_attention_factor
    return params


def config_to_hf(cfg: GPTConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    family = cfg.hf_model_type
    if family == "deepseek_v3":
        return _codec(family).config_to_hf(cfg, dtype)
    if family not in ARCHITECTURES:
        raise ValueError(f"model.hf_model_type = {family!r}: allowed: {', '.join(FAMILIES)}")
    problems = _unsupported(cfg)
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    if family == "qwen2":
        problems += (
            []
            if cfg.qkv_bias and not cfg.out_bias
            else [f"qkv_bias/out_bias = {cfg.qkv_bias}/{cfg.out_bias} (qwen2 needs True/False)"]
        )
        problems += (
            []
            if head_dim * cfg.num_heads == cfg.hidden_size
            else [f"head_dim = {cfg.head_dim} (qwen2 needs hidden_size / num_heads)"]
        )
    elif family == "llama":
        problems += (
            [] if cfg.qkv_bias == cfg.out_bias else ["qkv_bias != out_bias (llama's attention_bias covers both)"]
        )
        problems += (
            []
            if cfg.sliding_window is None
            else [f"sliding_window = {cfg.sliding_window} (llama has none; use mistral)"]
        )
    elif cfg.qkv_bias or cfg.out_bias:
        problems.append("qkv_bias/out_bias (mistral has no attention bias)")
    if problems:
        raise ValueError(f"model cannot be exported as Hugging Face {family!r}: " + "; ".join(problems))
    rope = rope_parameters(cfg)
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling == "none" else {k: v for k, v in rope.items() if k != "rope_theta"},
        "rope_parameters": rope,
        "initializer_range": cfg.init_std,
        "torch_dtype": _DTYPES.get(dtype, "float32"),
        "use_cache": True,
    }
    if family != "qwen2":
        out["head_dim"] = head_dim
    if family == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    if family == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if family == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    return out


def rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """``GPTConfig`` RoPE fields from ``rope_parameters`` (or the older ``rope_theta`` + ``rope_scaling``)."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scalings = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}
    if rope_type not in scalings:
        raise ValueError(f"config.json rope type = {rope_type!r}: allowed: {', '.join(scalings)}")
    if rope_type == "yarn" and rope.get("truncate", True) is False:
        raise ValueError("config.json rope_parameters.truncate = false: not supported (YaRN bounds are truncated)")
    values: dict[str, Any] = {"rope_theta": float(rope["rope_theta"]), "rope_scaling": scalings[rope_type]}
    if rope_type != "default":
        values["rope_factor"] = float(rope.get("factor", 1.0))
    optional = {
        "original_max_position_embeddings": "rope_original_max_positions",
        "low_freq_factor": "rope_low_freq_factor",
        "high_freq_factor": "rope_high_freq_factor",
        "beta_fast": "rope_beta_fast",
        "beta_slow": "rope_beta_slow",
        "mscale": "rope_mscale",
        "mscale_all_dim": "rope_mscale_all_dim",
        "attention_factor": "rope_attention_factor",
    }
    values.update({ours: rope[theirs] for theirs, ours in optional.items() if rope.get(theirs) is not None})
    return values


def config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    family = hf.get("model_type")
    if family == "deepseek_v3":
        return _codec(family).config_from_hf(hf)
    if family not in ARCHITECTURES:
        raise ValueError(f"config.json model_type = {family!r}: allowed: {', '.join(FAMILIES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act = {hf['hidden_act']!r}: allowed: silu")
    values: dict[str, Any] = dict(
        hf_model_type=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") if family != "qwen2" else None,
        ffn_hidden_size=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        init_std=hf.get("initializer_range", 0.02),
        **rope_from_hf(hf),
    )
    if family == "llama":
        if hf.get("mlp_bias"):
            raise ValueError("config.json mlp_bias = true: not supported")
        values.update(qkv_bias=bool(hf.get("attention_bias")), out_bias=bool(hf.get("attention_bias")))
    if family == "qwen2":
        if hf.get("use_sliding_window"):
            raise ValueError("config.json use_sliding_window = true: Qwen2 per-layer sliding windows are not supported")
        values["qkv_bias"] = True
    if family == "mistral":
        values["sliding_window"] = hf.get("sliding_window")
    if values["head_dim"] == values["hidden_size"] // values["num_heads"]:
        values["head_dim"] = None
    return GPTConfig(**values)


# -- weights -----------------------------------------------------------------------------------
def _split_sizes(cfg: GPTConfig) -> tuple[list[int], list[int]]:
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    kv = (cfg.num_kv_heads or cfg.num_heads) * head_dim
    return [cfg.num_heads * head_dim, kv, kv], [cfg.ffn_hidden_size, cfg.ffn_hidden_size]


def state_to_hf(model: GPT, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    qkv_sizes, mlp_sizes = _split_sizes(cfg)
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": ours["embed.weight"], "model.norm.weight": ours["final_norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ours["head.weight"]
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = ours[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = ours[src + "mlp_norm.weight"]
        for kind in ("weight", "bias"):
            if src + f"attention.qkv.{kind}" in ours:
                q, k, v = ours[src + f"attention.qkv.{kind}"].split(qkv_sizes, dim=0)
                out.update({dst + f"self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v), strict=True)})
            if src + f"attention.out.{kind}" in ours:
                out[dst + f"self_attn.o_proj.{kind}"] = ours[src + f"attention.out.{kind}"]
        gate, up = ours[src + "mlp.up.weight"].split(mlp_sizes, dim=0)
        out.update({dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up})
        out[dst + "mlp.down_proj.weight"] = ours[src + "mlp.down.weight"]
    return {k: v.contiguous().cpu() for k, v in out.items()}


def state_from_hf(hf: dict[str, torch.Tensor], cfg: GPTConfig, hf_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ValueError(f"checkpoint is missing tensor {name!r} needed for this config")
        return hf.pop(name)

    out = {"embed.weight": take("model.embed_tokens.weight"), "final_norm.weight": take("model.norm.weight")}
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)
    else:
        out["head.weight"] = take("lm_head.weight")
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out[dst + "attn_norm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "mlp_norm.weight"] = take(src + "post_attention_layernorm.weight")
        out[dst + "attention.qkv.weight"] = torch.cat([take(src + f"self_attn.{n}_proj.weight") for n in "qkv"])
        if cfg.qkv_bias:
            out[dst + "attention.qkv.bias"] = torch.cat([take(src + f"self_attn.{n}_proj.bias") for n in "qkv"])
        out[dst + "attention.out.weight"] = take(src + "self_attn.o_proj.weight")
        if cfg.out_bias:
            out[dst + "attention.out.bias"] = take(src + "self_attn.o_proj.bias")
        out[dst + "mlp.up.weight"] = torch.cat([take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")])
        out[dst + "mlp.down.weight"] = take(src + "mlp.down_proj.weight")
    leftover = [k for k in hf if "rotary_emb" not in k]
    if leftover:
        raise ValueError(f"checkpoint has tensors this config does not use, e.g. {leftover[:3]}")
    return out


# -- files: everything read stays inside the model directory -------------------------------------
def _allowed_roots(path: Path) -> list[Path]:
    """Where the files of the model directory ``path`` may resolve to: the directory itself, and for a
    Hugging Face cache snapshot (``.../snapshots/<revision>``, whose files link to ``../../blobs``) that
    repository's ``blobs`` folder."""
    root = path.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def model_file(path: Path, name: str, *, named_in: str = "") -> Path:
    """``path / name`` resolved, refused (``UserError``) unless it stays inside the model directory ``path``.

    ``name`` comes from files of the model (``model.safetensors.index.json``), which anyone can
    write: absolute paths, ``..`` and symbolic links that leave the directory are refused.
    """
    where = f" (named in {named_in})" if named_in else ""
    relative = PurePosixPath(name)
    if not name or relative.is_absolute() or PureWindowsPath(name).is_absolute() or ".." in relative.parts:
        raise UserError(
            f"{path}: file {name!r}{where} is outside the model directory; only plain file names inside it are allowed"
        )
    resolved = (path / relative).resolve()
    if not any(resolved.is_relative_to(root) for root in _allowed_roots(path)):
        raise UserError(
            f"{path}: {name!r}{where} resolves to {resolved}, outside the model directory (a symbolic link); "
            "copy the file into the directory instead"
        )
    if not resolved.is_file():
        raise UserError(f"{path}: file {name!r}{where} does not exist")
    return resolved  # opened by its resolved path: a link swapped after this check is not followed


def _read_tensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    index_name = "model.safetensors.index.json"
    indexed = (path / index_name).exists()
    if indexed:
        index = model_file(path, index_name)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{index}: not a safetensors index (needs a 'weight_map' of file names): {exc}") from None
        if not all(isinstance(name, str) for name in files):
            raise UserError(f"{index}: 'weight_map' values must be file names")
    else:
        files = ["model.safetensors"]
    targets = [model_file(path, name, named_in=index_name if indexed else "") for name in files]
    tensors: dict[str, torch.Tensor] = {}
    for target in targets:
        tensors.update(load_file(str(target), device=device))
    return tensors


# -- entry points --------------------------------------------------------------------------------
def _codec(family: str | None) -> Any:
    """The module holding ``config_to_hf``/``config_from_hf``/``state_to_hf``/``state_from_hf`` for a family."""
    if family == "deepseek_v3":
        from mcore_models import hf_deepseek

        return hf_deepseek
    return sys.modules[__name__]


def export_hf(model: GPT, config: GPTConfig, out_dir: Path) -> None:
    """Write ``out_dir/config.json`` and ``out_dir/model.safetensors`` in the model's dtype."""
    codec = _codec(config.hf_model_type)
    tensors = codec.state_to_hf(model, config)
    hf_config = codec.config_to_hf(config, tensors["model.embed_tokens.weight"].dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    normalize_permissions(weights)  # safetensors writes through a private (0600) temporary file
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def import_hf(path: Path, *, device: torch.device | str = "cpu") -> tuple[GPTConfig, GPT]:
    """Read a Hugging Face checkpoint directory into ``(config, model)`` on ``device``."""
    hf_config = json.loads(model_file(path, "config.json").read_text())
    codec = _codec(hf_config.get("model_type"))
    config = codec.config_from_hf(hf_config)
    tensors = _read_tensors(path, str(device))
    with torch.device("meta"):
        model = GPT(config)
    dtype = next(iter(tensors.values())).dtype
    model = model.to(dtype=dtype).to_empty(device=device)
    model.load_state_dict(codec.state_from_hf(tensors, config, hf_config), strict=True)
    return config, model


__all__ = ["config_from_hf", "config_to_hf", "export_hf", "import_hf"]
