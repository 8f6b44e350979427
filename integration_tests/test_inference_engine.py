"""The inference engine (mcore-inference) serving mcore's ``gpt`` (mcore-models) on the CPU, fp32.

Greedy output of the engine, for ragged prompts arriving at different steps and chunked to a small token budget,
equals token-by-token argmax of the model's full-sequence forward: GQA with QK-norm, a sliding window, and MLA
(absorbed under the cache). Prefix-cache hits and preemption give the same tokens; every block is free after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import greedy_reference, run_arrivals
from mcore_inference.engine import LLMEngine
from mcore_inference.sampling import SamplingParams

from mcore_models.gpt import GPT, GPTConfig

VOCAB = 64
GREEDY = SamplingParams(max_tokens=5, temperature=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def config(kind: str) -> GPTConfig:
    base: dict[str, Any] = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "swiglu": {"ffn_hidden_size": 48}}
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


@pytest.mark.parametrize("kind", ["gqa", "window", "mla"])
def test_engine_greedy_equals_full_forward_argmax(kind: str) -> None:
    torch.manual_seed(0)
    model = GPT.build(config(kind), seed=7, device="cpu").eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (7, 19, 1, 12)]
    want = [reference(model, p, GREEDY.max_tokens) for p in prompts]
    engine = LLMEngine(model, block_size=4, num_blocks=48, max_num_batched_tokens=9)
    assert run(engine, prompts, [0, 0, 1, 3]) == want
    tight = LLMEngine(model, block_size=4, num_blocks=7, max_num_batched_tokens=64)  # preempts
    assert run(tight, prompts, [0, 0, 0, 0]) == want
    assert tight.scheduler.num_preemptions > 0 or kind == "window"  # a window frees blocks: it may fit
    if kind != "window":  # prefix caching is for full-attention models
        shared = LLMEngine(model, block_size=4, num_blocks=48)
        run(shared, [prompts[1]], [0])
        assert run(shared, [prompts[1][:13], prompts[1]], [0, 0]) == [reference(model, prompts[1][:13], 5), want[1]]
        assert shared.cache.prefix_hits >= 6


def test_llm_loads_a_hugging_face_directory(tmp_path: Path) -> None:
    from mcore_inference.llm import LLM

    from mcore_models.hf import export_hf

    base = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "swiglu": {"ffn_hidden_size": 48}}
    cfg = GPTConfig.from_values({**base, "attention": {"num_heads": 4, "num_kv_heads": 2}})  # llama maps it
    model = GPT.build(cfg, seed=3, device="cpu").eval()
    export_hf(model, cfg, tmp_path / "hf")
    llm = LLM(tmp_path / "hf", block_size=4, num_blocks=32, dtype="float32", device="cpu")
    prompt = list(range(3, 14))
    (out,) = llm.generate(prompt, GREEDY)
    assert out.token_ids == reference(model, prompt, GREEDY.max_tokens)
    assert llm.engine.cache.all_free()


def test_llm_loads_an_mcore_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mcore_inference.llm import LLM

    from mcore.config import resolve_config
    from mcore.data.shards import prepare
    from mcore.data.sources import iter_documents
    from mcore.plugins import load_plugins
    from mcore.train import run as train

    corpus = tmp_path / "corpus"
    prepare(iter_documents("stdlib"), corpus, tokenizer_spec="byte", workers=0, max_tokens=4_000)
    raw = {
        "model": {"name": "gpt", "preset": "tiny"},
        "train": {
            "steps": 1,
            "seq_len": 32,
            "global_batch_size": 2,
            "micro_batch_size": 2,
            "cpu_threads": 1,
            "out_dir": str(tmp_path / "run"),
        },
        "data": {"workers": 0, "source": str(corpus)},
        "log": {"progress": "none", "tensorboard": False, "plot": False},
        "checkpoint": {"async_save": False, "save_final": True},
    }
    host = load_plugins(env=False, unpackaged=False, strict=True)
    train(resolve_config(raw, host), host)
    llm = LLM(tmp_path / "run", block_size=8, num_blocks=16, device="cpu")
    (out,) = llm.generate("def f():", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert out.token_ids == reference(llm.model, out.prompt_token_ids, 4)
    assert out.text == llm.tokenizer.decode(out.token_ids)

    # `mcore generate` on the same run: the installed engine (kind "engine", mcore-inference's "paged") answers,
    # and its greedy text equals the core's plain re-run-the-window loop (`--engine none`)
    from mcore.cli import main

    args = ["generate", str(tmp_path / "run"), "--prompt", "def f():", "--max-new-tokens", "6"]
    from mcore_inference.generation import PagedEngine

    assert load_plugins().registry.names("engine") == ["paged"]
    assert PagedEngine.from_model(llm.model, tokenizer=llm.tokenizer, max_model_len=64) is not None  # it serves gpt
    capsys.readouterr()  # the training run's lines
    outputs = []
    for engine in ("auto", "paged", "none"):
        assert main([*args, "--engine", engine]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2] and outputs[0].startswith("def f():")
