"""Back-pressure and engine loss: with ``max_waiting`` requests waiting, a new one is refused with a 429 (OpenAI's
``rate_limit_exceeded``, the client's ``RateLimitError``) and the others finish unharmed; an engine that is stopped
or whose process died gives 503 (``InternalServerError``) on new requests, ``/health`` and ``/metrics``, and a
stream that was running ends with an error event instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import openai
import pytest
from server_helpers import GREEDY, MODEL, MODES, all_free, live_server, make_app, reference, stats


def _events(lines: Iterator[str]) -> list[Any]:
    """The JSON payloads of a server-sent event stream (``[DONE]`` as the string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _wait_for(app: Any, **want: int) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        now = stats(app)
        if all(now[k] == v for k, v in want.items()) or time.monotonic() > deadline:
            return now
        time.sleep(0.01)


@pytest.mark.parametrize("mode", MODES)
def test_a_full_queue_refuses_with_429_and_the_others_finish(mode: str) -> None:
    app = make_app(mode, "slow", max_num_seqs=2, max_waiting=2)  # 2 run, 2 wait, then 429
    prompts = [f"queued {i}" for i in range(4)]
    with live_server(app) as url, ExitStack() as streams:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        replies = []
        for prompt in prompts:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 50, "stream": True, "ignore_eos": True,
                    "temperature": 0.0}  # fmt: skip
            replies.append(streams.enter_context(httpx.stream("POST", url + "/v1/completions", json=body, timeout=60)))
            assert replies[-1].status_code == 200  # the headers come once the engine took the request
        now = _wait_for(app, running=2, waiting=2)
        assert (now["running"], now["waiting"]) == (2, 2)
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model=MODEL, prompt="one too many", max_tokens=2)
        assert refused.value.status_code == 429 and refused.value.code == "rate_limit_exceeded"
        assert refused.value.body["type"] == "requests" and "2 requests wait" in refused.value.message  # type: ignore[index]
        assert refused.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError):  # streaming or chat: refused before the stream starts
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True)
        texts = []
        for reply in replies:
            events = _events(reply.iter_lines())
            assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
            texts.append("".join(e["choices"][0]["text"] for e in events[:-1]))
        assert texts == [reference(p, 50) for p in prompts]
        assert all_free(app)
        out = client.completions.create(model=MODEL, prompt="room again", max_tokens=3, **GREEDY)
        assert out.choices[0].text == reference("room again", 3)
        rejected = stats(app)["metrics"]["rejected"]
        assert rejected == {"queue_full": 2}
        metrics = httpx.get(url + "/metrics").text
        assert f'mcore:request_rejected_total{{model_name="{MODEL}",reason="queue_full"}} 2' in metrics


@pytest.mark.parametrize("mode", MODES)
def test_a_dead_engine_gives_503_and_ends_running_streams(mode: str) -> None:
    app = make_app(mode, "slow")
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        body = {"model": MODEL, "prompt": "cut short", "max_tokens": 50, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as reply:
            lines = reply.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # generation has started
            loop = app.state.engine_loop
            if mode == "process":
                os.kill(loop.process.pid, signal.SIGKILL)  # the engine process dies
            else:
                loop.stop()
            events = _events(lines)
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert error["code"] == "engine_unavailable" and error["type"] == "server_error"
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(url + "/health").json() == {"status": "stopped"}
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model=MODEL, prompt="anyone?", max_tokens=2)
        assert err.value.status_code == 503 and err.value.code == "engine_unavailable"
        reply = httpx.get(url + "/metrics")
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "engine_unavailable"
        if mode == "process":
            assert loop.process.exitcode == -signal.SIGKILL


def test_max_waiting_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    from mcore_inference.server.app import build_app
    from mcore_inference.server.cli import main
    from server_helpers import make_engine

    from mcore.errors import UserError

    assert main(["/nowhere", "--max-waiting", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--max-waiting 0: must be >= 1" in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="max_waiting = -1"):
        build_app(make_engine(), model_name=MODEL, max_waiting=-1)


def test_a_group_counts_against_the_queue_and_its_size_is_bounded() -> None:
    """A request of several choices is admitted only if all of them fit under ``max_waiting`` (one that did not
    would slip 10^5 sequences past the limit while the queue was short); prompts x n over ``MAX_CHOICES`` and stop
    lists over their bounds are a 400 before anything is queued; the server keeps serving."""
    from mcore_inference.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS
    from mcore_inference.server.protocol import MAX_CHOICES

    app = make_app("thread", "slow", max_num_seqs=2, max_waiting=3)  # 2 run, then at most 3 wait
    with live_server(app) as url:
        with ExitStack() as streams:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            for i in range(3):  # 2 running, 1 waiting
                body = {"model": MODEL, "prompt": f"busy {i}", "max_tokens": 40, "stream": True, "ignore_eos": True}
                streams.enter_context(httpx.stream("POST", url + "/v1/completions", json=body, timeout=60))
            assert (_wait_for(app, running=2, waiting=1)["waiting"]) == 1
            with pytest.raises(openai.RateLimitError) as refused:  # 1 waits + 3 choices > 3
                client.completions.create(model=MODEL, prompt="three at once", max_tokens=2, n=3)
            assert "this one brings 3" in refused.value.message
            fits = client.completions.create(model=MODEL, prompt="two fit", max_tokens=2, n=2, **GREEDY)
            assert [c.text for c in fits.choices] == [reference("two fit", 2)] * 2
            with pytest.raises(openai.BadRequestError) as big:
                client.completions.create(model=MODEL, prompt=[[1]] * (MAX_CHOICES // 4 + 1), max_tokens=1, n=4)
            assert (
                big.value.status_code == 400
                and big.value.param == "prompt"
                and f"at most {MAX_CHOICES}" in big.value.message
            )
            with pytest.raises(openai.BadRequestError) as stops:
                client.completions.create(model=MODEL, prompt="x", max_tokens=1, stop=[f"s{i}" for i in range(10_000)])
            assert f"at most {MAX_STOP_STRINGS} strings" in stops.value.message and len(stops.value.message) < 400
            with pytest.raises(openai.BadRequestError):
                client.completions.create(model=MODEL, prompt="x", max_tokens=1, stop=["y" * (MAX_STOP_CHARS + 1)])
            assert stats(app)["metrics"]["rejected"] == {"queue_full": 1}
        assert all_free(app)  # the closed streams aborted their requests
