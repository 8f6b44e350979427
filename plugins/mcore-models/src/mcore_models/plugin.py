"""The ``mcore`` entry point of mcore-models: registers blocks and models as lazy references.

Importing this module imports neither torch nor any block: the registry resolves the
``"module:attr"`` strings on first use.
"""

from __future__ import annotations

from typing import Any

from mcore.plugins import hookimpl

MCORE_PLUGIN_API = 1

_BLOCKS = {
    "rmsnorm": ("mcore_models.blocks.norms:RMSNorm", "RMSNorm (fp32 statistics; Triton kernel on CUDA)"),
    "layernorm": ("mcore_models.blocks.norms:LayerNorm", "LayerNorm, optional zero-centred gamma"),
    "attention": (
        "mcore_models.blocks.attention:Attention",
        "causal MHA/GQA/MQA with RoPE variants, QK-norm, sliding window, packed sequences",
    ),
    "mla": ("mcore_models.blocks.mla:MLA", "multi-head latent attention (DeepSeek-V3), absorbed decode form"),
    "swiglu": ("mcore_models.blocks.mlp:SwiGLU", "SwiGLU MLP (fused gate/up; Triton activation on CUDA)"),
    "gelu-mlp": ("mcore_models.blocks.mlp:GeluMLP", "two-layer GeLU MLP"),
    "clamped-swiglu": ("mcore_models.blocks.mlp:ClampedSwiGLU", "SwiGLU with clamped gate and up projections"),
    "mtp": ("mcore_models.blocks.mtp:MTP", "multi-token prediction module (DeepSeek-V3 style)"),
}


@hookimpl
def mcore_register(registry: Any) -> None:
    for name, (ref, summary) in _BLOCKS.items():
        registry.add("block", name, ref, summary=summary)
    registry.add(
        "model",
        "gpt",
        "mcore_models.gpt:GPT",
        summary="decoder built from block names; presets tiny, bench-0.9b, llama3.x, qwen2.5, deepseek-v3-mini; HF import/export",
    )
