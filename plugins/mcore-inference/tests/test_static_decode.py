"""The static-shape decode path (``static_decode.py``, what CUDA graphs capture) on the CPU, fp32: the same logits
and tokens as the eager step at padded batch sizes; padding rows write only the scratch block."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from mcore_inference.attention import paged_decode_torch
from mcore_inference.engine import LLMEngine, RequestOutput
from mcore_inference.sampling import SamplingParams
from toy_model import ToyLM, greedy_reference

from mcore.errors import UserError
from mcore.protocols import PagedKV

GREEDY = SamplingParams(max_tokens=7, temperature=0.0)


def _prompts(seed: int, lengths: list[int], vocab: int = 50) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _engine(model: ToyLM, **kwargs: object) -> LLMEngine:
    return LLMEngine(model, block_size=4, num_blocks=48, max_num_batched_tokens=64, **kwargs)  # type: ignore[arg-type]


def _prefill(engine: LLMEngine, prompts: list[list[int]]) -> None:
    for prompt in prompts:
        engine.add_request(prompt, GREEDY)
    engine.step()  # one prefill step of every prompt (eager), one token each


def test_static_step_gives_the_eager_logits_and_pages_at_padded_sizes() -> None:
    model = ToyLM()
    prompts = _prompts(0, [3, 8, 13])  # a block boundary crossed by the next token (8 -> 9) and not (3 -> 4)
    eager, static = _engine(model), _engine(model, static_decode=True, graph_batch_sizes=(2, 8))
    for engine in (eager, static):
        _prefill(engine, prompts)
    assert static.decoder is not None and static.cache.scratch_block == 48
    for _ in range(3):  # three decode steps in lockstep, padded from 3 to 8 rows
        seqs = list(eager.scheduler.running)
        ids, tokens = [s.seq_id for s in seqs], [s.token_ids[-1] for s in seqs]
        positions = [len(s.token_ids) - 1 for s in seqs]
        for engine in (eager, static):
            engine.cache.schedule(ids, [1] * len(ids))
        before = {i: layer.key_pages.clone() for i, layer in static.cache.layers.items()}  # type: ignore[union-attr]
        want = eager._forward(tokens, positions, [1] * len(ids))[0]
        got = static.decoder.run(tokens)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)  # logits of ~1e3: GEMM rounding by batch size
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        for index, layer in static.cache.layers.items():
            pages = layer.key_pages  # type: ignore[union-attr]
            eager_pages = eager.cache.layers[index].key_pages  # type: ignore[union-attr]
            torch.testing.assert_close(pages[:48], eager_pages, rtol=1e-5, atol=1e-4)  # same slots, GEMM rounding
            changed = (pages != before[index]).flatten(2).any(-1).nonzero().tolist()  # [block, offset] written
            real = {(b, o) for b, o in changed if b != 48}
            assert len(real) <= len(ids), f"padding rows wrote real pages: {sorted(real)}"
        for engine, row in ((eager, want), (static, got)):
            for seq, logit in zip(seqs if engine is eager else list(static.scheduler.running), row):
                seq.token_ids.append(int(logit.argmax()))
                seq.num_computed += 1
    assert static.decoder.num_static == 3 and static.decoder.num_replays == 0


def _run(engine: LLMEngine, prompts: list[list[int]], arrive: list[int]) -> dict[int, RequestOutput]:
    ids: dict[int, int] = {}
    done: dict[int, RequestOutput] = {}
    step = 0
    while len(done) < len(prompts):
        for i, when in enumerate(arrive):
            if when == step:
                ids[engine.add_request(prompts[i], GREEDY)] = i
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out
        step += 1
        assert step < 500
    assert engine.cache.all_free()
    return done


def test_static_decode_engine_matches_full_forward_with_ragged_arrivals() -> None:
    model = ToyLM()
    prompts = _prompts(1, [5, 17, 1, 9, 4, 11])
    engine = _engine(model, static_decode=True, graph_batch_sizes=(1, 2, 4), max_num_seqs=6)
    done = _run(engine, prompts, arrive=[0, 0, 2, 3, 3, 3])  # up to 6 decoding: larger than 4 runs eagerly
    for i, prompt in enumerate(prompts):
        assert done[i].token_ids == greedy_reference(model, prompt, GREEDY.max_tokens), f"prompt {i}"
    assert engine.decoder is not None and 3 <= engine.decoder.num_static < engine.num_steps


def test_static_decode_with_a_sliding_window_matches_full_forward() -> None:
    model = ToyLM(window=6, layers=1)  # ToyLM windows odd layers only: make its one layer windowed
    layer: Any = model.layers[0]
    layer.attention.window = 6
    prompts = _prompts(2, [10, 3])
    engine = _engine(model, static_decode=True, graph_batch_sizes=(4,))
    done = _run(engine, prompts, arrive=[0, 1])
    for i, prompt in enumerate(prompts):
        assert done[i].token_ids == greedy_reference(model, prompt, GREEDY.max_tokens), f"prompt {i}"
    assert engine.decoder is not None and engine.decoder.num_static >= 5


def test_decode_reference_matches_per_sequence_attention() -> None:
    gen = torch.Generator().manual_seed(3)
    bs, nkv, group, hd = 4, 2, 3, 8
    keys, values = torch.randn(10, bs, nkv, hd, generator=gen), torch.randn(10, bs, nkv, hd, generator=gen)
    table = torch.tensor([[3, 7, -1, -1], [9, 0, 5, 2], [4, -1, -1, -1]], dtype=torch.int32)
    lens = torch.tensor([6, 16, 1], dtype=torch.int32)
    q = torch.randn(3, nkv * group, hd, generator=gen)
    for window in (None, 5):
        out = paged_decode_torch(
            q,
            PagedKV(key_cache=keys, value_cache=values, block_table=table, seq_lens=lens, window=window),
            hd,
            0.3,
            window,
        )
        for i in range(3):
            n = int(lens[i])
            k = keys[table[i, : -(-n // bs)].long()].flatten(0, 1)[:n]  # (n, nkv, hd)
            v = values[table[i, : -(-n // bs)].long()].flatten(0, 1)[:n]
            lo = 0 if window is None else max(0, n - window)
            k, v = k[lo:].repeat_interleave(group, 1), v[lo:].repeat_interleave(group, 1)  # (n', nh, hd)
            weights = torch.softmax(torch.einsum("hd,khd->hk", q[i], k) * 0.3, dim=-1)
            torch.testing.assert_close(out[i], torch.einsum("hk,khd->hd", weights, v))


def test_bad_static_decode_settings_are_refused() -> None:
    with pytest.raises(UserError, match="CUDA"):
        _engine(ToyLM(), cuda_graphs=True)
    with pytest.raises(UserError, match="graph_batch_sizes"):
        _engine(ToyLM(), static_decode=True, graph_batch_sizes=(0, 4))
    with pytest.raises(UserError, match="one attention group"):
        _engine(ToyLM(window=6), static_decode=True)  # a full and a windowed group


def test_static_decode_with_prefix_hits_and_preemption_matches_full_forward() -> None:
    model = ToyLM()
    shared = _prompts(4, [12])[0]
    prompts = [[*shared, 1], [*shared, 2, 3], *_prompts(5, [6, 9])]
    want = [greedy_reference(model, p, GREEDY.max_tokens) for p in prompts]
    hits = _engine(model, static_decode=True, graph_batch_sizes=(1, 2, 4))
    done = _run(hits, prompts, arrive=[0, 2, 2, 3])
    assert all(done[i].token_ids == want[i] for i in range(4))
    assert hits.cache.prefix_hits > 0
    tight = LLMEngine(
        model, block_size=4, num_blocks=9, max_num_batched_tokens=64, static_decode=True, graph_batch_sizes=(4,)
    )
    done = _run(tight, prompts, arrive=[0, 0, 0, 0])
    assert all(done[i].token_ids == want[i] for i in range(4))
    assert tight.scheduler.num_preemptions > 0 and tight.decoder is not None and tight.decoder.num_static > 0


def test_llm_cuda_graph_setting_on_the_cpu() -> None:
    from mcore_inference.llm import LLM

    assert LLM(ToyLM(), num_blocks=64).engine.decoder is None  # default: graphs on CUDA only
    with pytest.raises(UserError, match="CUDA"):
        LLM(ToyLM(), num_blocks=64, cuda_graphs=True)


def test_buffers_hold_real_rows_then_padding_on_the_scratch_block() -> None:
    from mcore_inference.static_decode import DecodeBuffers, default_graph_sizes

    buffers = DecodeBuffers(max_rows=4, max_blocks=5, device=torch.device("cpu"))
    buffers.fill(4, [7, 8, 9], [[2, 3, 4], [0], [1, 5]], [40, 3, 17], [65, 2, 80], scratch=9, block_size=16)
    step = buffers.step(4)
    assert step.tokens.tolist() == [7, 8, 9, 0] and step.positions.tolist() == [39, 2, 16, 0]
    assert step.slots.tolist() == [65, 2, 80, 9 * 16] and step.seq_lens.tolist() == [40, 3, 17, 1]
    assert step.block_table.tolist() == [[2, 3, 4, -1, -1], [0, -1, -1, -1, -1], [1, 5, -1, -1, -1], [9] + [-1] * 4]
    buffers.fill(2, [5], [[6]], [1], [96], scratch=9, block_size=16)  # a narrower, smaller step after a wider one
    step = buffers.step(2)
    assert step.block_table.tolist() == [[6, -1, -1, -1, -1], [9, -1, -1, -1, -1]]
    assert step.tokens.tolist() == [5, 0] and step.slots.tolist() == [96, 144] and step.seq_lens.tolist() == [1, 1]
    assert step.cu_seqlens.tolist() == [0, 1, 2] and step.logit_rows.tolist() == [0, 1]
    with pytest.raises(UserError, match="blocks"):
        buffers.fill(1, [1], [[1] * 6], [90], [1], scratch=9, block_size=16)
    assert default_graph_sizes(20) == (1, 2, 4, 8, 16, 20) and default_graph_sizes(3) == (1, 2, 3)


def test_weight_addresses_refuse_a_replay_after_the_weights_moved() -> None:
    """A CUDA graph reads the weights where they were at capture: after ``model.to(dtype)`` (or anything assigning
    ``.data``) a replay would read freed memory, so the check before replays refuses in one line; it looks on the
    first replay and every ``every``-th after."""
    from mcore_inference.static_decode import WeightAddresses

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.register_buffer("table", torch.zeros(3))
    weights = WeightAddresses(model, every=4)
    for _ in range(9):
        weights.check()  # nothing moved
    model[0].bias.data = model[0].bias.data.clone()  # not sampled: the 10th call does not look, the 13th does
    for _ in range(3):
        weights.check()
    with pytest.raises(UserError, match=r"^CUDA graphs of this engine read the model's weights .* 1 tensors moved"):
        weights.check()
    model[1].bias.data = model[1].bias.data.clone()  # the last parameter: sampled, so the next call looks
    with pytest.raises(UserError, match="2 tensors moved"):
        weights.check()
    fresh = WeightAddresses(model)
    model.double()  # every parameter and buffer moves
    with pytest.raises(UserError, match="5 tensors moved since"):  # weight, bias, norm weight and bias, buffer
        fresh.check()
