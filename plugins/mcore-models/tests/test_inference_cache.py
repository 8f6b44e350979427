"""The ``gpt`` model under an inference cache: prefill, chunked prefill and decode through ``ctx.kv_cache``.

Every step brings only each sequence's new tokens (one packed row, ``cu_seqlens`` over them), as the engine
does; the cache is mcore_testing's ``ReferenceKVCache`` (blocks of 4 tokens, so sequences span several and
sliding windows free some) and the attention the models plugin's default ``paged`` backend. Each step's logits
must equal the full-sequence forward's at the same positions (fp32), for GQA with QK-norm and RoPE, a sliding
window and MLA (absorbed form under the cache).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from mcore.errors import UserError
from mcore.protocols.block import LOGIT_ROWS, AttentionCacheSpec, BlockContext
from mcore_models.attention_backends.sdpa import SDPABackend
from mcore_models.blocks.mla import MLA
from mcore_models.gpt import GPT, GPTConfig
from mcore_testing.numerics import assert_rel_close, seeded_randn
from mcore_testing.reference_kv import ReferenceKVCache
from mcore_testing.reference_paged import ReferencePagedBackend

VOCAB = 64
TOL = 1e-5


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is as fast, and threads spinning on a shared CPU are much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(kind: str) -> GPTConfig:
    base: dict[str, Any] = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "swiglu": {"ffn_hidden_size": 48}}
    if kind == "gqa":
        return GPTConfig.from_values({**base, "attention": {"num_heads": 4, "num_kv_heads": 2, "qk_norm": True}})
    if kind == "window":
        return GPTConfig.from_values({**base, "attention": {"num_heads": 4, "num_kv_heads": 1, "sliding_window": 5}})
    assert kind == "mla"
    mla = {"num_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4}
    return GPTConfig.from_values({**base, "mixer": "mla", "mla": {**mla, "v_head_dim": 6}, "mtp_num_layers": 1})


KINDS = ["gqa", "window", "mla"]


def build(kind: str) -> GPT:
    return GPT.build(config(kind), seed=7, device="cpu").eval()


class Engine:
    """Plays the engine: schedules each call's sequences, packs their new tokens into one row, asks for logits."""

    def __init__(self, model: GPT, *, attention: Any = None, positions: bool = True) -> None:
        self.model, self.attention, self.positions = model, attention, positions
        self.cache = ReferenceKVCache(model.cache_specs(), block_size=4, num_blocks=48)
        self.lengths: dict[int, int] = {}

    @torch.no_grad()
    def step(self, chunks: dict[int, list[int]], *, all_rows: bool = False) -> torch.Tensor:
        """Logits of each sequence's last new token ``(S, V)`` (every new token's ``(N, V)`` with ``all_rows``)."""
        ids, counts = list(chunks), [len(c) for c in chunks.values()]
        self.cache.schedule(ids, counts)
        tokens = torch.tensor(list(itertools.chain(*chunks.values())))[None]  # (1, N)
        cu = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32)  # (S + 1,)
        positions = torch.cat(
            [torch.arange(self.lengths.get(s, 0), self.lengths.get(s, 0) + c) for s, c in zip(ids, counts)]
        )
        for s, c in zip(ids, counts):
            self.lengths[s] = self.lengths.get(s, 0) + c
        rows = torch.arange(int(cu[-1])) if all_rows else cu[1:].long() - 1
        ctx = BlockContext(
            positions=positions[None] if self.positions else None,
            cu_seqlens=cu,
            max_seqlen=max(counts),
            kv_cache=self.cache,
            attention=self.attention,
            extra={LOGIT_ROWS: rows},
        )
        logits = self.model(tokens, ctx=ctx)  # (1, R, V)
        assert logits.shape == (1, rows.numel(), VOCAB)
        return logits[0]


@torch.no_grad()
def full_logits(model: GPT, sequence: list[int]) -> torch.Tensor:
    """``(L, V)`` logits of the whole sequence in one plain forward."""
    return model(torch.tensor(sequence)[None])[0]


