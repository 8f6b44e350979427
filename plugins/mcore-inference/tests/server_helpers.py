"""What the ``mcore serve`` tests share: toy engines (built in this process or, by a picklable factory, in an engine
process), a live uvicorn server on a free port, the greedy reference, and waiting for every KV block to be free.

The engine variants are module-level classes so that a spawned engine process can import them by name.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import uvicorn
from mcore_inference.engine import LLMEngine
from mcore_inference.server.app import build_app
from mcore_inference.server.engine_process import EngineProcess
from toy_model import ToyLM, greedy_reference

from mcore.data.tokenizer import ByteTokenizer

MODEL = "toy"
MAX_LEN = 64
GREEDY: dict[str, Any] = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
MODES = ("thread", "process")


class SlowToy(ToyLM):
    """The toy model, 20 ms per call: a stream lasts long enough to leave it in the middle."""

    def forward(self, tokens: torch.Tensor, *, ctx: Any = None) -> torch.Tensor:
        time.sleep(0.02)
        return super().forward(tokens, ctx=ctx)


class Exploding(ToyLM):
    """The toy model, failing on any step that holds token 7: a bug in the model, not a bad request."""

    def forward(self, tokens: torch.Tensor, *, ctx: Any = None) -> torch.Tensor:
        if bool((tokens == 7).any()):
            raise RuntimeError("boom")
        return super().forward(tokens, ctx=ctx)


class SoftToy(ToyLM):
    """The toy model with logits of O(1) (the plain one's are ~1e4): a ``logit_bias`` of 100 forces a token."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        with torch.no_grad():
            self.head.weight.mul_(1e-4)


_MODELS = {"toy": ToyLM, "slow": SlowToy, "exploding": Exploding, "soft": SoftToy}


def make_engine(kind: str = "toy", **kwargs: Any) -> LLMEngine:
    """A toy engine (byte tokenizer, 256 blocks of 4); ``kind``: toy, slow, exploding or soft. Picklable by name."""
    torch.set_num_threads(1)  # also in an engine process, which does not run conftest
    model = _MODELS[kind](vocab=257, max_len=MAX_LEN).eval()
    return LLMEngine(model, tokenizer=ByteTokenizer(), block_size=4, num_blocks=kwargs.pop("num_blocks", 256), **kwargs)


def make_app(mode: str, kind: str = "toy", *, max_waiting: int | None = None, **kwargs: Any) -> Any:
    """``build_app`` over a toy engine in a thread or in an engine process (``app_kwargs`` go to ``build_app``)."""
    app_kwargs = kwargs.pop("app_kwargs", {})
    if mode == "thread":
        return build_app(make_engine(kind, **kwargs), model_name=MODEL, max_waiting=max_waiting, **app_kwargs)
    assert mode == "process", mode
    process = EngineProcess(functools.partial(make_engine, kind, **kwargs), max_waiting=max_waiting, start_timeout=120)
    return build_app(process, model_name=MODEL, **app_kwargs)


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 at a free port, in a thread, until the block ends; yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        app.state.engine_loop.stop()  # already stopped by the lifespan; a failed start leaves a process otherwise


@functools.cache
def _reference_model() -> ToyLM:
    return ToyLM(vocab=257, max_len=MAX_LEN).eval()  # seeded: the same weights as every engine's


def reference_ids(prompt: str, max_tokens: int) -> list[int]:
    """The greedy token ids of the full-sequence toy model."""
    return greedy_reference(_reference_model(), ByteTokenizer().encode(prompt).tolist(), max_tokens)


def reference(prompt: str, max_tokens: int) -> str:
    """The greedy text of the full-sequence toy model."""
    return ByteTokenizer().decode(reference_ids(prompt, max_tokens))


def stats(app: Any) -> dict[str, Any]:
    return app.state.engine_loop.stats().result(10)  # type: ignore[no-any-return]


def all_free(app: Any, timeout: float = 10.0) -> bool:
    """Whether the engine is idle with every block free, waiting up to ``timeout`` for aborts to land."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = stats(app)
        if not now["has_unfinished"] and now["all_free"] and now["live_requests"] == 0:
            return True
        time.sleep(0.02)
    return False
