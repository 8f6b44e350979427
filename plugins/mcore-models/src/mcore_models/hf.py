"""Hugging Face interop for ``gpt``: safetensors + ``config.json`` for Llama, Qwen2, Mistral (here),
DeepSeek-V3 (``hf_deepseek``), Qwen3-MoE and Mixtral (``hf_moe``), Qwen3-Next (``hf_qwen3_next``), each registered
as a family (kind ``"hf"``).

Our projections are Hugging Face's, renamed (``attention.q`` <-> ``self_attn.q_proj``, ...,
``mlp.gate`` <-> ``mlp.gate_proj``): weights are copied, never sliced or permuted, so export ->
import is exact. The config maps to the block tables: ``[model.attention]`` (heads, biases,
RoPE), ``[model.swiglu]`` (``intermediate_size``) and ``[model.rmsnorm]`` (``rms_norm_eps``). RoPE
variants (default, linear, llama3, yarn) are written both as ``rope_parameters`` (transformers
>= 5) and as ``rope_theta`` + ``rope_scaling`` (older releases). Tokenizer files are the runtime's
job. Every file read stays inside the model directory (``mcore.hf.model_file``). A layer whose MLP is
another plugin's block (``moe``) is mapped by that block (``hf_blocks``): each codec function takes the
family's ``HFBlocks``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mcore.errors import UserError
from mcore.hf import model_file, read_hf_config
from mcore.outputs import normalize_permissions
from mcore_models.blocks.attention import Attention
from mcore_models.blocks.mlp import SwiGLU
from mcore_models.blocks.norms import RMSNorm
from mcore_models.blocks.rope import RopeFields
from mcore_models.gpt import GPT, GPTConfig, block_settings
from mcore_models.hf_blocks import HFBlocks

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# -- config ------------------------------------------------------------------------------------
def check_layout(
    cfg: GPTConfig, family: str, mixer: str, mlps: tuple[str, ...] = ("swiglu",), *, dense_first: bool = False
) -> list[str]:
    """What a Hugging Face ``family`` cannot express in ``cfg``'s composition: every layer ``mixer/<one of mlps>``
    (with ``dense_first``, the ``swiglu`` layers before the others)."""
    problems = []
    mlp_kinds = [mlp for _, mlp in cfg.layer_kinds()]
    dense = mlp_kinds.count("swiglu")
    if any(m != mixer or mlp not in mlps for m, mlp in cfg.layer_kinds()) or (
        dense_first and mlp_kinds[:dense] != ["swiglu"] * dense
    ):
        needs = " or ".join(f"{mixer}/{mlp}" for mlp in mlps) + (", the swiglu ones first" if dense_first else "")
        problems.append(
            f"layers = {cfg.layers!r}, mixer = {cfg.mixer!r}, mlp = {cfg.mlp!r} (needs every layer {needs})"
        )
    if cfg.norm != "rmsnorm":
        problems.append(f"norm = {cfg.norm!r} (needs 'rmsnorm')")
    if cfg.mup_base_width is not None:
        problems.append(f"mup_base_width = {cfg.mup_base_width} (needs none)")
    if problems:
        return problems
    if block_settings(cfg, "swiglu").mlp_bias:
        problems.append("swiglu.mlp_bias = true (needs false)")
    if block_settings(cfg, "rmsnorm").zero_centered_gamma:
        problems.append("rmsnorm.zero_centered_gamma = true (needs false)")
    return problems


def _unsupported(cfg: GPTConfig, family: str) -> list[str]:
    """Config values that Hugging Face ``family`` (llama, qwen2, mistral) cannot express."""
    problems = check_layout(cfg, family, "attention")
    if problems:
        return problems
    att = block_settings(cfg, "attention")
    if att.qk_norm:
        problems.append("attention.qk_norm = true (needs false)")
    if att.output_gate:
        problems.append("attention.output_gate = true (needs false; qwen3_next has gated attention)")
    if att.rotary_fraction != 1.0:
        problems.append(f"attention.rotary_fraction = {att.rotary_fraction} (needs 1.0)")
    if att.no_rope:
        problems.append("attention.no_rope = true (needs false; nemotron_h has NoPE attention)")
    if att.attention_scale is not None:
        problems.append(f"attention.attention_scale = {att.attention_scale} (needs none)")
    if cfg.mtp_num_layers:
        problems.append(f"mtp_num_layers = {cfg.mtp_num_layers} (needs 0)")
    head_dim = att.head_dim or cfg.hidden_size // att.num_heads
    if family == "qwen2":
        if not (att.qkv_bias and not att.out_bias):
            problems.append(f"attention.qkv_bias/out_bias = {att.qkv_bias}/{att.out_bias} (qwen2 needs true/false)")
        if head_dim * att.num_heads != cfg.hidden_size:
            problems.append(f"attention.head_dim = {att.head_dim} (qwen2 needs hidden_size / num_heads)")
        if att.sliding_window is not None:
            problems.append(f"attention.sliding_window = {att.sliding_window} (qwen2 here has none)")
    elif family == "llama":
        if att.qkv_bias != att.out_bias:
            problems.append("attention.qkv_bias != out_bias (llama's attention_bias covers both)")
        if att.sliding_window is not None:
            problems.append(f"attention.sliding_window = {att.sliding_window} (llama has none; use mistral)")
    elif att.qkv_bias or att.out_bias:
        problems.append("attention.qkv_bias/out_bias (mistral has no attention bias)")
    return problems


def rope_parameters(rope_cfg: RopeFields) -> dict[str, Any]:
    """Hugging Face's ``rope_parameters`` of a block's RoPE settings."""
    cfg = rope_cfg
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


def rope_fields(rope_cfg: RopeFields) -> dict[str, Any]:
    """``rope_theta``, ``rope_scaling`` (legacy form) and ``rope_parameters`` for ``config.json``."""
    rope = rope_parameters(rope_cfg)
    legacy = None if rope_cfg.rope_scaling == "none" else {k: v for k, v in rope.items() if k != "rope_theta"}
    return {"rope_theta": rope_cfg.rope_theta, "rope_scaling": legacy, "rope_parameters": rope}


def decoder_fields(cfg: GPTConfig, architecture: str, att: Any, norm: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` keys every llama-like family (llama, qwen2, mistral, qwen3_moe, mixtral) writes the
    same way: its class and type, sizes, heads, norm eps, RoPE, init, dtype."""
    return {
        "architectures": [architecture],
        "model_type": cfg.hf_model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": att.num_heads,
        "num_key_value_heads": att.num_kv_heads or att.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": norm.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        **rope_fields(att),
        "initializer_range": cfg.init_std,
        "torch_dtype": _DTYPES.get(dtype, "float32"),
        "use_cache": True,
    }


