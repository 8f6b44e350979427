"""Integration: a ``gpt`` model (mcore-models) with ``moe`` layers (mcore-moe) under an inference cache.

MoE blocks use no cache: under ``ctx.kv_cache`` they run their inference path (``mcore_moe.inference``: dropless,
static shapes, no host sync) over the step's new tokens, so a packed prefill of ragged prompts followed by batched
decode (mcore_testing's ``ReferenceKVCache``, the models plugin's default paged attention) gives the
full-sequence forward's logits at every step (fp32). The engine (mcore-inference) serving it, eagerly and through
the static decode path (what CUDA graphs capture), with ragged arrivals and chunked prefill, gives the greedy
tokens of the full forward's argmax; the static step traces as one graph; on the GPU (``-m gpu``) the captured
graphs give the tokens of the same static step run eagerly.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from engine_helpers import greedy_reference, run_arrivals
from mcore_inference.engine import LLMEngine
from mcore_inference.sampling import SamplingParams

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


VOCAB = 64
GREEDY = SamplingParams(max_tokens=5, temperature=0.0)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def moe_gpt(hidden: int = 32, device: str = "cpu", **moe: Any) -> Any:
    """A 2-layer ``gpt``: dense attention/swiglu, then attention/moe with 8 experts, top-2 (so a decode step
    of a few sequences leaves experts without a token) and a shared expert."""
    host = load_plugins(
        entry_points=False, env=False, unpackaged=False, extra=["mcore_models.plugin", "mcore_moe.plugin"]
    )
    gpt = host.load("model", "gpt")
    config = gpt.Config.from_values(
        {
            "vocab_size": VOCAB,
            "hidden_size": hidden,
            "num_layers": 2,
            "max_position_embeddings": 256,
            "layers": ["1*attention/swiglu", "1*attention/moe"],
            "attention": {"num_heads": 4, "num_kv_heads": 2},
            "swiglu": {"ffn_hidden_size": 3 * hidden // 2},
            "moe": {"num_experts": 8, "top_k": 2, "moe_ffn_hidden_size": hidden // 2, "num_shared_experts": 1, **moe},
        }
    )
    return gpt.build(config, seed=3, device=device, block_lookup=lambda name: host.load("block", name)).eval()


def reference(model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    return greedy_reference(model, prompt, max_tokens)


def run(engine: LLMEngine, prompts: list[list[int]], arrive: list[int]) -> list[list[int]]:
    return run_arrivals(engine, prompts, arrive, GREEDY)


def prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("static", [False, True])
def test_engine_greedy_on_moe_gpt_equals_full_forward_argmax(static: bool) -> None:
    """Ragged prompts arriving over several steps, prefill chunked to 9 tokens a step, eager or static decode
    (padded to 1, 2 or 4 rows; 5 decoding sequences run eagerly); the routers' capacity factor is ignored."""
    model = moe_gpt()
    capped = moe_gpt(capacity_factor=0.5)  # the same weights; served dropless
    batch = prompts(1, (7, 19, 1, 12, 4))
    want = [reference(model, p, GREEDY.max_tokens) for p in batch]
    with torch.no_grad():
        x = torch.tensor([batch[1]])
        assert not torch.allclose(capped(x), model(x)), "capacity 0.5 drops nothing: the capped model proves nothing"
    kwargs: dict[str, Any] = {"block_size": 4, "num_blocks": 64, "max_num_batched_tokens": 9}
    if static:
        kwargs |= {"static_decode": True, "graph_batch_sizes": (1, 2, 4)}
    for served in (model, capped):
        engine = LLMEngine(served, **kwargs)
        assert run(engine, batch, [0, 0, 1, 3, 3]) == want
        assert not static or (engine.decoder is not None and engine.decoder.num_static >= 3)


@pytest.mark.usefixtures("one_thread")
def test_static_moe_decode_step_traces_as_one_graph() -> None:
    """The static decode step of the MoE model has no host sync and no data-dependent shape: dynamo traces it
    whole (the training path's ``nonzero`` and host-side group sizes would break it)."""
    model = moe_gpt()
    engine = LLMEngine(model, block_size=4, num_blocks=32, static_decode=True, graph_batch_sizes=(4,))
    decoder = engine.decoder
    assert decoder is not None
    step = decoder.buffers.step(4)
    engine.cache.begin_static_decode(step)  # no step scheduled: padding rows only
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(decoder.forward)(step)
    engine.cache.end_static_decode()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows", [(1, 2, 4, 8), (8,)])
def test_moe_cuda_graph_tokens_equal_eager_static_tokens(rows: tuple[int, ...]) -> None:
    """bf16 on CUDA (``torch._grouped_mm`` experts): graphs captured per padded size replay the tokens of the same
    static step run eagerly."""
    model = moe_gpt(hidden=128, device="cuda").to(torch.bfloat16)
    batch = prompts(2, (5, 40, 1, 17, 33, 2))
    arrive = [0, 0, 1, 3, 3, 8]
    kwargs: dict[str, Any] = dict(block_size=16, num_blocks=64, max_num_batched_tokens=64, graph_batch_sizes=rows)
    graphs = LLMEngine(model, cuda_graphs=True, **kwargs)
    eager = LLMEngine(model, static_decode=True, **kwargs)
    assert run(graphs, batch, arrive) == run(eager, batch, arrive)
    assert graphs.decoder is not None and graphs.decoder.num_replays >= 5
    assert eager.decoder is not None and eager.decoder.num_replays == 0 and eager.decoder.num_static >= 5
