"""The engine's host-side fast paths (issue 20: host time per decode step) against the plain computations.

* ``DecodeBuffers.fill`` rewrites only the table rows that changed: after every step of a random run (tables
  growing, rows changing sequence, batches shrinking and growing, padding) its device buffers equal ones built
  from scratch;
* the static decoder, over a run with requests arriving and finishing at different steps, gives the tokens of
  the eager engine and of the full forward (its inputs rebuilt each step would give the same logits);
* the greedy sampler without logprobs (one ``argmax``) picks the tokens of the full pipeline, ties included;
* ``cache_prefix``'s early return names exactly the blocks the full hash chain names;
* ``no_grad`` turns gradients off whether they were on or off, and leaves the mode as it found it.
"""

from __future__ import annotations

import random

import pytest
import torch
from mcore_inference.block_pool import chain_hashes
from mcore_inference.engine import LLMEngine
from mcore_inference.grad import no_grad
from mcore_inference.sampling import Sampler, SamplingParams, SamplingState
from mcore_inference.static_decode import DecodeBuffers
from toy_model import ToyLM, greedy_reference

from mcore.errors import UserError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _reference_buffers(
    max_rows: int,
    max_blocks: int,
    rows: int,
    tokens: list[int],
    tables: list[list[int]],
    lens: list[int],
    slots: list[int],
    scratch: int,
    bs: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's inputs built from nothing: ints (3, rows), lens (rows,), table (rows, M)."""
    real = len(tokens)
    ints = torch.zeros(3, rows, dtype=torch.int64)
    ints[0, :real] = torch.tensor(tokens, dtype=torch.int64)
    ints[1, :real] = torch.tensor(lens, dtype=torch.int64) - 1
    ints[2, :real] = torch.tensor(slots, dtype=torch.int64)
    ints[2, real:] = scratch * bs
    lengths = torch.ones(rows, dtype=torch.int32)
    lengths[:real] = torch.tensor(lens, dtype=torch.int32)
    table = torch.full((rows, max_blocks), -1, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    table[real:, 0] = scratch
    return ints, lengths, table


@pytest.mark.parametrize("device", DEVICES)
def test_incremental_fill_equals_a_fresh_fill_over_a_random_run(device: str) -> None:
    rng = random.Random(0)
    max_rows, max_blocks, bs, scratch = 8, 6, 4, 99
    buffers = DecodeBuffers(max_rows, max_blocks, torch.device(device))  # CUDA: pinned, asynchronous copies
    live: dict[int, list[int]] = {}  # sequence -> its table (grown in place, as the cache does)
    next_id, next_block = 0, 0
    for _ in range(200):
        for seq in list(live):  # some finish; a table that reached the buffers' width finishes too
            if rng.random() < 0.15 or len(live[seq]) == max_blocks:
                del live[seq]
        while len(live) < max_rows and rng.random() < 0.5:  # some arrive
            live[next_id] = [next_block]
            next_id, next_block = next_id + 1, next_block + 1
        for table in live.values():  # some cross into a new block
            if rng.random() < 0.3:
                table.append(next_block)
                next_block += 1
        order = list(live)
        rng.shuffle(order)  # rows need not keep their sequence
        order = order[: rng.randint(0, len(order))]
        rows = rng.choice([r for r in (1, 2, 4, 8) if r >= len(order)])
        tables = [live[s] for s in order]
        lens = [len(t) * bs - rng.randrange(bs) for t in tables]
        tokens = [rng.randrange(50) for _ in order]
        slots = [t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lens)]
        buffers.fill(rows, tokens, tables, lens, slots, scratch, bs)
        want_ints, want_lens, want_table = _reference_buffers(
            max_rows, max_blocks, rows, tokens, tables, lens, slots, scratch, bs
        )
        step = buffers.step(rows)
        assert torch.equal(torch.stack([step.tokens, step.positions, step.slots]).cpu(), want_ints)
        assert torch.equal(step.seq_lens.cpu(), want_lens)
        assert torch.equal(step.block_table.cpu(), want_table)
    with pytest.raises(UserError, match="holds 7 blocks, the buffers 6"):
        buffers.fill(1, [0], [list(range(7))], [25], [0], scratch, bs)


def test_static_decode_with_arrivals_and_finishes_gives_the_eager_tokens() -> None:
    model = ToyLM()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 50, (n,), generator=gen).tolist() for n in (5, 17, 2, 9, 12, 3, 7)]
    lengths = [9, 4, 12, 6, 3, 10, 5]  # requests finish at different steps
    arrive = [0, 0, 1, 3, 4, 8, 9]
    outputs: dict[bool, dict[int, list[int]]] = {}
    for static in (False, True):
        engine = LLMEngine(
            model,
            block_size=4,
            num_blocks=64,
            max_num_batched_tokens=32,
            static_decode=static,
            graph_batch_sizes=(2, 4, 8) if static else None,
        )
        done: dict[int, list[int]] = {}
        params = [SamplingParams(max_tokens=m, temperature=0.0) for m in lengths]
        ids: dict[int, int] = {}
        step = 0
        while len(done) < len(prompts):
            for i, when in enumerate(arrive):
                if when == step:
                    ids[engine.add_request(prompts[i], params[i])] = i
            for out in engine.step():
                if out.finished:
                    done[ids[out.request_id]] = out.token_ids
            step += 1
            assert step < 500
        assert engine.cache.all_free()
        if static:
            assert engine.decoder is not None and engine.decoder.num_static > 10, "the static path must serve steps"
        outputs[static] = done
    assert outputs[True] == outputs[False]
    for i, prompt in enumerate(prompts):
        assert outputs[True][i] == greedy_reference(model, prompt, lengths[i]), f"prompt {i}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_sampling_without_logprobs_is_the_full_pipelines_argmax(dtype: torch.dtype, device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(16, 300, generator=gen) * 4).to(device=device, dtype=dtype)
    logits[3, [7, 100]] = logits[3].max() + 1  # a tie: the first index wins on both paths
    greedy = [SamplingState(SamplingParams(temperature=0.0), [1, 2]) for _ in range(16)]
    fast = Sampler(seed=0).sample(logits, greedy, logprobs=False)
    full = Sampler(seed=0).sample(logits, greedy)
    assert fast.logprob is None and fast.top_logprobs is None and full.logprob is not None
    assert torch.equal(fast.token_ids, full.token_ids)
    assert fast.token_ids[3].item() == 7
    # mixed and penalised rows take the full pipeline: the same tokens with or without logprobs
    mixed = [
        SamplingState(SamplingParams(temperature=0.0 if i % 2 else 0.8, repetition_penalty=1.0 + (i % 3) / 4), [i])
        for i in range(16)
    ]
    without = Sampler(seed=1).sample(logits, mixed, logprobs=False)
    with_ = Sampler(seed=1).sample(logits, mixed)
    assert without.logprob is None and torch.equal(without.token_ids, with_.token_ids)


def test_cache_prefix_names_the_blocks_of_the_full_hash_chain_every_step() -> None:
    model = ToyLM()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 50, (n,), generator=gen).tolist() for n in (6, 11, 16)]
    engine = LLMEngine(model, block_size=4, num_blocks=64, static_decode=True, graph_batch_sizes=(4,))
    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(max_tokens=9, temperature=0.0))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        for seq in engine.scheduler.running:
            length = engine.cache.length(seq.seq_id)
            want = chain_hashes(seq.token_ids[:length], 4)
            assert engine.cache._hashes[seq.seq_id] == want, f"sequence {seq.seq_id} at length {length}"
        steps += 1
    assert steps > 8


def test_no_grad_turns_gradients_off_and_restores_the_mode() -> None:
    @no_grad
    def mode(x: torch.Tensor) -> tuple[bool, bool]:
        return torch.is_grad_enabled(), (x * 2).requires_grad

    x = torch.ones(2, requires_grad=True)
    assert mode(x) == (False, False) and torch.is_grad_enabled()
    with torch.no_grad():
        assert mode(x) == (False, False) and not torch.is_grad_enabled()
