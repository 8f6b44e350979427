"""Integration: a ``gpt`` model (mcore-models) with ``moe`` layers (mcore-moe) under an inference cache.

MoE blocks use no cache: under ``ctx.kv_cache`` they route the step's new tokens as any others, so a packed
prefill of ragged prompts followed by batched decode (mcore_testing's ``ReferenceKVCache``, the models
plugin's default paged attention) gives the full-sequence forward's logits at every step (fp32).
"""

from __future__ import annotations

import itertools

import torch

from mcore.plugins import load_plugins
from mcore.protocols.block import LOGIT_ROWS, BlockContext
from mcore_testing.numerics import assert_rel_close
from mcore_testing.reference_kv import ReferenceKVCache


@torch.no_grad()
def test_moe_gpt_prefill_and_decode_through_the_cache_equal_the_full_forward() -> None:
    host = load_plugins(
        entry_points=False, env=False, unpackaged=False, extra=["mcore_models.plugin", "mcore_moe.plugin"]
    )
    gpt = host.load("model", "gpt")
    config = gpt.Config.from_values(
        {
            "vocab_size": 64,
            "hidden_size": 32,
            "num_layers": 2,
            "layers": ["1*attention/swiglu", "1*attention/moe"],
            "attention": {"num_heads": 4, "num_kv_heads": 2},
            "swiglu": {"ffn_hidden_size": 48},
            "moe": {"num_experts": 4, "top_k": 2, "moe_ffn_hidden_size": 16, "num_shared_experts": 1},
        }
    )
    model = gpt.build(config, seed=0, device="cpu", block_lookup=lambda name: host.load("block", name)).eval()
    assert sorted(model.cache_specs()) == [0, 1]
    gen = torch.Generator().manual_seed(0)
    prompts, steps = [5, 2, 7], 4
    seqs = [torch.randint(0, 64, (p + steps,), generator=gen).tolist() for p in prompts]
    full = [model(torch.tensor(s)[None])[0] for s in seqs]  # (L, V) each
    cache = ReferenceKVCache(model.cache_specs(), block_size=4, num_blocks=32)

    def step(chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        counts = [len(c) for c in chunks]
        cache.schedule(list(range(len(chunks))), counts)
        cu = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32)
        positions = torch.cat([torch.arange(a, a + c) for a, c in zip(starts, counts)])[None]
        tokens = torch.tensor(list(itertools.chain(*chunks)))[None]
        ctx = BlockContext(
            positions=positions, cu_seqlens=cu, max_seqlen=max(counts), kv_cache=cache, extra={LOGIT_ROWS: cu[1:] - 1}
        )
        return model(tokens, ctx=ctx)[0]  # (S, V)

    logits = step([s[:p] for s, p in zip(seqs, prompts)], [0, 0, 0])
    for i, p in enumerate(prompts):
        assert_rel_close(logits[i], full[i][p - 1], 1e-5)
    for t in range(steps):
        logits = step([[s[p + t]] for s, p in zip(seqs, prompts)], [p + t for p in prompts])
        for i, p in enumerate(prompts):
            assert_rel_close(logits[i], full[i][p + t], 1e-5, name=f"decode step {t} of sequence {i}")