def sequences(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("kind", KINDS)
def test_packed_prefill_then_batched_decode_equals_full_forward(kind: str) -> None:
    model = build(kind)
    prompts, steps = [5, 3, 7], 6
    seqs = sequences([p + steps for p in prompts])
    full = [full_logits(model, s) for s in seqs]
    engine = Engine(model)
    logits = engine.step({i: s[:p] for i, (s, p) in enumerate(zip(seqs, prompts))})  # one packed prefill
    for i, p in enumerate(prompts):
        assert_rel_close(logits[i], full[i][p - 1], TOL, name=f"prefill logits of sequence {i}")
    for t in range(steps):  # S = 3 sequences, N = 3 tokens per call
        logits = engine.step({i: [s[p + t]] for i, (s, p) in enumerate(zip(seqs, prompts))})
        for i, p in enumerate(prompts):
            assert_rel_close(logits[i], full[i][p + t], TOL, name=f"decode step {t} of sequence {i}")


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_mixed_with_decode_equals_full_forward(kind: str) -> None:
    """A prompt over 3 calls, each beside another sequence's decode token; positions left to the model."""
    model = build(kind)
    seqs = sequences([9, 13], seed=1)
    full = [full_logits(model, s) for s in seqs]
    engine = Engine(model, positions=False)
    assert_rel_close(engine.step({0: seqs[0][:6]}), full[0][5:6], TOL)
    chunks = [(0, 4), (4, 7), (7, 10)]  # sequence 1's prompt of 10 tokens: 4 + 3 + 3
    for step, (start, stop) in enumerate(chunks):
        logits = engine.step({1: seqs[1][start:stop], 0: [seqs[0][6 + step]]}, all_rows=True)  # (N, V)
        assert_rel_close(logits[:-1], full[1][start:stop], TOL, name=f"chunk {step} of sequence 1")
        assert_rel_close(logits[-1], full[0][6 + step], TOL, name=f"decode of sequence 0 beside chunk {step}")
    for t in range(3):
        logits = engine.step({1: [seqs[1][10 + t]]})
        assert_rel_close(logits[0], full[1][10 + t], TOL, name=f"decode step {t} after the chunks")


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_decode_equals_argmax_of_full_forward(kind: str) -> None:
    model = build(kind)
    seqs = sequences([4, 6, 2], seed=2)
    engine = Engine(model)
    logits = engine.step(dict(enumerate(seqs)))
    for _ in range(20):
        chosen = logits.argmax(-1).tolist()
        for s, token in zip(seqs, chosen):
            s.append(token)
        logits = engine.step({i: [token] for i, token in enumerate(chosen)})
    for prompt, s in zip([4, 6, 2], seqs):
        assert len(s) == prompt + 20
        assert full_logits(model, s)[prompt - 1 : -1].argmax(-1).tolist() == s[prompt:]


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_context_backend_is_used_under_a_cache_and_training_backends_never(kind: str) -> None:
    model = build(kind)
    seq = sequences([8], seed=3)[0]
    full = full_logits(model, seq)
    oracle = ReferencePagedBackend()
    engine = Engine(model, attention=oracle)
    assert_rel_close(engine.step({0: seq[:6]}), full[5:6], TOL)
    assert_rel_close(engine.step({0: seq[6:7]}), full[6:7], TOL)
    assert oracle.calls == 2 * len(model.layers)  # every layer, every step: the engine's backend wins
    # a training backend named by the context declines under a cache: the paged default runs instead
    engine = Engine(model, attention=SDPABackend())
    engine.step({0: seq[:6]})
    assert_rel_close(engine.step({0: seq[6:7]}), full[6:7], TOL)


def test_training_backend_called_under_a_cache_refuses() -> None:
    q = torch.zeros(1, 2, 4, 8)
    cache = ReferenceKVCache({0: AttentionCacheSpec(kv_heads=4, head_dim=8, value_dim=8, dtype=torch.float32)})
    with pytest.raises(UserError, match="inference cache"):
        SDPABackend()(q, q, q, ctx=BlockContext(kv_cache=cache), scale=1.0, window=None)


def test_cache_specs_of_each_layer() -> None:
    gqa = build("gqa").cache_specs()
    assert gqa == {
        i: AttentionCacheSpec(kv_heads=2, head_dim=8, value_dim=8, dtype=torch.float32, window=None) for i in (0, 1)
    }
    window = AttentionCacheSpec(kv_heads=1, head_dim=8, value_dim=8, dtype=torch.float32, window=5)
    assert build("window").cache_specs() == {0: window, 1: window}
    latent = AttentionCacheSpec(kv_heads=1, head_dim=12 + 4, value_dim=None, dtype=torch.float32)
    assert build("mla").cache_specs() == {0: latent, 1: latent, 2: latent}  # the MTP depth: layer 2
    bf16 = AttentionCacheSpec(kv_heads=2, head_dim=8, value_dim=8, dtype=torch.bfloat16)
    assert build("gqa").to(torch.bfloat16).cache_specs()[0] == bf16


def test_logit_rows_without_a_cache() -> None:
    model = build("gqa")
    tokens = torch.tensor(sequences([7], seed=4))
    rows = torch.tensor([6, 2, 3])
    with torch.no_grad():
        picked = model(tokens, ctx=BlockContext(extra={LOGIT_ROWS: rows}))
        assert_rel_close(picked, model(tokens)[:, rows], TOL)
    assert picked.shape == (1, 3, VOCAB)


def test_logit_rows_on_the_last_pipeline_stage() -> None:
    model = build("gqa")
    tokens = torch.tensor(sequences([7], seed=5))
    first, last = (
        model.pipeline_stage(range(0, 1), first=True, last=False),
        model.pipeline_stage(range(1, 2), first=False, last=True),
    )
    rows = torch.tensor([1, 6])
    ctx = BlockContext(extra={LOGIT_ROWS: rows})
    with torch.no_grad():
        picked = last(first(tokens, tokens=tokens, ctx=ctx), tokens=tokens, ctx=ctx)
        assert_rel_close(picked, model(tokens)[:, rows], TOL)
    assert picked.shape == (1, 2, VOCAB)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_mla_block_absorbed_under_a_cache_equals_the_plain_form(q_lora_rank: int | None) -> None:
    """The block alone (no positions given: the cache's lengths give them), yarn's mscale in the softmax scale."""
    cfg = MLA.Config(
        num_heads=4,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        rope_scaling="yarn",
        rope_factor=4.0,
        rope_mscale=1.0,
        rope_mscale_all_dim=1.0,
    )
    block = MLA(cfg, hidden_size=32)
    x = seeded_randn(1, 9, 32, seed=4)
    with torch.no_grad():
        plain = block(x, BlockContext())
        cache = ReferenceKVCache({0: block.cache_spec()}, block_size=4)
        outs = []
        for start, stop in [(0, 5), (5, 6), (6, 9)]:
            cache.schedule([0], [stop - start])
            outs.append(block(x[:, start:stop], BlockContext(kv_cache=cache)))
    assert_rel_close(torch.cat(outs, dim=1), plain, TOL)
