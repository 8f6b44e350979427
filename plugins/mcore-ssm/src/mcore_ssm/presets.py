"""Presets of hybrid ``gpt`` models with ``gdn`` layers, registered by this plugin under kind ``"preset"``.

The presets belong here because they use this plugin's block (``mcore.presets``); the model (``gpt``), its
attention, norms and MLPs come from mcore-models and the ``moe`` block from mcore-moe, all named only (no
import). Each is an ``mcore.presets.Preset`` (``[model]`` keys, one table per block); adding one is one entry
in ``PRESETS`` and one constant.

* ``qwen3-next-mini``: Qwen3-Next's layer kinds scaled down (hidden 512, 8 layers): Gated DeltaNet and gated
  attention 3:1 (``layer_types`` linear, linear, linear, full), attention with a sigmoid output gate,
  zero-centred QK-norm and partial RoPE (a quarter of each head), zero-centred RMSNorms, every MLP MoE
  (16 experts top-4 softmax, renormalised, one shared expert behind a sigmoid gate). Exports as Hugging Face
  ``qwen3_next``.
* ``hybrid-bench``: the hybrid benchmarks' model: ``bench-0.9b``'s vocabulary, hidden size, attention, dense
  SwiGLU MLPs and depth (16 layers), with three of every four mixers Gated DeltaNet (8 query/key heads, 16
  value heads, head dims 128); about 0.94B parameters, so its training step compares with ``bench-0.9b``'s.
  Plain (ungated) attention and ones-centred norms like ``bench-0.9b``: it does not export.
"""

from __future__ import annotations

from mcore.presets import Preset

QWEN3_NEXT_MINI = Preset(
    "gpt",
    dict(
        vocab_size=32768,
        hidden_size=512,
        num_layers=8,
        layers=["3*gdn/moe", "attention/moe", "3*gdn/moe", "attention/moe"],
        hf_model_type="qwen3_next",
        max_position_embeddings=4096,
        attention=dict(
            num_heads=8,
            num_kv_heads=2,
            head_dim=64,
            qk_norm=True,
            qk_norm_zero_centered=True,
            output_gate=True,
            norm_eps=1e-6,
            rope_theta=1e7,
            rotary_fraction=0.25,
        ),
        gdn=dict(num_qk_heads=4, num_v_heads=8, head_k_dim=64, head_v_dim=64, conv_kernel=4, norm_eps=1e-6),
        moe=dict(
            num_experts=16,
            top_k=4,
            score_function="softmax",
            normalize=True,
            aux_loss_coeff=1e-3,
            moe_ffn_hidden_size=256,
            num_shared_experts=1,
            shared_ffn_hidden_size=256,
            shared_expert_gate=True,
        ),
        rmsnorm=dict(norm_eps=1e-6, zero_centered_gamma=True),
    ),
)

HYBRID_BENCH = Preset(
    "gpt",
    dict(
        vocab_size=32768,
        hidden_size=2048,
        num_layers=16,
        layers=["3*gdn/swiglu", "attention/swiglu"] * 4,
        tie_embeddings=False,
        max_position_embeddings=16384,  # the long-sequence benchmark's length
        loss_chunk_size=8192,
        attention=dict(num_heads=16, num_kv_heads=8, rope_theta=10000.0),
        gdn=dict(num_qk_heads=8, num_v_heads=16, head_k_dim=128, head_v_dim=128, conv_kernel=4, norm_eps=1e-6),
        swiglu=dict(ffn_hidden_size=5632),
        rmsnorm=dict(norm_eps=1e-5),
    ),
)

#: ``nemotron-h-mini``: Nemotron-H's layer kinds scaled down (hidden 512, 12 layers of ONE block each, the pattern
#: ``M-M-*-M-M-*-``): Mamba2 mixers (16 heads of 64, 4 groups, state 64), NoPE attention, squared-ReLU MLPs as
#: mixer-only layers (``gelu-mlp`` with ``activation = "relu2"`` in the mixer's place). Exports as ``nemotron_h``.
NEMOTRON_H_MINI = Preset(
    "gpt",
    dict(
        vocab_size=32768,
        hidden_size=512,
        num_layers=12,
        layers=["mamba2/none", "gelu-mlp/none", "mamba2/none", "gelu-mlp/none", "attention/none", "gelu-mlp/none"] * 2,
        hf_model_type="nemotron_h",
        max_position_embeddings=4096,
        mamba2=dict(d_state=64, d_conv=4, headdim=64, num_heads=16, ngroups=4, chunk_size=128, norm_eps=1e-5),
        attention=dict(num_heads=8, num_kv_heads=2, head_dim=64, no_rope=True),
        **{"gelu-mlp": dict(ffn_hidden_size=2048, activation="relu2")},
        rmsnorm=dict(norm_eps=1e-5),
    ),
)

#: name -> (attribute, summary), registered by ``plugin.py``.
PRESETS = {
    "nemotron-h-mini": (
        "NEMOTRON_H_MINI",
        "small Nemotron-H: Mamba2, NoPE attention and squared-ReLU MLP layers (M-M-*-M-M-*-), exports nemotron_h",
    ),
    "qwen3-next-mini": (
        "QWEN3_NEXT_MINI",
        "small Qwen3-Next: GDN and gated attention 3:1, 8 MoE layers (16 experts top-4, gated shared expert)",
    ),
    "hybrid-bench": (
        "HYBRID_BENCH",
        "hybrid benchmark model (~0.94B): bench-0.9b with 3 of every 4 mixers Gated DeltaNet",
    ),
}
