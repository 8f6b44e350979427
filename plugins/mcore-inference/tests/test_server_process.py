"""The engine in its own process (``EngineProcess``): 64 concurrent streams, engine start failures, ``stop``, and
process hygiene: SIGTERM to the server lets a running stream finish within the shutdown timeout (or cuts it
after it) and both processes exit cleanly; a server process killed outright leaves no engine process behind.
(Every other server test also runs in process mode: ``MODES``.)"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from mcore_inference.sampling import SamplingParams
from mcore_inference.server.engine_process import EngineProcess
from server_helpers import GREEDY, MODEL, all_free, live_server, make_app, make_engine, reference

from mcore.errors import UserError
from mcore_testing import procs

TESTS = Path(__file__).parent
linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if procs.alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def test_64_concurrent_streams_complete_and_free_every_block() -> None:
    # 64 sequences of up to 9 blocks in 32: any few running at once outgrow the cache, so some are preempted and
    # recomputed however the requests interleave (with 128 blocks that took more overlap than a loaded CI machine gave)
    app = make_app("process", num_blocks=32)
    prompts = [f"stream {i:02d}: " + "xy" * (i % 7) for i in range(64)]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stream=True, **GREEDY)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def run(url: str) -> list[str]:
        limits = httpx.Limits(max_connections=64)
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120,
                                      http_client=openai.DefaultAsyncHttpxClient(limits=limits)) as client:  # fmt: skip
            return await asyncio.gather(*(one(client, p) for p in prompts))

    with live_server(app) as url:
        texts = asyncio.run(run(url))
        assert texts == [reference(p, 12) for p in prompts]
        assert all_free(app)
        stats = app.state.engine_loop.stats().result(10)
        assert stats["metrics"]["finished"]["length"] == 64 and stats["preemptions"] > 0


def _fails_to_build() -> Any:
    raise UserError("no model at /nowhere")


def _dies_while_building() -> Any:
    os._exit(3)  # no message: the pipe just closes (an EOFError traceback before, found by trying it)


def test_an_engine_process_that_dies_while_starting_is_one_line() -> None:
    process = EngineProcess(_dies_while_building, start_timeout=120)
    with pytest.raises(UserError, match=r"the engine process exited while starting \(exit code 3\)"):
        process.start()


def test_a_failed_engine_start_raises_and_leaves_no_process() -> None:
    process = EngineProcess(_fails_to_build, start_timeout=120)
    with pytest.raises(UserError, match="no model at /nowhere"):
        process.start()
    assert process.process is not None and _wait_gone([process.process.pid], 10) == []
    with pytest.raises(UserError, match="max_waiting = 0"):
        EngineProcess(_fails_to_build, max_waiting=0)


def test_stop_aborts_what_runs_and_refuses_new_work() -> None:
    process = EngineProcess(functools.partial(make_engine, "slow"), start_timeout=120)
    process.start()
    request = [([104, 105], SamplingParams(max_tokens=50, ignore_eos=True))]

    async def run() -> list[Any]:
        out: asyncio.Queue[Any] = asyncio.Queue()
        await asyncio.wrap_future(process.submit(request, out))
        items = [(await out.get())[1]]  # generation has started
        await asyncio.to_thread(process.stop)
        while not isinstance(items[-1], BaseException) and not items[-1].finished:
            items.append((await out.get())[1])
        with pytest.raises(RuntimeError, match="not running"):
            await asyncio.wrap_future(process.submit(request, out))
        return items

    items = asyncio.run(run())
    assert isinstance(items[-1], RuntimeError) and "shutting down" in str(items[-1])
    assert len(items) < 40 and not process.running
    assert process.process is not None and process.process.exitcode == 0  # it left by itself, not terminated


_SERVE = """
import sys
sys.path.insert(0, {tests!r})
from server_helpers import make_app
from mcore_inference.server.cli import run_server
app = make_app("process", "slow")
print(app.state.engine_loop.process.pid, flush=True)
run_server(app, host="127.0.0.1", port={port}, shutdown_timeout={timeout}, log_level="warning")
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@linux_only
@pytest.mark.parametrize(("timeout", "max_tokens", "finishes"), [(10.0, 30, True), (0.3, 60, False)])
def test_sigterm_finishes_or_cuts_streams_and_both_processes_exit(
    timeout: float, max_tokens: int, finishes: bool
) -> None:
    port = _free_port()
    script = _SERVE.format(tests=str(TESTS), port=port, timeout=timeout)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        engine_pid = int(proc.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        family = [engine_pid, *procs.children(proc.pid)]
        body = {"model": MODEL, "prompt": "last words", "max_tokens": max_tokens, "stream": True, "temperature": 0.0,
                "ignore_eos": True}  # fmt: skip
        done = False
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as reply:
            lines = reply.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            text = json.loads(first[len("data: ") :])["choices"][0]["text"]
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            try:
                for line in lines:
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: {") and '"text"' in line:
                        text += json.loads(line[len("data: ") :])["choices"][0]["text"]
            except httpx.HTTPError:
                pass  # the connection was cut at the shutdown timeout
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - signalled
        assert proc.returncode == 0, err[-2000:]
        assert "Traceback" not in err
        if finishes:
            assert done and text == reference("last words", max_tokens)  # it ran to its end within the timeout
        else:
            assert not done and took < timeout + 5  # cut at the timeout, then the engine stopped at once
        assert _wait_gone(family, 10) == [], "a process of the server outlived it"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


_ORPHAN = """
import functools, sys, time
sys.path.insert(0, {tests!r})
from server_helpers import make_engine
from mcore_inference.server.engine_process import EngineProcess
process = EngineProcess(functools.partial(make_engine), start_timeout=120)
process.start()
print(process.process.pid, flush=True)
time.sleep(600)
"""


@linux_only
def test_a_killed_server_leaves_no_engine_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN.format(tests=str(TESTS))], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        engine_pid = int(proc.stdout.readline())
        assert procs.alive(engine_pid)
        proc.kill()  # no shutdown at all: the engine process sees its pipe close
        proc.wait(10)
        assert _wait_gone([engine_pid], 10) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
