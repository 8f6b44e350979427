"""``mcore serve``'s app on the toy model and the byte tokenizer, through a live server and the official ``openai``
client: completions and chat, streaming and not, ``n``, stop strings, logprobs shapes, usage, OpenAI error objects,
concurrent streams, client disconnects and the API key; every test runs with the engine in a thread of the server
and in an engine process of its own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from mcore_inference.server.app import build_app
from mcore_inference.server.chat_template import default_render
from server_helpers import GREEDY, MAX_LEN, MODEL, MODES, all_free, live_server, make_app, make_engine, reference, stats


@pytest.fixture(scope="module", params=MODES)
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any]]:
    app = make_app(request.param, app_kwargs={"max_body_bytes": 20_000})
    with live_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(served: tuple[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(served: tuple[str, Any], client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(served[0] + "/health").json() == {"status": "ok"}


def test_completion_greedy_equals_reference_with_usage(served: tuple[str, Any], client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="hello world", max_tokens=6, **GREEDY)
    assert out.object == "text_completion" and len(out.choices) == 1
    assert out.choices[0].text == reference("hello world", 6)
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (11, 6, 17)


def test_completion_prompt_lists_n_and_echo(served: tuple[str, Any], client: openai.OpenAI) -> None:
    ids = list(b"token ids")
    out = client.completions.create(model=MODEL, prompt=["abc", "xyz"], max_tokens=4, n=2, **GREEDY)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [reference("abc", 4)] * 2 + [reference("xyz", 4)] * 2
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (6, 16)
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, echo=True, **GREEDY)
    assert out.choices[0].text == "token ids" + reference("token ids", 3)


def test_completion_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI) -> None:
    """``echo`` + ``logprobs``: the prompt's tokens come first, the first with a null logprob, each next one with its
    logprob under the full-sequence model; streamed, the echo chunk carries the same."""
    import torch
    from server_helpers import _reference_model

    from mcore.data.tokenizer import ByteTokenizer

    prompt, n_top = "echo me", 2
    ids = ByteTokenizer().encode(prompt).tolist()
    with torch.no_grad():
        want = torch.log_softmax(_reference_model()(torch.tensor([ids]))[0].double(), dim=-1)  # (T, V)
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": n_top}
    out = client.completions.create(**kwargs, **GREEDY)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == prompt + reference(prompt, 3)
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.text_offset is not None
    assert lp.tokens[: len(ids)] == list(prompt) and len(lp.tokens) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs is not None and lp.top_logprobs[0] is None
    got = torch.tensor(lp.token_logprobs[1 : len(ids)], dtype=torch.float64)
    expected = torch.stack([want[i, ids[i + 1]] for i in range(len(ids) - 1)])
    assert float((got - expected).norm() / expected.norm()) < 1e-5
    assert all(len(top) == n_top for top in lp.top_logprobs[1:])
    assert lp.text_offset == list(range(len(ids) + 3))  # one byte per token
    chunks = list(client.completions.create(stream=True, **kwargs, **GREEDY))
    echo = chunks[0].choices[0]
    assert echo.text == prompt and echo.logprobs is not None and echo.logprobs.token_logprobs is not None
    assert echo.logprobs.token_logprobs == lp.token_logprobs[: len(ids)]
    assert "".join(c.text for chunk in chunks for c in chunk.choices) == out.choices[0].text


def test_completion_stream_equals_non_stream_with_usage(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": "stream me", "max_tokens": 8, "n": 2, "seed": 7}
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    texts, finishes = ["", ""], [[], []]  # type: list[str], list[list[str]]
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason is not None:
                finishes[choice.index].append(choice.finish_reason)
    assert texts == [c.text for c in full.choices]  # seeded: the same draws streamed or not
    assert finishes == [["length"], ["length"]]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None and usage.completion_tokens == 16


def test_seeded_choices_differ_and_choice_zero_is_n_one(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "prompt": "seeded", "max_tokens": 8, "seed": 11, "temperature": 1e5}
    two = client.completions.create(n=2, **kwargs)  # the toy logits are huge: only a hot temperature samples
    one = client.completions.create(n=1, **kwargs)
    assert two.choices[0].text == one.choices[0].text  # reproducible by seed
    assert two.choices[0].text != two.choices[1].text  # not n copies of one draw


def test_stop_string_ends_the_text(served: tuple[str, Any], client: openai.OpenAI) -> None:
    text = reference("stop here", 12)
    index, stop = next((i, c) for i, c in enumerate(text) if i > 0 and c != "\ufffd" and text.index(c) == i)
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(model=MODEL, prompt="stop here", max_tokens=12, stop=[stop],
                                                    stream=True, **GREEDY))  # fmt: skip
            got = "".join(c.choices[0].text for c in chunks)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        else:
            out = client.completions.create(model=MODEL, prompt="stop here", max_tokens=12, stop=stop, **GREEDY)
            got, reason = out.choices[0].text, [out.choices[0].finish_reason]
        assert got == text[:index] and reason == ["stop"]


def test_chat_stream_and_not(served: tuple[str, Any], client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = default_render([{"role": m["role"], "content": m["content"]} for m in messages])
    out = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5, **GREEDY)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == reference(prompt, 5)
    assert out.usage is not None and out.usage.prompt_tokens == len(prompt.encode())
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}, n=2, **GREEDY))  # fmt: skip
    first = {c.choices[0].index: c for c in chunks[:2]}
    assert sorted(first) == [0, 1] and all(c.choices[0].delta.role == "assistant" for c in first.values())
    content, finishes = ["", ""], [0, 0]
    for chunk in chunks[2:-1]:
        (choice,) = chunk.choices
        content[choice.index] += choice.delta.content or ""
        finishes[choice.index] += choice.finish_reason is not None
    assert content == [out.choices[0].message.content] * 2 and finishes == [1, 1]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


def test_logprobs_shapes(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="logprobs", max_tokens=4, logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and chosen == pytest.approx(max(top.values()))  # greedy took the most likely
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          logprobs=True, top_logprobs=2, **GREEDY)  # fmt: skip
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 3
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=3, logprobs=True, stream=True, **GREEDY))  # fmt: skip
    streamed = [e for c in chunks for e in ((c.choices[0].logprobs.content or []) if c.choices[0].logprobs else [])]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content])


def test_bad_requests_give_openai_errors_and_others_go_on(served: tuple[str, Any], client: openai.OpenAI) -> None:
    url = served[0]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert "temperature" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", n=0)
    assert err.value.body["param"] == "n"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x" * MAX_LEN)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=[300])  # outside the vocabulary: the engine's UserError
    assert "vocabulary" in err.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="other", prompt="x")
    assert missing.value.code == "model_not_found"
    for body, status in ((b"{not json", 400), (json.dumps({"model": MODEL}).encode(), 400),
                         (json.dumps({"model": MODEL, "prompt": "x", "bogus": 1}).encode(), 400),
                         (json.dumps({"model": MODEL, "prompt": "x" * 30_000}).encode(), 413)):  # fmt: skip
        reply = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
        assert reply.status_code == status
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    wrong: list[tuple[dict[str, Any], str]] = [
        ({"model": MODEL, "prompt": "x", "temperature": "0.5"}, "temperature"),  # strict types, as OpenAI
        ({"model": MODEL, "prompt": [True]}, "prompt"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ]
    for fields, param in wrong:
        route = "/v1/chat/completions" if "messages" in fields else "/v1/completions"
        reply = httpx.post(url + route, json=fields)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
    assert httpx.get(url + "/v1/nothing").json()["error"]["message"]
    out = client.completions.create(model=MODEL, prompt="still fine", max_tokens=3, **GREEDY)
    assert out.choices[0].text == reference("still fine", 3)


def test_concurrent_streams_equal_greedy_and_free_every_block(served: tuple[str, Any]) -> None:
    url, app = served
    prompts = [f"request number {i}: " + "ab" * (i % 5) for i in range(16)]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, stream=True, **GREEDY)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    texts = asyncio.run(run())
    assert texts == [reference(p, 10) for p in prompts]
    assert all_free(app)


@pytest.mark.parametrize("mode", MODES)
def test_client_disconnect_aborts_and_frees_blocks(mode: str) -> None:
    app = make_app(mode, "slow")
    body = {"model": MODEL, "prompt": "leave early", "max_tokens": 50, "stream": True, "ignore_eos": True}
    with live_server(app) as url:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as reply:
            lines = reply.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # generation has started
        assert all_free(app, timeout=5)
        steps = stats(app)["num_steps"]
        assert steps < 40, f"{steps} steps: the request ran on after its client left"
        # a non-streaming request whose client gives up is aborted too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body | {"stream": False}, timeout=0.3)
        assert all_free(app, timeout=5)
        assert stats(app)["num_steps"] - steps < 40


@pytest.mark.parametrize("mode", MODES)
def test_api_key_on_every_v1_route(mode: str) -> None:
    app = make_app(mode, app_kwargs={"api_key": "sesame"})
    with live_server(app) as url:
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model=MODEL, prompt="x", max_tokens=1)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)
        assert httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401
        assert httpx.get(url + "/health").status_code == 200
        right = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert right.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].finish_reason


def test_serve_without_fastapi_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mcore_inference.server.cli import main

    monkeypatch.setitem(__import__("sys").modules, "fastapi", None)  # what an environment without it raises
    assert main(["/nowhere"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'mcore-inference[serve]'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_step_is_a_500_and_the_server_goes_on(mode: str) -> None:
    app = make_app(mode, "exploding")
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model=MODEL, prompt=[7, 8], max_tokens=2)
        assert "boom" in err.value.message and "RuntimeError" in err.value.message
        out = client.completions.create(model=MODEL, prompt="fine", max_tokens=3, **GREEDY)
        assert out.choices[0].text == reference("fine", 3)
        assert all_free(app)


@pytest.mark.parametrize("mode", MODES)
def test_chat_template_renders_the_prompt(mode: str) -> None:
    from mcore.errors import UserError

    template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    app = make_app(mode, app_kwargs={"chat_template": template})
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "yo"}], max_tokens=4,
                                             **GREEDY)  # fmt: skip
        assert out.usage is not None and out.usage.prompt_tokens == len("<user>yo>")
        assert out.choices[0].message.content == reference("<user>yo>", 4)
    with pytest.raises(UserError, match="chat template"):
        build_app(make_engine(), model_name=MODEL, chat_template="{% for %}")


def test_engine_loop_stop_aborts_what_runs_and_refuses_new_work() -> None:
    from mcore_inference.sampling import SamplingParams
    from mcore_inference.server.engine_loop import EngineLoop

    engine = make_engine("slow")
    loop = EngineLoop(engine)
    loop.start()
    request = [([104, 105], SamplingParams(max_tokens=50, ignore_eos=True))]

    async def run() -> list[Any]:
        out: asyncio.Queue[Any] = asyncio.Queue()
        await asyncio.wrap_future(loop.submit(request, out))
        items = [(await out.get())[1]]  # generation has started
        await asyncio.to_thread(loop.stop)
        while not isinstance(items[-1], BaseException) and not items[-1].finished:
            items.append((await out.get())[1])
        with pytest.raises(RuntimeError, match="not running"):
            await asyncio.wrap_future(loop.submit(request, out))
        return items

    items = asyncio.run(run())
    assert isinstance(items[-1], RuntimeError) and "shutting down" in str(items[-1])
    assert len(items) < 40 and not engine.has_unfinished() and engine.cache.all_free()
