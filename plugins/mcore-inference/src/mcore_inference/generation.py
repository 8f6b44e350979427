"""``PagedEngine``: the engine behind ``mcore generate`` (the core's ``GenerationEngine``, kind ``engine``).

Why it exists: the core's ``generate`` command cannot import this plugin; it asks the registry for an
engine and calls ``from_model`` then ``generate_ids``. This adapter maps that small call onto ``LLM``:
the command's greedy / temperature / top-k / seed settings become ``SamplingParams``, and, like the
core's plain loop, the output runs to ``max_new_tokens`` unless a stop id comes (end-of-document does
not stop it). A model none of whose layers declares a cache (``DeclaresCache``) cannot be served from a
paged cache: ``from_model`` answers ``None`` and the command keeps its plain loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import nn

from mcore_inference.engine import model_cache_specs
from mcore_inference.llm import LLM
from mcore_inference.sampling import SamplingParams


class PagedEngine:
    """``GenerationEngine`` over ``LLM`` (module docstring)."""

    name: ClassVar[str] = "paged"

    def __init__(self, llm: LLM) -> None:
        self.llm = llm

    @classmethod
    def from_model(cls, model: nn.Module, *, tokenizer: Any, max_model_len: int) -> PagedEngine | None:
        if not model_cache_specs(model):
            return None
        seqs, block = 8, 16
        blocks = -(-max_model_len // block) * seqs  # room for every sequence at full length, not 90% of the GPU
        return cls(LLM(model, tokenizer=tokenizer, max_model_len=max_model_len, max_num_seqs=seqs, num_blocks=blocks))

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
        stop_token_ids: Sequence[int] = (),
    ) -> list[list[int]]:
        greedy = temperature <= 0 and top_k <= 0
        params = SamplingParams(
            max_tokens=max_new_tokens,
            temperature=0.0 if greedy else (temperature if temperature > 0 else 1.0),
            top_k=top_k if top_k > 0 else 0,
            seed=None if greedy else seed,
            stop_token_ids=tuple(int(t) for t in stop_token_ids),
            ignore_eos=True,
        )
        outputs = self.llm.generate([list(p) for p in prompts], params)
        return [out.token_ids for out in outputs]
