"""Named architecture presets of the ``gpt`` model, registered under kind ``"preset"`` (``plugin.py``).

Each is an ``mcore.presets.Preset``: ``[model]`` keys, and one table per block
(``attention``, ``swiglu``, ``rmsnorm``...). The public-model presets follow the published configs
of those checkpoints, so importing the real weights gives the same architecture.
``gpt-125m`` is GPT-2 small's size (hidden 768, 12 layers, 12 heads: its 85M non-embedding parameters) in
this model's Llama style (RoPE, RMSNorm, SwiGLU of 2048 = 8/3 x 768, no biases) with an untied 32k
vocabulary, 135M parameters in all: the model of mcore-precision's loss-curve runs.
``deepseek-v3-mini-dense`` is a small MLA + MTP model with DeepSeek-V3's layer shapes scaled down and
every MLP dense SwiGLU; it exports as a dense Hugging Face ``deepseek_v3`` model. (``deepseek-v3-mini``,
with its MoE layers, is the MoE plugin's preset.)

``preset_config(name, **overrides)`` gives a ``GPTConfig`` for Python use (tests, benchmarks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mcore.presets import Preset, deep_merge

TINY = Preset(
    "gpt",
    dict(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        max_position_embeddings=1024,
        loss_chunk_size=256,
        attention=dict(num_heads=4, num_kv_heads=2),
        swiglu=dict(ffn_hidden_size=176),
    ),
)

BENCH_0_9B = Preset(
    "gpt",
    dict(
        vocab_size=32768,
        hidden_size=2048,
        num_layers=16,
        tie_embeddings=False,
        max_position_embeddings=4096,
        loss_chunk_size=8192,  # one chunk per micro-batch of 2 x 4096 tokens
        attention=dict(num_heads=16, num_kv_heads=8, rope_theta=10000.0),
        swiglu=dict(ffn_hidden_size=5632),
        rmsnorm=dict(norm_eps=1e-5),
    ),
)

GPT_125M = Preset(
    "gpt",
    dict(
        vocab_size=32768,  # a 32k tokenizer (``mcore data train-tokenizer --vocab-size 32768``) or bytes
        hidden_size=768,
        num_layers=12,
        tie_embeddings=False,
        max_position_embeddings=2048,
        loss_chunk_size=8192,
        attention=dict(num_heads=12, rope_theta=10000.0),
        swiglu=dict(ffn_hidden_size=2048),
        rmsnorm=dict(norm_eps=1e-5),
    ),
)

_LLAMA3_ROPE = dict(
    rope_theta=500000.0,
    rope_scaling="llama3",
    rope_factor=32.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_positions=8192,
)

LLAMA3_2_1B = Preset(
    "gpt",
    dict(
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        tie_embeddings=True,
        max_position_embeddings=131072,
        hf_model_type="llama",
        attention=dict(num_heads=32, num_kv_heads=8, head_dim=64, **_LLAMA3_ROPE),
        swiglu=dict(ffn_hidden_size=8192),
        rmsnorm=dict(norm_eps=1e-5),
    ),
)

LLAMA3_8B = Preset(
    "gpt",
    dict(
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        tie_embeddings=False,
        max_position_embeddings=8192,
        hf_model_type="llama",
        attention=dict(num_heads=32, num_kv_heads=8, rope_theta=500000.0),
        swiglu=dict(ffn_hidden_size=14336),
        rmsnorm=dict(norm_eps=1e-5),
    ),
)

QWEN2_5_0_5B = Preset(
    "gpt",
    dict(
        vocab_size=151936,
        hidden_size=896,
        num_layers=24,
        tie_embeddings=True,
        max_position_embeddings=32768,
        hf_model_type="qwen2",
        attention=dict(num_heads=14, num_kv_heads=2, rope_theta=1000000.0, qkv_bias=True),
        swiglu=dict(ffn_hidden_size=4864),
        rmsnorm=dict(norm_eps=1e-6),
    ),
)

DEEPSEEK_V3_MINI_DENSE = Preset(
    "gpt",
    dict(
        vocab_size=32768,
        hidden_size=512,
        num_layers=4,
        mixer="mla",
        mtp_num_layers=1,
        mtp_loss_weight=0.3,
        hf_model_type="deepseek_v3",
        max_position_embeddings=4096,
        mla=dict(
            num_heads=8,
            q_lora_rank=192,
            kv_lora_rank=128,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            norm_eps=1e-6,
        ),
        swiglu=dict(ffn_hidden_size=1408),
        rmsnorm=dict(norm_eps=1e-6),
        mtp=dict(norm_eps=1e-6),
    ),
)

#: Every preset of this package by registered name.
PRESETS: Mapping[str, Preset] = {
    "tiny": TINY,
    "bench-0.9b": BENCH_0_9B,
    "gpt-125m": GPT_125M,
    "llama3.2-1b": LLAMA3_2_1B,
    "llama3-8b": LLAMA3_8B,
    "qwen2.5-0.5b": QWEN2_5_0_5B,
    "deepseek-v3-mini-dense": DEEPSEEK_V3_MINI_DENSE,
}


def preset_values(name: str, **overrides: Any) -> dict[str, Any]:
    """Preset ``name``'s values with ``overrides`` merged over them (tables key by key)."""
    return deep_merge(PRESETS[name].values, overrides)


def preset_config(name: str, **overrides: Any) -> Any:
    """A ``GPTConfig`` of preset ``name`` with ``overrides`` (``attention={"num_heads": 2}`` merges into the table)."""
    from mcore_models.gpt import GPTConfig

    return GPTConfig.from_values({"preset": name, **preset_values(name, **overrides)})
