"""Overlapped decode: the next decode step is launched before the host reads this one's tokens.

Why it exists: between two CUDA-graph replays the engine does host work (scheduling, the inputs' copy, the
sampler's launches, reading the chosen tokens, appending them, detokenising, stop checks, prefix-cache
bookkeeping): 0.19 ms a step at batch 1 and 0.73 ms at batch 32 on an H100 (``benchmarks/RESULTS.md``), during
which the GPU idles. With ``overlap_decode`` the engine launches decode step ``k + 1`` first, its input tokens
copied on the device from step ``k``'s sampled tokens, and only then reads step ``k``'s tokens (vLLM calls this
async scheduling). The host's work then runs while the GPU computes.

What it costs: a sequence that ends at step ``k`` on a token the host had not seen (end of document, a stop token
or string) has had a row in step ``k + 1``; that row's token is dropped and its cache slot is freed with the
sequence. A step follows step ``k`` this way only when it would hold the same sequences (less those known to end:
``max_tokens``, the context's end, an abort), each brings one token, no request wants penalties (their counts are
of host tokens) and no waiting request could be admitted; otherwise the engine reads step ``k`` first (a drain)
and schedules as usual. Tokens equal those of plain decoding: greedy and seeded sampling see the same logits and
positions (an unseeded random request draws from the shared generator in a different order, as any change of
batch makes it).

This module holds the device-to-host side: ``Readback`` copies a step's sampled tokens (and logprobs) into pinned
host memory behind an event, so the host waits for that step alone, never for the step launched after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mcore_inference.sampling import SampleOutput


def _parts(sample: SampleOutput) -> list[torch.Tensor | None]:
    """``[token_ids, logprob?, top ids?, top values?]`` of a sampler output (absent parts: None)."""
    top = sample.top_logprobs
    return [sample.token_ids, sample.logprob, None if top is None else top.ids, None if top is None else top.values]


def read_now(sample: SampleOutput) -> list[Any]:
    """The parts of ``sample`` as lists, read at once (a plain step: the host waits for everything queued)."""
    return [None if part is None else part.tolist() for part in _parts(sample)]


class Readback:
    """A step's sampler output on its way to the host: ``lists()`` waits for that step only (not for work queued
    after it) and returns ``read_now``'s lists."""

    def __init__(self, sample: SampleOutput) -> None:
        parts = _parts(sample)
        self._event: torch.cuda.Event | None = None
        if sample.token_ids.device.type == "cuda":
            host: list[torch.Tensor | None] = []
            for part in parts:
                if part is None:
                    host.append(None)
                    continue
                copy = torch.empty(part.shape, dtype=part.dtype, pin_memory=True)
                copy.copy_(part, non_blocking=True)
                host.append(copy)
            self._event = torch.cuda.Event()
            self._event.record()
            self._parts = host
        else:
            self._parts = parts  # the CPU computed them already

    def lists(self) -> list[Any]:
        if self._event is not None:
            self._event.synchronize()
        return [None if part is None else part.tolist() for part in self._parts]


@dataclass(eq=False)
class InFlight:
    """A decode step launched and not yet read: its sequences (rows in order), their requests, the sampled tokens
    on the device (the next step's inputs) and their way to the host."""

    seqs: list[Any]  # SequenceState, one per row
    requests: list[Any]  # the engine's request of each row, as it was at launch
    token_ids: torch.Tensor  # (S,) int64 on the model's device
    readback: Readback