def config_to_hf(cfg: GPTConfig, dtype: torch.dtype = torch.float32, blocks: HFBlocks | None = None) -> dict[str, Any]:
    family = cfg.hf_model_type
    if family not in ARCHITECTURES:
        raise ValueError(f"hf_model_type = {family!r}: this family maps {', '.join(ARCHITECTURES)}")
    problems = _unsupported(cfg, family)
    if problems:
        raise ValueError(f"model cannot be exported as Hugging Face {family!r}: " + "; ".join(problems))
    att, mlp, norm = (block_settings(cfg, n) for n in ("attention", "swiglu", "rmsnorm"))
    head_dim = att.head_dim or cfg.hidden_size // att.num_heads
    out = decoder_fields(cfg, ARCHITECTURES[family], att, norm, dtype) | {"intermediate_size": mlp.ffn_hidden_size}
    if family != "qwen2":
        out["head_dim"] = head_dim
    if family == "llama":
        out.update(attention_bias=att.qkv_bias, mlp_bias=False)
    if family == "mistral":
        out["sliding_window"] = att.sliding_window
    if family == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    return out


def rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """A block's RoPE fields from ``rope_parameters`` (or the older ``rope_theta`` + ``rope_scaling``)."""
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


def attention_from_hf(hf: dict[str, Any], *, read_head_dim: bool = True) -> dict[str, Any]:
    """The attention settings every llama-like family (llama, qwen2, mistral, qwen3_moe, mixtral) reads the same
    way: heads, key/value heads, a head dim other than ``hidden / heads``, RoPE; only SiLU MLPs map."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act = {hf['hidden_act']!r}: allowed: silu")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") if read_head_dim else None
    if head_dim == hf["hidden_size"] // heads:
        head_dim = None
    return dict(
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim, **rope_from_hf(hf)
    )


def config_from_hf(hf: dict[str, Any], blocks: HFBlocks | None = None) -> GPTConfig:
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise ValueError(f"config.json model_type = {family!r}: this family reads {', '.join(ARCHITECTURES)}")
    attention = attention_from_hf(hf, read_head_dim=family != "qwen2")
    if family == "llama":
        if hf.get("mlp_bias"):
            raise ValueError("config.json mlp_bias = true: not supported")
        attention.update(qkv_bias=bool(hf.get("attention_bias")), out_bias=bool(hf.get("attention_bias")))
    if family == "qwen2":
        if hf.get("use_sliding_window"):
            raise ValueError("config.json use_sliding_window = true: Qwen2 per-layer sliding windows are not supported")
        attention["qkv_bias"] = True
    if family == "mistral":
        attention["sliding_window"] = hf.get("sliding_window")
    return GPTConfig(
        hf_model_type=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        init_std=hf.get("initializer_range", 0.02),
        blocks={
            "attention": Attention.Config(**attention),
            "swiglu": SwiGLU.Config(ffn_hidden_size=hf["intermediate_size"]),
            "rmsnorm": RMSNorm.Config(norm_eps=hf.get("rms_norm_eps", 1e-6)),
        },
    )


# -- weights -----------------------------------------------------------------------------------
#: Ours (under ``layers.i.``) -> Hugging Face's (under ``model.layers.i.``), for weights and biases alike.
_LAYER = {
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "attention.q": "self_attn.q_proj",
    "attention.k": "self_attn.k_proj",
    "attention.v": "self_attn.v_proj",
    "attention.out": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}


def _layer_names(cfg: GPTConfig) -> list[tuple[str, str]]:
    """``(ours, theirs)`` of every tensor of a decoder layer under ``cfg``, relative to the layer."""
    names = [(f"{mine}.weight", f"{theirs}.weight") for mine, theirs in _LAYER.items()]
    att = block_settings(cfg, "attention")
    if att.qkv_bias:
        names += [(f"attention.{n}.bias", f"self_attn.{n}_proj.bias") for n in "qkv"]
    if att.out_bias:
        names.append(("attention.out.bias", "self_attn.o_proj.bias"))
    return names


def state_to_hf(model: GPT, cfg: GPTConfig, blocks: HFBlocks | None = None) -> dict[str, torch.Tensor]:
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": ours["embed.weight"], "model.norm.weight": ours["final_norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ours["head.weight"]
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out.update({dst + theirs: ours[src + mine] for mine, theirs in _layer_names(cfg)})
    return {k: v.contiguous().cpu() for k, v in out.items()}


def take_tensor(hf: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """``hf.pop(name)``; a ``UserError`` naming the tensor when the checkpoint lacks it."""
    if name not in hf:
        raise UserError(f"checkpoint is missing tensor {name!r} needed for this config")
    return hf.pop(name)


def check_all_taken(hf: dict[str, torch.Tensor]) -> None:
    """A ``UserError`` naming a few of the tensors still in ``hf`` (rotary caches aside): weights nothing reads."""
    leftover = [k for k in hf if "rotary_emb" not in k]
    if leftover:
        raise UserError(f"checkpoint has tensors this config does not use, e.g. {leftover[:3]}")


def state_from_hf(
    hf: dict[str, torch.Tensor], cfg: GPTConfig, hf_config: dict[str, Any], blocks: HFBlocks | None = None
) -> dict[str, torch.Tensor]:
    def take(name: str) -> torch.Tensor:
        return take_tensor(hf, name)

    out = {"embed.weight": take("model.embed_tokens.weight"), "final_norm.weight": take("model.norm.weight")}
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)
    else:
        out["head.weight"] = take("lm_head.weight")
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        out.update({dst + mine: take(src + theirs) for mine, theirs in _layer_names(cfg)})
    check_all_taken(hf)
    return out


# -- files ----------------------------------------------------------------------------------------
def read_tensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    """Every tensor of model directory ``path`` (``model.safetensors`` or the shards of its index)."""
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
        try:
            tensors.update(load_file(str(target), device=device))
        except (SafetensorError, OSError) as exc:  # truncated, garbage, a header claiming more than the file holds
            raise UserError(f"{target}: not a readable safetensors file ({' '.join(str(exc).split())})") from None
    if not tensors:
        raise UserError(f"{path}: the weight files hold no tensors")
    return tensors


def check_state_fits(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """A ``UserError`` unless ``state`` has exactly ``model``'s (meta) tensors, each of its shape and floating point.

    Checked before any memory is allocated for the model: a ``config.json`` claiming sizes its weights do not have
    (hidden_size = 10**6 beside a small file) must not allocate what it claims.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unused = [k for k in state if k not in expected]
    wrong = [
        f"{k}: {tuple(state[k].shape)} in the weights, {tuple(v.shape)} from config.json"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if wrong:
        raise UserError(f"{path}: the weights do not fit config.json ({'; '.join(wrong[:3])})")
    if missing or unused:
        detail = f"no weights for {missing[:3]}" if missing else f"weights the model has no place for: {unused[:3]}"
        raise UserError(f"{path}: the weights do not fit config.json ({detail})")
    not_float = [k for k, t in state.items() if not t.is_floating_point()]
    if not_float:
        raise UserError(
            f"{path}: tensor {not_float[0]!r} is {state[not_float[0]].dtype}; weights must be floating point"
        )


# -- families (registered under kind "hf") ---------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One Hugging Face ``model_type`` read and written by ``codec`` (a module with ``config_to_hf``,
    ``config_from_hf``, ``state_to_hf`` and ``state_from_hf``, each given the family's ``HFBlocks`` last);
    implements ``mcore.hf.HFFamily``."""

    name: str
    codec: Any
    model: str = "gpt"

    def load(self, path: Path, *, device: Any = "cpu", block_lookup: Any = None) -> tuple[GPTConfig, GPT]:
        """Read model directory ``path`` into ``(config, model)`` on ``device``."""
        path = Path(path)
        hf_config = read_hf_config(path)
        if hf_config.get("model_type") != self.name:
            raise UserError(f"{path}/config.json: model_type = {hf_config.get('model_type')!r}, not {self.name!r}")
        blocks = HFBlocks(block_lookup, self.name)
        try:
            config = self.codec.config_from_hf(hf_config, blocks)
        except (KeyError, TypeError, ArithmeticError) as exc:
            raise UserError(
                f"{path}/config.json: missing or malformed key ({exc!r}) for model_type {self.name!r}"
            ) from None
        tensors = read_tensors(path, str(device))
        dtype = next(iter(tensors.values())).dtype
        # the tensors first: a config.json claiming more layers than the weights hold stops at the first missing one
        state = self.codec.state_from_hf(tensors, config, hf_config, blocks)
        with torch.device("meta"):
            model = GPT(config, block_lookup=block_lookup)
        check_state_fits(model, state, path)
        model = model.to(dtype=dtype).to_empty(device=device)
        model.load_state_dict(state, strict=True)
        return config, model

    def export(self, model: GPT, config: GPTConfig, out_dir: Path) -> None:
        """Write ``out_dir/config.json`` and ``out_dir/model.safetensors`` in the model's dtype."""
        if config.hf_model_type != self.name:
            raise UserError(f"model.hf_model_type = {config.hf_model_type!r}; this family writes {self.name!r}")
        blocks = HFBlocks.of_model(model, config, self.name)
        hf_config = self.codec.config_to_hf(config, model.embed.weight.dtype, blocks)  # refuses what does not map
        tensors = self.codec.state_to_hf(model, config, blocks)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        weights = out_dir / "model.safetensors"
        save_file(tensors, str(weights), metadata={"format": "pt"})
        normalize_permissions(weights)  # safetensors writes through a private (0600) temporary file
        (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


LLAMA = Family("llama", sys.modules[__name__])
QWEN2 = Family("qwen2", sys.modules[__name__])
MISTRAL = Family("mistral", sys.modules[__name__])


def family(name: str | None) -> Family:
    """This package's family for ``model_type`` ``name`` (Python use; runs resolve families through the registry)."""
    from mcore_models.hf_deepseek import DEEPSEEK_V3
    from mcore_models.hf_moe import MIXTRAL, QWEN3_MOE
    from mcore_models.hf_qwen3_next import QWEN3_NEXT

    families = {"llama": LLAMA, "qwen2": QWEN2, "mistral": MISTRAL, "deepseek_v3": DEEPSEEK_V3}
    families |= {"qwen3_moe": QWEN3_MOE, "mixtral": MIXTRAL, "qwen3_next": QWEN3_NEXT}
    if name not in families:
        raise UserError(f"Hugging Face model_type = {name!r}: mcore-models maps {', '.join(families)}")
    return families[name]


def import_hf(path: Path, *, device: torch.device | str = "cpu", block_lookup: Any = None) -> tuple[GPTConfig, GPT]:
    """Read a Hugging Face checkpoint directory into ``(config, model)`` on ``device`` (this package's families;
    ``block_lookup(name)`` gives the class of a plugin's block, e.g. ``moe``, for the layers that use one)."""
    return family(read_hf_config(Path(path)).get("model_type")).load(
        Path(path), device=device, block_lookup=block_lookup
    )


def export_hf(model: GPT, config: GPTConfig, out_dir: Path) -> None:
    """Write ``model`` as Hugging Face family ``config.hf_model_type`` into ``out_dir``."""
    family(config.hf_model_type).export(model, config, Path(out_dir))


__all__ = ["LLAMA", "MISTRAL", "QWEN2", "Family", "config_from_hf", "config_to_hf", "export_hf", "import_hf"]
