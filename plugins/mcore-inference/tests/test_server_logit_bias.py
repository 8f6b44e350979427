"""``logit_bias`` (OpenAI's) and ``min_tokens`` (vLLM's, through ``extra_body``) through a live server and the
official ``openai`` client, completions and chat, streaming and not; bad keys and out-of-range biases are
OpenAI-shaped 400s naming the field, and the server goes on serving. The toy model is the soft one (logits of O(1),
so a bias of 100 forces a token); every test runs with the engine in a thread and in an engine process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from server_helpers import MODEL, MODES, all_free, live_server, make_app

X = ord("x")  # the byte tokenizer's id of "x"
EOS = 256  # the byte tokenizer's <|endoftext|>


@pytest.fixture(scope="module", params=MODES)
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any]]:
    app = make_app(request.param, "soft")
    with live_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(served: tuple[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _stream_text(chunks: Any, chat: bool) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in chunks:
        for choice in chunk.choices:
            piece = (choice.delta.content if chat else choice.text) or ""
            text += piece
            finish = choice.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("stream", [False, True])
def test_a_bias_of_100_forces_the_token_in_completions_and_chat(client: openai.OpenAI, stream: bool) -> None:
    bias = {str(X): 100}
    common: dict[str, Any] = {"model": MODEL, "max_tokens": 5, "temperature": 0.0, "logit_bias": bias}
    completion = client.completions.create(prompt="hello", stream=stream, **common)
    messages: Any = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(messages=messages, stream=stream, **common)
    if stream:
        assert _stream_text(completion, chat=False) == ("xxxxx", "length")
        assert _stream_text(chat, chat=True) == ("xxxxx", "length")
    else:
        assert (completion.choices[0].text, completion.choices[0].finish_reason) == ("xxxxx", "length")  # type: ignore[union-attr]
        assert chat.choices[0].message.content == "xxxxx"  # type: ignore[union-attr]
    sampled = client.completions.create(
        model=MODEL, prompt="hi", max_tokens=6, temperature=1.0, seed=3, logit_bias={str(X): 100, "121": -100}
    )
    assert sampled.choices[0].text == "x" * 6


@pytest.mark.parametrize("stream", [False, True])
def test_min_tokens_holds_back_the_end_of_document(client: openai.OpenAI, stream: bool) -> None:
    common: dict[str, Any] = {"model": MODEL, "prompt": "abc", "max_tokens": 10, "temperature": 0.0}
    common["logit_bias"] = {str(EOS): 100, "121": 50}  # eos, else "y"
    at_once = client.completions.create(**common)
    assert (at_once.choices[0].text, at_once.choices[0].finish_reason) == ("", "stop")
    held = client.completions.create(stream=stream, extra_body={"min_tokens": 3}, **common)
    if stream:
        text, finish = _stream_text(held, chat=False)
    else:
        text, finish = held.choices[0].text, held.choices[0].finish_reason  # type: ignore[union-attr]
        assert held.usage is not None and held.usage.completion_tokens == 4  # type: ignore[union-attr]
    assert (text, finish) == ("yyy", "stop")
    messages: Any = [{"role": "user", "content": "abc"}]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0.0, logit_bias={str(EOS): 100, "121": 50},
        extra_body={"min_tokens": 2},
    )  # fmt: skip
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == ("yy", "stop")
    assert chat.usage is not None and chat.usage.completion_tokens == 3


def test_bad_biases_are_400s_naming_the_field_and_the_server_goes_on(
    served: tuple[str, Any], client: openai.OpenAI
) -> None:
    messages: Any = [{"role": "user", "content": "x"}]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"logit_bias": {"abc": 1}}, "'abc'"),
        ({"logit_bias": {str(X): 101}}, "101"),
        ({"logit_bias": {"-3": 1}}, "-3"),
        ({"logit_bias": {"7": 1, "07": 2}}, "same token id"),  # one id twice once the keys are ints
        ({"logit_bias": {"300": 1}}, "vocabulary"),  # past the byte tokenizer's 257: the engine refuses it
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "301 entries"),
    ]
    for kwargs, named in cases:
        for endpoint in ("completions", "chat"):
            with pytest.raises(openai.BadRequestError) as err:
                if endpoint == "completions":
                    client.completions.create(model=MODEL, prompt="x", max_tokens=2, **kwargs)
                else:
                    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, **kwargs)
            assert "logit_bias" in err.value.message and named in err.value.message, (kwargs, err.value.message)
            assert err.value.body["param"] == "logit_bias"  # type: ignore[index]
            assert err.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"min_tokens": 5})
    assert "min_tokens" in err.value.message and err.value.body["param"] == "min_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"min_tokens": "2"})
    assert err.value.body["param"] == "min_tokens"  # type: ignore[index]
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0.0, logit_bias={str(X): 100})
    assert out.choices[0].text == "xxx"
    assert all_free(served[1])
