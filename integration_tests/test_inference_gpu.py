"""The inference engine's static-shape decode and CUDA graphs (mcore-inference) serving mcore's ``gpt``
(mcore-models).

On the CPU (fp32): the static decode path, padded to a few batch sizes, gives the tokens of the full-sequence
forward for GQA, a sliding window and MLA (the real blocks have no host work in a decode step). On the GPU
(``-m gpu``, bf16): the CUDA-graph path gives exactly the tokens of the same static step run eagerly at the same
padded batch size, and ``LLM`` captures graphs by default.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from engine_helpers import greedy_reference, run_arrivals
from mcore_inference.engine import LLMEngine
from mcore_inference.llm import LLM
from mcore_inference.sampling import SamplingParams

from mcore_models.gpt import GPT, GPTConfig

VOCAB = 64
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def config(kind: str, hidden: int = 32) -> GPTConfig:
    base: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "num_layers": 2,
        "max_position_embeddings": 256,
        "swiglu": {"ffn_hidden_size": 3 * hidden // 2},
    }
    if kind == "gqa":
        return GPTConfig.from_values({**base, "attention": {"num_heads": 4, "num_kv_heads": 2, "qk_norm": True}})
    if kind == "window":
        return GPTConfig.from_values({**base, "attention": {"num_heads": 4, "num_kv_heads": 1, "sliding_window": 5}})
    assert kind == "mla"
    mla = {"num_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4}
    return GPTConfig.from_values({**base, "mixer": "mla", "mla": {**mla, "v_head_dim": 6}})


def reference(model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    return greedy_reference(model, prompt, max_tokens)


def run(engine: LLMEngine, prompts: list[list[int]], arrive: list[int]) -> list[list[int]]:
    return run_arrivals(engine, prompts, arrive, GREEDY)


def prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("kind", ["gqa", "window", "mla"])
def test_static_decode_greedy_equals_full_forward_argmax(kind: str) -> None:
    model = GPT.build(config(kind), seed=7, device="cpu").eval()
    batch = prompts(1, (7, 19, 1, 12))
    want = [reference(model, p, GREEDY.max_tokens) for p in batch]
    engine = LLMEngine(
        model, block_size=4, num_blocks=48, max_num_batched_tokens=9, static_decode=True, graph_batch_sizes=(1, 2, 4)
    )
    assert run(engine, batch, [0, 0, 1, 3]) == want
    assert engine.decoder is not None and engine.decoder.num_static >= 5


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["gqa", "mla"])
@pytest.mark.parametrize("rows", [(1, 2, 4, 8), (8,)])
def test_cuda_graph_tokens_equal_eager_static_tokens(kind: str, rows: tuple[int, ...]) -> None:
    model = GPT.build(config(kind, hidden=128), seed=7, device="cuda").to(torch.bfloat16).eval()
    batch = prompts(2, (5, 40, 1, 17, 33, 2))
    arrive = [0, 0, 1, 3, 3, 8]
    kwargs: dict[str, Any] = dict(block_size=16, num_blocks=64, max_num_batched_tokens=64, graph_batch_sizes=rows)
    graphs = LLMEngine(model, cuda_graphs=True, **kwargs)
    eager = LLMEngine(model, static_decode=True, **kwargs)
    assert run(graphs, batch, arrive) == run(eager, batch, arrive)
    assert graphs.decoder is not None and graphs.decoder.num_replays >= 5
    assert eager.decoder is not None and eager.decoder.num_replays == 0 and eager.decoder.num_static >= 5


@pytest.mark.gpu
@needs_cuda
def test_llm_captures_graphs_by_default_on_cuda() -> None:
    model = GPT.build(config("gqa", hidden=128), seed=7, device="cuda").eval()
    llm = LLM(model, dtype="bfloat16", num_blocks=64, max_num_seqs=4, max_model_len=128)
    assert llm.engine.decoder is not None and llm.engine.decoder.cuda_graphs
    assert sorted(llm.engine.decoder.graphs) == [1, 2, 4]
    out = llm.generate(prompts(3, (4, 9, 30)), GREEDY)
    off = LLM(model, dtype="bfloat16", num_blocks=64, max_num_seqs=4, max_model_len=128, cuda_graphs=False)
    assert off.engine.decoder is None
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in out)
    assert llm.engine.decoder.num_replays > 0


@pytest.mark.parametrize("kind", ["gqa", "window", "mla"])
def test_static_decode_call_traces_as_one_graph(kind: str) -> None:
    """What CUDA graphs need, checked on the CPU: the static step's model call has no host sync and no
    data-dependent shape, so dynamo traces it whole (a ``.item()``, ``.tolist()`` or a shape read from data
    would break the graph)."""
    model = GPT.build(config(kind), seed=7, device="cpu").eval()
    engine = LLMEngine(model, block_size=4, num_blocks=32, static_decode=True, graph_batch_sizes=(2,))
    decoder = engine.decoder
    assert decoder is not None
    step = decoder.buffers.step(2)
    engine.cache.begin_static_decode(step)  # no step scheduled: padding rows only
    with torch.no_grad():
        explained = torch._dynamo.explain(decoder.forward)(step)
    engine.cache.end_static_decode()
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
