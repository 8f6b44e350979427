"""Presets of ``gpt`` models with ``moe`` layers, registered by this plugin under kind ``"preset"``.

The presets belong here because they use this plugin's block (``mcore.presets``); the model (``gpt``) and
its other blocks come from mcore-models. Each is an ``mcore.presets.Preset`` (``[model]`` keys, one table
per block):

* ``deepseek-v3-mini``: DeepSeek-V3's layer kinds scaled down: MLA, the first layer dense, then MoE layers
  with group-limited sigmoid routing, the aux-loss-free expert bias, a shared expert and a small sequence
  aux loss; one MTP depth (a MoE layer, like the last one). Exports as Hugging Face ``deepseek_v3``.
  (mcore-models' dense version is ``deepseek-v3-mini-dense``.)
* ``qwen3-moe-mini``: Qwen3-MoE's kinds scaled down: GQA with QK-norm, every layer MoE, softmax top-k
  renormalised, a load-balancing aux loss; exports as ``qwen3_moe``.
* ``moe-bench``: the MoE benchmarks' model: bench-0.9b's attention and vocabulary, every one of its 16
  layers MoE with 64 experts top-8 of FFN 1024 and one shared expert (the layer benchmark's shape),
  sigmoid routing with the expert bias; about 6.9B parameters, 1.2B active per token. No Hugging Face
  family expresses a shared expert beside GQA attention, so it does not export.
"""

from __future__ import annotations

from mcore.presets import Preset

_MLA = dict(num_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)

DEEPSEEK_V3_MINI = Preset(
    "gpt",
    dict(
        vocab_size=32768,
        hidden_size=512,
        num_layers=4,
        layers=["1*mla/swiglu", "3*mla/moe"],
        mtp_num_layers=1,
        mtp_loss_weight=0.3,
        hf_model_type="deepseek_v3",
        max_position_embeddings=4096,
        mla=dict(_MLA, norm_eps=1e-6),
        swiglu=dict(ffn_hidden_size=1408),
        moe=dict(
            num_experts=16,
            top_k=4,
            score_function="sigmoid",
            normalize=True,
            routed_scaling_factor=2.5,
            num_groups=4,
            topk_groups=2,
            expert_bias=True,
            bias_update_rate=1e-3,
            seq_aux_loss_coeff=1e-4,
            moe_ffn_hidden_size=256,
            num_shared_experts=1,
        ),
        rmsnorm=dict(norm_eps=1e-6),
        mtp=dict(norm_eps=1e-6),
    ),
)

QWEN3_MOE_MINI = Preset(
    "gpt",
    dict(
        vocab_size=32768,
        hidden_size=512,
        num_layers=4,
        mlp="moe",
        hf_model_type="qwen3_moe",
        max_position_embeddings=4096,
        attention=dict(num_heads=8, num_kv_heads=4, head_dim=64, qk_norm=True, norm_eps=1e-6, rope_theta=1e6),
        moe=dict(
            num_experts=16,
            top_k=4,
            score_function="softmax",
            normalize=True,
            aux_loss_coeff=1e-3,
            moe_ffn_hidden_size=256,
        ),
        rmsnorm=dict(norm_eps=1e-6),
    ),
)

MOE_BENCH = Preset(
    "gpt",
    dict(
        vocab_size=32768,
        hidden_size=2048,
        num_layers=16,
        mlp="moe",  # every layer MoE: each is the layer benchmark's shape
        tie_embeddings=False,
        max_position_embeddings=4096,
        loss_chunk_size=8192,
        attention=dict(num_heads=16, num_kv_heads=8, rope_theta=10000.0),
        moe=dict(
            num_experts=64,
            top_k=8,
            score_function="sigmoid",
            normalize=True,
            expert_bias=True,
            moe_ffn_hidden_size=1024,
            num_shared_experts=1,
        ),
        rmsnorm=dict(norm_eps=1e-5),
    ),
)

#: name -> (attribute, summary), registered by ``plugin.py``.
PRESETS = {
    "deepseek-v3-mini": (
        "DEEPSEEK_V3_MINI",
        "small DeepSeek-V3: MLA, 1 dense + 3 MoE layers (16 experts top-4, groups, sigmoid + bias, shared), MTP",
    ),
    "qwen3-moe-mini": ("QWEN3_MOE_MINI", "small Qwen3-MoE: QK-norm GQA, 4 MoE layers (16 experts top-4, softmax)"),
    "moe-bench": (
        "MOE_BENCH",
        "MoE benchmark model: hidden 2048, 16 MoE layers of 64 experts top-8 (FFN 1024) + shared",
    ),
}
