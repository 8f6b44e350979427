"""The inference engine (mcore-inference) serving hybrid ``gpt`` models on the CPU, fp32: mcore-ssm's ``gdn`` and
``mamba2`` layers beside attention and an MLP-only layer, and a Nemotron-H-style stack (mixer-only ``mamba2``,
NoPE attention and squared-ReLU MLP layers).

Greedy output of the engine equals token-by-token argmax of the model's full-sequence forward for ragged prompts
arriving at different steps, chunked to a small token budget (a recurrent layer continues its state over a prompt's
chunks), decoded together, and preempted (a preempted sequence's state slots go back and its prompt is recomputed
from zeros); every block and every state slot is free after. Prefix caching with recurrent-state snapshots is tested
in ``test_hybrid_prefix_cache.py``; here, with no snapshots (``state_snapshots=0``) it is off: the same prompt sent
twice is computed twice, with the same tokens, and counts no hits.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from mcore_inference.engine import LLMEngine
from test_inference_engine import GREEDY, VOCAB, reference, run

from mcore_models.gpt import GPT, GPTConfig
from mcore_testing.hosts import isolated_host

COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "mamba2": {"d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 4},
    "attention": {"num_heads": 4, "num_kv_heads": 2},
}
MODELS: dict[str, dict[str, Any]] = {
    "gdn-mamba2-attention": {
        "num_layers": 4,
        "layers": ["mamba2/none", "gdn/swiglu", "attention/swiglu", "swiglu/none"],
        "gdn": {"num_qk_heads": 2, "num_v_heads": 4, "head_k_dim": 8, "head_v_dim": 8, "chunk_size": 4},
        "swiglu": {"ffn_hidden_size": 48},
    },
    "nemotron-h": {
        "num_layers": 5,
        "layers": ["mamba2/none", "gelu-mlp/none", "attention/none", "gelu-mlp/none", "mamba2/none"],
        "attention": {"num_heads": 4, "num_kv_heads": 2, "no_rope": True},
        "gelu-mlp": {"ffn_hidden_size": 48, "activation": "relu2"},
    },
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def hybrid_model(name: str) -> GPT:
    """The tiny hybrid ``gpt`` ``MODELS[name]`` (seed 7, CPU, fp32, eval mode)."""
    host = isolated_host("mcore_models.plugin", "mcore_ssm.plugin")
    lookup = lambda block: host.load("block", block)  # noqa: E731
    values = {**COMMON, **MODELS[name]}
    return GPT.build(GPTConfig.from_values(values), seed=7, device="cpu", block_lookup=lookup).eval()


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> GPT:
    return hybrid_model(request.param)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (7, 19, 1, 12)]


def test_hybrid_engine_greedy_equals_full_forward_argmax(model: GPT, prompts: list[list[int]]) -> None:
    want = [reference(model, p, GREEDY.max_tokens) for p in prompts]
    engine = LLMEngine(model, block_size=4, num_blocks=48, max_num_batched_tokens=9)  # chunked prefill, ragged
    kinds = {type(layer).__name__ for layer in engine.cache.layers.values()}
    assert kinds == {"_AttentionLayer", "_RecurrentLayer"}, kinds
    assert run(engine, prompts, [0, 0, 1, 3]) == want
    tight = LLMEngine(model, block_size=4, num_blocks=7, max_num_batched_tokens=64)  # blocks run short: preempts
    assert run(tight, prompts, [0, 0, 0, 0]) == want
    assert tight.scheduler.num_preemptions > 0
    few_slots = LLMEngine(model, block_size=4, num_blocks=48, max_num_seqs=2)  # two state slots per layer
    assert run(few_slots, prompts, [0, 0, 0, 0]) == want


def test_hybrid_engine_without_state_snapshots_turns_prefix_caching_off(model: GPT, prompts: list[list[int]]) -> None:
    shared = prompts[1] + prompts[3]  # 31 tokens: 7 full blocks of 4 an attention-only model would reuse
    want = reference(model, shared, GREEDY.max_tokens)
    engine = LLMEngine(model, block_size=4, num_blocks=48, enable_prefix_caching=True, state_snapshots=0)
    assert not engine.cache.prefix_caching
    assert run(engine, [shared], [0]) == [want]
    assert run(engine, [shared, shared], [0, 2]) == [want, want]  # again, and while the first copy decodes
    assert engine.cache.prefix_hits == 0
