"""``LLMEngine(speculative_tokens=k)`` on a toy model with MTP depths (no models plugin).

The toy follows the ``MTPModel`` contract the way mcore's ``gpt`` does: depth ``d`` at position ``i`` combines the
previous depth's output (the main stack's for ``d = 1``) with the embedding of token ``i + d``, runs a layer over
its own cache and predicts token ``i + d + 1`` with the shared head. Its "good" form drafts well but not perfectly
(weak layers, no position embedding, depths that pass the next token's embedding through), so drafts are both
accepted and rejected. Checked: the engine's draft distributions against the full-sequence forward of the depths,
greedy output against the plain engine and the full forward (ragged prompts, chunked prefill, prefix hits,
preemption), and every main and draft block free at the end.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from mcore_inference.engine import LLMEngine, model_cache_specs
from mcore_inference.sampling import SamplingParams
from toy_model import ToyLayer, ToyLM, greedy_reference

from mcore.protocols import LOGIT_ROWS, BlockContext

VOCAB, HIDDEN = 40, 32


class ToyMTPLM(ToyLM):
    """``ToyLM`` with ``depths`` MTP modules (``MTPModel``)."""

    def __init__(self, depths: int, *, good: bool) -> None:
        super().__init__(vocab=VOCAB, hidden=HIDDEN, layers=2)
        gen = torch.Generator().manual_seed(1)
        self.mtp_proj = torch.nn.ModuleList(torch.nn.Linear(2 * HIDDEN, HIDDEN, bias=False) for _ in range(depths))
        self.mtp_layers = torch.nn.ModuleList(ToyLayer(HIDDEN, None) for _ in range(depths))
        with torch.no_grad():
            for p in [*self.mtp_proj.parameters(), *self.mtp_layers.parameters()]:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            if good:
                self.pos.weight.zero_()
                self.embed.weight.mul_(4)
                layers: list[Any] = [*self.layers, *self.mtp_layers]
                for layer in layers:
                    for p in [*layer.attention.out.parameters(), *layer.mlp[2].parameters()]:
                        p.mul_(0.01)
                projections: list[Any] = list(self.mtp_proj)
                for proj in projections:
                    proj.weight.zero_()
                    proj.weight[:, :HIDDEN] = torch.eye(HIDDEN)

    def cache_specs(self) -> dict[int, object]:
        layers: list[Any] = [*self.layers, *self.mtp_layers]
        return {i: layer.attention.cache_spec() for i, layer in enumerate(layers)}

    def mtp_layer_indices(self) -> list[int]:
        return [len(self.layers) + d for d in range(len(self.mtp_layers))]

    def forward_with_hidden(
        self, tokens: torch.Tensor, *, ctx: BlockContext | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = ctx if ctx is not None else BlockContext()
        positions = ctx.positions if ctx.positions is not None else torch.arange(tokens.shape[1])[None]
        x = self.embed(tokens) + self.pos(positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx.for_layer(i))
        rows = x.flatten(0, 1)[ctx.extra[LOGIT_ROWS]][None] if LOGIT_ROWS in ctx.extra else x
        return self.head(rows), x

    def mtp_forward(
        self, depth: int, hidden: torch.Tensor, next_tokens: torch.Tensor, *, ctx: BlockContext | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = ctx if ctx is not None else BlockContext()
        x = self.mtp_proj[depth - 1](torch.cat([self.embed(next_tokens), hidden], dim=-1))
        x = self.mtp_layers[depth - 1](x, ctx.for_layer(len(self.layers) + depth - 1))
        rows = x.flatten(0, 1)[ctx.extra[LOGIT_ROWS]][None] if LOGIT_ROWS in ctx.extra else x
        return x, self.head(rows)


def _prompts(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _run(
    engine: LLMEngine, prompts: list[list[int]], arrive: list[int], params: SamplingParams | list[SamplingParams]
) -> list[list[int]]:
    """Each prompt added at its ``arrive`` step (with its own ``params`` when a list), run to the end: the token
    ids of each, in prompt order; every main and draft cache block free afterwards."""
    each = params if isinstance(params, list) else [params] * len(prompts)
    ids: dict[int, int] = {}
    done: dict[int, list[int]] = {}
    step = 0
    while len(done) < len(prompts):
        for i, when in enumerate(arrive):
            if when == step:
                ids[engine.add_request(prompts[i], each[i])] = i
        done.update({ids[o.request_id]: o.token_ids for o in engine.step() if o.finished})
        step += 1
        assert step < 400
    assert engine.cache.all_free()
    assert engine.speculator is None or all(c.all_free() for c in engine.speculator.caches)
    return [done[i] for i in range(len(prompts))]


def test_mtp_layers_stay_out_of_the_main_cache() -> None:
    model = ToyMTPLM(2, good=True).eval()
    assert sorted(model_cache_specs(model)) == [0, 1, 2, 3]
    engine = LLMEngine(model, block_size=4, num_blocks=16, speculative_tokens=3)
    assert sorted(engine.cache.layers) == [0, 1]
    assert engine.speculator is not None
    assert [sorted(c.layers) for c in engine.speculator.caches] == [[2], [3], [3]]  # depth 3 reuses module 2


def test_a_byte_budget_is_split_between_the_main_and_the_draft_caches() -> None:
    model = ToyMTPLM(1, good=True).eval()
    per_layer = 4 * 4 * 2 * 2 * (HIDDEN // 4)  # bytes of one block of one layer: bs 4, fp32, kv 2 heads, k and v
    budget = 100 * per_layer
    plain = LLMEngine(model, block_size=4, memory_bytes=budget)
    spec = LLMEngine(model, block_size=4, memory_bytes=budget, speculative_tokens=2)
    assert spec.speculator is not None
    assert plain.cache.num_blocks == 50  # 2 main layers
    assert spec.cache.num_blocks == 25 and all(c.num_blocks == 25 for c in spec.speculator.caches)  # 2 + 2 layers


def draft_errors(engine: LLMEngine, request_ids: Any, model: Any, depths: int, temperature: float) -> list[float]:
    """For every running request of ``request_ids`` with drafts: the relative error of each draft position's
    distribution against the full-sequence forward of the MTP depths (``model``: the same weights, any dtype)."""
    assert engine.speculator is not None
    errors = []
    for request_id in request_ids:
        drafts, q = engine.speculator.drafts(request_id)
        request = engine._requests.get(request_id)
        if request is None or not drafts:
            continue
        assert q is not None
        known = list(request.seq.token_ids)
        ext = torch.tensor([known + drafts])
        with torch.no_grad():
            _, hidden = model.forward_with_hidden(ext[:, : len(known)])
            hidden = hidden[:, : len(known) - 1]  # positions 0 .. T-2
            for s in range(1, len(drafts) + 1):
                hidden, logits = model.mtp_forward(min(s, depths), hidden, ext[:, s : s + len(known) - 1])
                want = torch.softmax(logits[0, -1].double() / temperature, dim=-1)
                errors.append(float((q[s - 1].double() - want).norm() / want.norm()))
    return errors


@pytest.mark.parametrize(("depths", "k"), [(1, 2), (2, 3)])
def test_drafts_are_the_full_forward_of_the_depths(depths: int, k: int) -> None:
    model = ToyMTPLM(depths, good=True).eval()
    engine = LLMEngine(model, block_size=4, num_blocks=64, max_num_batched_tokens=8, speculative_tokens=k)
    assert engine.speculator is not None
    params = SamplingParams(max_tokens=16, temperature=0.7, seed=3)
    ids = [engine.add_request(p, params) for p in _prompts((5, 13, 1), seed=2)]
    checked = 0
    while engine.has_unfinished():
        engine.step()
        errors = draft_errors(engine, ids, model, depths, params.temperature)
        assert all(err < 1e-5 for err in errors), errors
        checked += len(errors)
    assert checked >= 10 * k


@pytest.mark.parametrize(("depths", "k"), [(1, 1), (1, 3), (2, 2)])
def test_greedy_output_is_the_plain_engines(depths: int, k: int) -> None:
    model = ToyMTPLM(depths, good=True).eval()
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    prompts = _prompts((6, 17, 1, 9), seed=4)
    prompts.append([*prompts[1][:12], 1, 2])  # a prefix-cache hit of 3 blocks
    arrive = [0, 0, 1, 2, 5]
    want = [greedy_reference(model, p, greedy.max_tokens) for p in prompts]
    plain = LLMEngine(model, block_size=4, num_blocks=64, max_num_batched_tokens=8)
    assert _run(plain, prompts, arrive, greedy) == want
    engine = LLMEngine(model, block_size=4, num_blocks=64, max_num_batched_tokens=8, speculative_tokens=k)
    assert _run(engine, prompts, arrive, greedy) == want
    stats = engine.spec_stats()
    assert stats is not None and 0 < stats.accepted[0] < stats.proposed[0]
    assert engine.num_steps < plain.num_steps and engine.cache.prefix_hits > 0
    tight = LLMEngine(model, block_size=4, num_blocks=10, max_num_batched_tokens=64, speculative_tokens=k)
    assert _run(tight, prompts, [0] * len(prompts), greedy) == want
    assert tight.scheduler.num_preemptions > 0


def test_a_random_drafter_changes_nothing_and_penalised_requests_do_not_draft() -> None:
    model = ToyMTPLM(1, good=False).eval()
    prompts = _prompts((4, 11), seed=7)
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    engine = LLMEngine(model, block_size=4, num_blocks=32, speculative_tokens=2)
    assert _run(engine, prompts, [0, 1], greedy) == [greedy_reference(model, p, 8) for p in prompts]
    before = engine.spec_stats()
    assert before is not None
    proposed = sum(before.proposed)
    penalised = SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.3)
    plain = LLMEngine(model, block_size=4, num_blocks=32)
    assert _run(engine, prompts, [0, 0], penalised) == _run(plain, prompts, [0, 0], penalised)
    assert sum(before.proposed) == proposed
