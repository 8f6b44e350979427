"""Clients that send their body slowly or not at all: a body that has not arrived within ``body_timeout`` is a 408
(OpenAI's error shape) and the connection is let go; a client that leaves mid-body is answered quietly (it was an
"Exception in ASGI application" traceback in uvicorn's log for each one, found by trying 200 of them); the server
serves the next request either way."""

from __future__ import annotations

import json
import logging
import socket
import time

import openai
import pytest
from server_helpers import GREEDY, MODEL, live_server, make_app, reference


def _post_head(url: str, length: int) -> socket.socket:
    """A connection that sent ``/v1/completions``'s headers announcing ``length`` body bytes, and one byte of it."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n{{"
    )
    conn.sendall(head.encode())
    return conn


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_stalled_body_is_a_408_and_a_vanished_one_no_traceback() -> None:
    app = make_app("thread", app_kwargs={"body_timeout": 0.5})
    errors, uvicorn_log = _Records(), logging.getLogger("uvicorn.error")
    with live_server(app) as url:
        uvicorn_log.addHandler(errors)  # after the server configured its logging (which drops handlers added before)
        try:
            _check_slow_clients(url)
        finally:
            uvicorn_log.removeHandler(errors)
    assert not [m for m in errors.messages if "Exception in ASGI application" in m], errors.messages


def _rest_of_response(conn: socket.socket, data: bytes) -> bytes:
    """``data`` (the reply's first bytes) completed to the whole response: its headers and ``Content-Length``
    bytes of body (the body may come in a later packet than the headers on a loaded machine)."""
    conn.settimeout(10)
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:  # closed before the headers ended: the caller's checks say what came
            return data
        data += more
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        None,
    )
    while length is not None and len(body) < length:
        more = conn.recv(65536)
        if not more:
            break
        body += more
    return head + b"\r\n\r\n" + body


def _check_slow_clients(url: str) -> None:
    stalled = _post_head(url, 100)
    started = time.monotonic()
    first = stalled.recv(65536)
    waited = time.monotonic() - started
    reply = _rest_of_response(stalled, first).decode()
    stalled.close()
    assert reply.startswith("HTTP/1.1 408"), reply[:80]
    error = json.loads(reply.split("\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_timeout" and "within 0.5 s" in error["message"]
    assert 0.3 < waited < 5
    leaving = [_post_head(url, 100) for _ in range(5)]  # clients that leave halfway through their body
    time.sleep(0.2)  # the app is reading their bodies
    for conn in leaving:
        conn.close()
    time.sleep(0.5)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    out = client.completions.create(model=MODEL, prompt="still here", max_tokens=3, **GREEDY)
    assert out.choices[0].text == reference("still here", 3)


def test_body_timeout_must_be_positive() -> None:
    from mcore.errors import UserError

    with pytest.raises(UserError, match="body_timeout = 0: must be a number of seconds > 0"):
        make_app("thread", app_kwargs={"body_timeout": 0})
