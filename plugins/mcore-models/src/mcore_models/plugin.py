"""The ``mcore`` entry point of mcore-models: registers blocks, attention backends, the ``gpt`` model, its
presets and its Hugging Face families, all as lazy references.

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
    "swiglu": ("mcore_models.blocks.mlp:SwiGLU", "SwiGLU MLP (separate gate/up; Triton activation on CUDA)"),
    "gelu-mlp": ("mcore_models.blocks.mlp:GeluMLP", "two-layer GeLU MLP (or squared ReLU: activation = relu2)"),
    "clamped-swiglu": ("mcore_models.blocks.mlp:ClampedSwiGLU", "SwiGLU with clamped gate and up projections"),
    "mtp": ("mcore_models.blocks.mtp:MTP", "multi-token prediction module (DeepSeek-V3 style)"),
}

_ATTENTION = {
    "sdpa": (
        "mcore_models.attention_backends.sdpa:SDPABackend",
        "PyTorch SDPA (cuDNN/flash causal path; dense boolean mask for documents, windows, cached keys)",
    ),
    "flex": (
        "mcore_models.attention_backends.flex:FlexBackend",
        "FlexAttention with a block-sparse document/window mask built once per call (compiled on CUDA)",
    ),
    "flex-autotune": (
        "mcore_models.attention_backends.flex:FlexAutotuneBackend",
        "flex with inductor's autotuned tile sizes (CUDA; timed once per shape on its first call)",
    ),
    "auto": (
        "mcore_models.attention_backends.auto:AutoBackend",
        "flex for packed documents or sliding windows on CUDA, sdpa otherwise (the blocks' default)",
    ),
}

_PRESETS = {
    "tiny": ("TINY", "2 layers, hidden 64: for tests and first runs"),
    "bench-0.9b": ("BENCH_0_9B", "0.9B Llama-style model of the benchmarks"),
    "gpt-125m": ("GPT_125M", "GPT-2-small-sized Llama-style model (135M with its 32k untied vocabulary)"),
    "llama3.2-1b": ("LLAMA3_2_1B", "Llama 3.2 1B shapes (tied embeddings, llama3 RoPE scaling)"),
    "llama3-8b": ("LLAMA3_8B", "Llama 3 8B shapes"),
    "qwen2.5-0.5b": ("QWEN2_5_0_5B", "Qwen2.5 0.5B shapes (QKV bias)"),
    "deepseek-v3-mini-dense": (
        "DEEPSEEK_V3_MINI_DENSE",
        "small MLA + MTP model with DeepSeek-V3's layer shapes, dense MLPs (deepseek-v3-mini: mcore-moe's)",
    ),
}

_HF_FAMILIES = {
    "llama": ("mcore_models.hf:LLAMA", "LlamaForCausalLM <-> gpt"),
    "qwen2": ("mcore_models.hf:QWEN2", "Qwen2ForCausalLM <-> gpt"),
    "mistral": ("mcore_models.hf:MISTRAL", "MistralForCausalLM <-> gpt"),
    "deepseek_v3": (
        "mcore_models.hf_deepseek:DEEPSEEK_V3",
        "DeepseekV3ForCausalLM (MLA, MTP; MoE layers through the moe block) <-> gpt",
    ),
    "qwen3_moe": ("mcore_models.hf_moe:QWEN3_MOE", "Qwen3MoeForCausalLM (QK-norm; MoE layers: the moe block) <-> gpt"),
    "mixtral": ("mcore_models.hf_moe:MIXTRAL", "MixtralForCausalLM (MoE layers: the moe block) <-> gpt"),
    "qwen3_next": (
        "mcore_models.hf_qwen3_next:QWEN3_NEXT",
        "Qwen3NextForCausalLM (gated attention; gdn and moe layers through their blocks) <-> gpt",
    ),
    "nemotron_h": (
        "mcore_models.hf_nemotron_h:NEMOTRON_H",
        "NemotronHForCausalLM (mixer-only layers: mamba2 through its block, NoPE attention, squared-ReLU MLP) <-> gpt",
    ),
}


@hookimpl
def mcore_register(registry: Any) -> None:
    for name, (ref, summary) in _BLOCKS.items():
        registry.add("block", name, ref, summary=summary)
    for name, (ref, summary) in _ATTENTION.items():
        registry.add("attention", name, ref, summary=summary)
    registry.add(
        "model",
        "gpt",
        "mcore_models.gpt:GPT",
        summary="decoder composed from a layer pattern of registered blocks; MTP, muP; HF import/export",
    )
    for name, (attr, summary) in _PRESETS.items():
        registry.add("preset", name, f"mcore_models.presets:{attr}", summary=summary)
    for name, (ref, summary) in _HF_FAMILIES.items():
        registry.add("hf", name, ref, summary=summary)
