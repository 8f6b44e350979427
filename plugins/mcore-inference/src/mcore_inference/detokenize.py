"""Incremental detokenisation: one request's output tokens to text deltas, UTF-8 safe, with stop strings.

A token can end in the middle of a character (byte-level BPE splits an emoji or a CJK character over several
tokens), and a stop string can span tokens. ``IncrementalDetokenizer.push`` returns only text that is final:

* decoding uses only the tokenizer's ``decode``: each push decodes a small window (the tokens of the previous
  delta plus the new ones) and emits what the new tokens added; while that text ends in U+FFFD (an incomplete
  character) it is held back until a later token completes it, or the request ends;
* stop strings are searched in the decoded text, across token boundaries; while streaming, a tail of the text that
  could be the start of a stop string is held back; the output ends before the first stop string (or after it,
  with ``include_stop_str_in_output``); as in vLLM, stop strings are honoured only in text that tokens after the
  first ``min_tokens`` add (a stop string may begin in earlier text and end in that text);
* a stop token (``stop_token_ids``, or the tokenizer's ``eos_id`` unless ``ignore_eos``) ends the output and adds
  no text; ``max_tokens`` ends it with finish reason ``"length"``. At the end the held-back text is flushed.
"""

from __future__ import annotations

from collections.abc import Sequence

from mcore.data.tokenizer import Tokenizer
from mcore_inference.sampling import SamplingParams, token_stop

#: Prompt tokens decoded before the first output token (context for tokenizers whose text depends on it).
PROMPT_CONTEXT = 5
_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas and the stop decision for one request. ``push`` each output token; read ``finished``."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[int] = []
        self.text = ""  # decoded output: complete characters, cut at a stop string; may run ahead of the deltas
        self.finished = False
        self.finish_reason: str | None = None  # "stop", "length", or "abort" (flush)
        self.stop_reason: str | int | None = None  # the stop string or stop token id (None for eos and length)
        self._window: list[int] = [int(t) for t in prompt_ids[max(0, len(prompt_ids) - PROMPT_CONTEXT) :]]
        self._prefix = 0  # window[_prefix:_read] is the text already in self.text (or prompt context)
        self._read = len(self._window)
        self._emitted = 0  # characters of self.text returned by push
        self._longest_stop = max((len(s) for s in params.stop), default=0)
        self._stop_from = 0  # a stop string must end past this character of self.text (min_tokens)

    def push(self, token_id: int) -> str:
        """Add one output token; return the text that became final (may be empty)."""
        assert not self.finished, "push after the request finished"
        token_id = int(token_id)
        self.token_ids.append(token_id)
        stop = token_stop(self.params, token_id, len(self.token_ids), self.tokenizer.eos_id)
        if stop is not None and stop[0] == "stop":
            self._end("stop", None if token_id == self.tokenizer.eos_id else token_id)
            return self._take()
        self._window.append(token_id)
        self._decode(final=False)
        if not self.finished and stop is not None:
            self._end("length", None)
        return self._take()

    def flush(self) -> str:
        """End the request here (an abort, say): the held-back text, incomplete characters as U+FFFD."""
        if not self.finished:
            self._end("abort", None)
        return self._take()

    def _end(self, reason: str, stop_reason: str | int | None) -> None:
        self._decode(final=True)
        if not self.finished:
            self.finished, self.finish_reason, self.stop_reason = True, reason, stop_reason

    def _decode(self, *, final: bool) -> None:
        """Move the window's new text into ``self.text`` when it is complete (or ``final``), then check stops."""
        if self._read == len(self._window):
            return
        before = self.tokenizer.decode(self._window[self._prefix : self._read])
        after = self.tokenizer.decode(self._window[self._prefix :])
        if len(after) <= len(before) or (after.endswith(_INCOMPLETE) and not final):
            return
        old = len(self.text)
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self._window)
        if len(self._window) > 4 * PROMPT_CONTEXT:  # drop tokens no later window reads
            del self._window[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        if len(self.token_ids) <= self.params.min_tokens:
            self._stop_from = len(self.text)  # text of the first min_tokens tokens: no stop string ends in it
            return
        self._find_stop(max(old, self._stop_from))

    def _find_stop(self, end_after: int) -> None:
        """End the text at the first stop string that ends past character ``end_after`` (the text before it was
        searched already, or is exempt by ``min_tokens``)."""
        stops = self.params.stop
        hits = [(i, len(s), s) for s in stops if (i := self.text.find(s, max(0, end_after - len(s) + 1))) >= 0]
        if not hits:
            return
        index, length, stop = min(hits)
        self.text = self.text[: index + length if self.params.include_stop_str_in_output else index]
        self.finished, self.finish_reason, self.stop_reason = True, "stop", stop

    def _held(self) -> int:
        """Characters at the end of the unemitted text that could start a stop string."""
        tail = self.text[self._emitted :]
        for n in range(min(len(tail), self._longest_stop - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.params.stop):
                return n
        return 0

    def _take(self) -> str:
        end = len(self.text) if self.finished else len(self.text) - self._held()
        delta = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta
