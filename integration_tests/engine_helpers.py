"""What the inference-engine integration tests share: the greedy reference of a full-sequence model and a loop that
feeds an engine prompts arriving at given steps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from mcore_inference.engine import RequestOutput
from mcore_inference.sampling import SamplingParams


def greedy_reference(model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    """Token-by-token argmax of the full-sequence forward, on the model's device."""
    ids = list(prompt)
    device = next(model.parameters()).device
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids], device=device))[0, -1].argmax()))
    return ids[len(prompt) :]


def run_arrivals(
    engine: Any, prompts: list[list[int]], arrive: Sequence[int], params: SamplingParams, *, check_free: bool = True
) -> list[list[int]]:
    """Add prompt ``i`` before step ``arrive[i]``, step until every request finished; each prompt's output tokens.
    ``engine``: an ``LLMEngine`` (or what steps like one, e.g. a ``LockstepEngine`` leader). Every block and state
    slot must be free afterwards (``check_free``)."""
    ids: dict[int, int] = {}
    done: dict[int, RequestOutput] = {}
    step = 0
    while len(done) < len(prompts):
        for i, when in enumerate(arrive):
            if when == step:
                ids[engine.add_request(prompts[i], params)] = i
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out
        step += 1
        assert step < 300
    assert not check_free or engine.cache.all_free(), "blocks or slots held after every request finished"
    return [done[i].token_ids for i in range(len(prompts))]
