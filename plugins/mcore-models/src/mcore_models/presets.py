"""Named architecture presets of the ``gpt`` model (values for ``GPT.Config`` fields).

The public-model presets follow the published configs of those checkpoints, so
``import_hf`` of the real weights gives the same architecture. ``deepseek-v3-mini`` is a small
MLA + MTP model with DeepSeek-V3's layer shapes scaled down (its MoE layers come with the MoE
plugin; here the MLP is dense SwiGLU); it exports as a dense Hugging Face ``deepseek_v3`` model.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=176,
        max_position_embeddings=1024,
        loss_chunk_size=256,
    ),
    "bench-0.9b": dict(
        vocab_size=32768,
        hidden_size=2048,
        num_layers=16,
        num_heads=16,
        num_kv_heads=8,
        ffn_hidden_size=5632,
        tie_embeddings=False,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        loss_chunk_size=8192,  # one chunk per micro-batch of 2 x 4096 tokens
    ),
    "llama3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        ffn_hidden_size=8192,
        tie_embeddings=True,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling="llama3",
        rope_factor=32.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_positions=8192,
        max_position_embeddings=131072,
        hf_model_type="llama",
    ),
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        ffn_hidden_size=14336,
        tie_embeddings=False,
        norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        hf_model_type="llama",
    ),
    "qwen2.5-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        ffn_hidden_size=4864,
        tie_embeddings=True,
        norm_eps=1e-6,
        rope_theta=1000000.0,
        qkv_bias=True,
        max_position_embeddings=32768,
        hf_model_type="qwen2",
    ),
    "deepseek-v3-mini": dict(
        vocab_size=32768,
        hidden_size=512,
        num_layers=4,
        num_heads=8,
        ffn_hidden_size=1408,
        attention="mla",
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        norm_eps=1e-6,
        mtp_num_layers=1,
        mtp_loss_weight=0.3,
        hf_model_type="deepseek_v3",
        max_position_embeddings=4096,
    ),
}


def presets() -> MappingProxyType[str, MappingProxyType[str, Any]]:
    return MappingProxyType({name: MappingProxyType(values) for name, values in _PRESETS.items()})
