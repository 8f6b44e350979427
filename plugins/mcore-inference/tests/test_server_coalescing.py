"""The per-token path of a stream (``server/sse.py``, issue 21): a chunk written from the template is the bytes
``json.dumps`` gives for the chunk's dict; ``coalesce`` joins a request's outputs in order; and a stream whose event
loop fell behind the engine (held here while the engine runs on) gets its tokens in one event, which the ``openai``
types read back to the same text, with the finish reason once. Thread and process engines."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import openai.types
import openai.types.chat
import pytest
from mcore_inference.sampling import SamplingParams
from mcore_inference.server.app import _Group, _Server
from mcore_inference.server.chat_template import ChatTemplate
from mcore_inference.server.engine_core import Accumulator, OutputDelta
from mcore_inference.server.engine_loop import EngineLoop
from mcore_inference.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, StreamOptions
from mcore_inference.server.sse import ChunkTemplate, coalesce
from server_helpers import MODEL, MODES, make_engine, reference

from mcore.data.tokenizer import ByteTokenizer

TEXTS = [
    "",
    " <12>",
    "plain",
    'quo"te \\ back',
    "tab\tnew\nline\r\x00\x1f\x7f",
    "é ü 中文 🙂",
    "\ufffd",
    "\u2028\u2029",
]
REASONS: list[tuple[str | None, str | int | None]] = [
    (None, None),
    ("length", None),
    ("stop", "</s>"),
    ("stop", 'a "quoted"\nstop'),
    ("stop", 42),
    ("abort", None),
]


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_template_gives_the_bytes_of_json_dumps(chat: bool, text: str) -> None:
    head = {"id": "cmpl-x\"y", "object": "chat.completion.chunk" if chat else "text_completion", "created": 1733,
            "model": "m\u00e9/\"q\""}  # fmt: skip
    template = ChunkTemplate(head, chat=chat)
    for index in (0, 7):
        for finish, stop in REASONS:
            part: dict[str, Any] = {"delta": {"content": text} if text else {}} if chat else {"text": text}
            choice = {"index": index, **part, "logprobs": None, "finish_reason": finish, "stop_reason": stop}
            data = json.dumps(head | {"choices": [choice]}, separators=(",", ":"), ensure_ascii=False)
            assert template.event(index, text, finish, stop) == f"data: {data}\n\n"


def _outputs(parts: list[tuple[list[int], str, bool]], logprobs: bool) -> list[Any]:
    acc = Accumulator(5)
    outs = []
    for ids, text, finished in parts:
        lp = [-0.5 * t for t in ids] if logprobs else None
        top = [{t: -0.5 * t} for t in ids] if logprobs else None
        outs.append(acc.apply(OutputDelta(5, ids, text, finished, "length" if finished else None, None, lp, top)))
    return outs


@pytest.mark.parametrize("logprobs", [False, True])
def test_coalesce_joins_a_requests_outputs_in_order(logprobs: bool) -> None:
    outs = _outputs([([1, 2], "ab", False), ([], "", False), ([3], "c", False), ([4, 5], "de", True)], logprobs)
    merged = coalesce(outs)
    assert (merged.new_token_ids, merged.new_text) == ([1, 2, 3, 4, 5], "abcde")
    assert (merged.token_ids, merged.text) == ([1, 2, 3, 4, 5], "abcde")
    assert (merged.finished, merged.finish_reason, merged.request_id) == (True, "length", 5)
    if logprobs:
        assert merged.new_logprobs == [-0.5, -1.0, -1.5, -2.0, -2.5] == merged.logprobs
        assert merged.new_top_logprobs == [{1: -0.5}, {2: -1.0}, {3: -1.5}, {4: -2.0}, {5: -2.5}]
    else:
        assert merged.new_logprobs is None and merged.new_top_logprobs is None
    tail = coalesce(outs[2:])
    assert (tail.new_token_ids, tail.new_text, tail.text) == ([3, 4, 5], "cde", "abcde")
    assert coalesce(outs[:1]) is outs[0]


def _client(mode: str) -> Any:
    if mode == "thread":
        return EngineLoop(make_engine())
    from server_helpers import make_app

    return make_app("process").state.engine_loop  # started by build_app (its lifespan is not run here)


async def _held(group: _Group, events: AsyncIterator[str]) -> list[str]:
    """Start ``group``, then hold the event loop (as a busy server would) until the engine has finished the
    request (its stats say so: every output was handed to the loop before that answer), let the loop fold them;
    then read the stream."""
    await group.start()
    deadline = time.monotonic() + 60.0
    while group.engine_loop.stats().result(timeout=60.0)["has_unfinished"]:  # blocks the event loop meanwhile
        assert time.monotonic() < deadline, "the engine did not finish the request within 60 s"
        time.sleep(0.01)
    # the outputs handed over meanwhile wait as loop callbacks: one turn of the loop folds them all into the
    # stream's buffer (without it, outputs folded during ``start`` would be read alone, a timing-dependent split)
    await asyncio.sleep(0)
    return [event async for event in events]


def _chunks(events: list[str], kind: Any) -> list[Any]:
    body = "".join(events)
    assert body.endswith("data: [DONE]\n\n")
    datas = [e.removeprefix("data: ") for e in body.split("\n\n") if e][:-1]
    return [kind.model_validate_json(d) for d in datas]


@pytest.mark.parametrize("mode", MODES)
def test_a_stream_that_fell_behind_gets_its_tokens_in_one_event(mode: str) -> None:
    client = _client(mode)
    client.start()
    try:
        server = _Server(client, MODEL, None, 1 << 20, ChatTemplate(None, eos_token=""))
        ids = ByteTokenizer().encode("coalesce me").tolist()
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

        async def completions() -> list[str]:
            req = CompletionRequest(model=MODEL, prompt=ids, max_tokens=12, stream=True,
                                    stream_options=StreamOptions(include_usage=True))  # fmt: skip
            group = _Group(client, [(ids, params)])
            return await _held(group, server.completion_events(req, group, "cmpl-1", 1, [""], [ids], len(ids)))

        chunks = _chunks(asyncio.run(completions()), openai.types.Completion)
        texts = [c.choices[0] for c in chunks if c.choices]
        assert len(texts) == 1  # every token's delta in one event
        assert texts[0].text == reference("coalesce me", 12) and texts[0].finish_reason == "length"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12

        async def chat() -> list[str]:
            req = ChatCompletionRequest(model=MODEL, messages=[ChatMessage(role="user", content="x")], stream=True)
            group = _Group(client, [(ids, params)])
            return await _held(group, server.chat_events(req, group, "chatcmpl-1", 1, len(ids)))

        chunks = _chunks(asyncio.run(chat()), openai.types.chat.ChatCompletionChunk)
        deltas = [c.choices[0] for c in chunks]
        assert deltas[0].delta.role == "assistant" and len(deltas) == 2  # the role, then every token at once
        assert deltas[1].delta.content == reference("coalesce me", 12) and deltas[1].finish_reason == "length"
    finally:
        client.stop()
