"""The request bodies of ``/v1/completions`` and ``/v1/chat/completions``, and their ``SamplingParams``.

Why it exists: pydantic checks types (strictly, as OpenAI does) and ranges (a wrong value is a 400 naming the field); unknown fields are
rejected rather than silently ignored, so a client never believes an option took effect when it did not. Value
checks that ``SamplingParams`` owns (temperature, top-p, penalties, logit bias ranges, ...) are left to it: its
``UserError`` becomes a 400 with its message. ``logit_bias`` keys are token ids written as JSON strings (OpenAI's
form); a key that is not an integer is a 400 naming it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mcore.errors import UserError
from mcore_inference.sampling import MAX_LOGPROBS, SamplingParams

#: Most choices one request may ask for.
MAX_N = 64
#: Most engine requests one HTTP request may create (``/v1/completions``: prompts x ``n``): a 10 KB body must not
#: queue 10^5 sequences ahead of every other client.
MAX_CHOICES = 256


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "0.5" is not a number, true is not a token id


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None  # {"token id": bias in [-100, 100]}, OpenAI's form
    min_tokens: int | None = None  # vLLM's: no stop token or stop string before this many output tokens
    user: str | None = None  # accepted and unused, as OpenAI's clients send it

    def sampling_params(self, *, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's params (raises ``UserError`` on a value out of range)."""
        given: dict[str, Any] = {}
        for name in ("temperature", "top_p", "top_k", "min_p", "seed"):
            if getattr(self, name) is not None:
                given[name] = getattr(self, name)
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            if getattr(self, name) is not None:
                given[name] = getattr(self, name)
        if self.min_tokens is not None:
            given["min_tokens"] = self.min_tokens
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            logit_bias=_logit_bias(self.logit_bias),
            max_tokens=max_tokens,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            **given,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def _logit_bias(given: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's ``{"token id": bias}`` with int keys (``SamplingParams`` checks the ids and biases)."""
    if given is None:
        return None
    for key in given:
        if not re.fullmatch(r"-?[0-9]+", key):
            raise UserError(
                f'logit_bias key {key!r}: must be a token id, an integer written as a string (e.g. "50256")'
            )
    bias = {int(key): value for key, value in given.items()}
    if len(bias) != len(given):  # "1" and "01": one token id twice
        raise UserError("logit_bias: two keys name the same token id (write each id once, without leading zeros)")
    return bias


class CompletionRequest(_Sampling):
    """``/v1/completions``: ``prompt`` is a string, a list of strings, a list of token ids or a list of those."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """``/v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
