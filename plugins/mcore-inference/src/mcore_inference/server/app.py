"""``build_app``: the FastAPI application of ``mcore serve`` (OpenAI's completions and chat completions API).

Why it exists: it is the HTTP face of an ``EngineClient`` (the engine in a thread, ``EngineLoop``, or in its own
process, ``EngineProcess``). Each route checks the API key, reads the body (at most
``max_body_bytes``: else 413), validates it (400 naming the field), checks the model name (404), turns prompts or
messages into token ids (a prompt that leaves no room in the context: 400 ``context_length_exceeded``), submits
its requests (``n`` per prompt) as one group and answers at once (``usage`` always) or as server-sent events.
A group refused because ``max_waiting`` requests already wait is a 429 (OpenAI's ``rate_limit_exceeded``); an
engine that is not running (shutting down, or its process died) is a 503. ``/metrics`` is Prometheus text
(``metrics.py``); ``/health`` is 200 while the engine runs, else 503.

A request's engine requests are aborted as soon as its client goes away (a stream closed early, or a client that
disconnects while waiting for a non-streaming answer), so their KV blocks go back at once.

Logprobs are of the distribution after penalties and temperature (see ``sampling.py``); a token's string is its
``tokenizer.decode([id])`` (a byte-level token that ends inside a character decodes to U+FFFD).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from mcore.errors import UserError
from mcore_inference.engine import LLMEngine
from mcore_inference.lockstep import LockstepEngine
from mcore_inference.sampling import SamplingParams
from mcore_inference.server.chat_template import ChatTemplate, tokenizer_template
from mcore_inference.server.client import EngineClient, Item
from mcore_inference.server.engine_core import EngineFailed, EngineStopped, QueueFull, ServedOutput, check_max_waiting
from mcore_inference.server.engine_loop import EngineLoop
from mcore_inference.server.errors import APIError, from_validation
from mcore_inference.server.metrics import render as render_metrics
from mcore_inference.server.protocol import MAX_CHOICES, ChatCompletionRequest, CompletionRequest
from mcore_inference.server.sse import ChunkTemplate, coalesce, dumps

_log = logging.getLogger(__name__)

#: Default request body limit (bytes).
MAX_BODY_BYTES = 4 << 20
#: Default seconds a client may take to send its whole body: a stalled or trickling uploader is answered 408 and its
#: connection let go, instead of holding it open for ever.
BODY_TIMEOUT_S = 30.0
#: ``max_tokens`` when a request gives none and the engine has no ``max_model_len`` to fill.
DEFAULT_MAX_TOKENS = 256
#: The request fields an error's ``param`` may name.
_PARAM_NAMES = frozenset(CompletionRequest.model_fields) | frozenset(ChatCompletionRequest.model_fields)
#: How often a non-streaming request checks whether its client is still there (seconds).
_DISCONNECT_POLL = 0.2


def build_app(
    engine_or_client: Any,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    chat_template: str | None = None,
    max_waiting: int | None = None,
    body_timeout: float = BODY_TIMEOUT_S,
) -> FastAPI:
    """The server's app over an ``LLM``, an ``LLMEngine`` or the leader's ``LockstepEngine`` (served from a thread:
    an ``EngineLoop`` over it, refusing requests while ``max_waiting`` wait), or an ``EngineProcess`` (its own
    ``max_waiting``). The engine
    is started with the app (its lifespan) and stopped with it; ``app.state.engine_loop`` is the client.
    ``chat_template``: a Jinja template (default: the tokenizer's, else the plain one of ``chat_template.py``).
    ``body_timeout``: seconds a request's body may take to arrive (408 after)."""
    from mcore_inference.server.engine_process import EngineProcess

    check_max_waiting(max_waiting, "build_app")
    client: EngineClient
    if isinstance(engine_or_client, EngineProcess):
        if max_waiting is not None:
            raise UserError("build_app max_waiting: give it to the EngineProcess (it admits the requests)")
        engine_or_client.start()  # spawns the engine process (the tokenizer comes from it); a no-op once started
        client = engine_or_client
    elif isinstance(engine_or_client, LockstepEngine):  # the leader of ranks serving a sharded model (ep)
        if not engine_or_client.is_leader:
            raise UserError(
                f"build_app: rank {engine_or_client.rank} of the lockstep group follows (call its follow()); "
                "allowed: the leader, group rank 0, serves"
            )
        client = EngineLoop(engine_or_client, max_waiting=max_waiting)
    else:
        engine = getattr(engine_or_client, "engine", engine_or_client)
        if not isinstance(engine, LLMEngine):
            raise UserError(
                f"build_app needs an LLM, an LLMEngine or an EngineProcess, got {type(engine_or_client).__name__}"
            )
        client = EngineLoop(engine, max_waiting=max_waiting)
    try:
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise UserError(f"max_body_bytes = {max_body_bytes!r}: must be a positive int")
        if isinstance(body_timeout, bool) or not isinstance(body_timeout, (int, float)) or not 0 < body_timeout < 1e9:
            raise UserError(f"body_timeout = {body_timeout!r}: must be a number of seconds > 0")
        tokenizer = client.tokenizer
        eos = getattr(tokenizer, "eos_token", "") if tokenizer is not None else ""
        template = ChatTemplate(
            chat_template if chat_template is not None else tokenizer_template(tokenizer), eos_token=str(eos or "")
        )
    except BaseException:
        client.stop()  # an engine process started above ends with the failed build
        raise

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        client.start()
        try:
            yield
        finally:
            await asyncio.to_thread(client.stop)

    app = FastAPI(title="mcore serve", lifespan=lifespan)
    app.state.engine_loop = client
    server = _Server(client, model_name, api_key, max_body_bytes, template, float(body_timeout))

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None  # the queue drains within seconds
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = from_validation(list(exc.errors()))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail))
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        ok = client.running
        return JSONResponse({"status": "ok" if ok else "stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            stats = await asyncio.wrap_future(client.stats())
        except EngineStopped as exc:
            raise APIError(503, str(exc), code="engine_unavailable") from None
        return Response(render_metrics(stats, model_name), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        server.check_key(request)
        card = {"id": model_name, "object": "model", "created": server.created, "owned_by": "mcore"}
        card["max_model_len"] = client.max_model_len
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.chat(request)

    return app


class _Group:
    """One HTTP request's engine requests: submitted together, their outputs in arrival order, and aborted when the
    HTTP request ends before they finish (``close``)."""

    def __init__(self, engine_loop: EngineClient, requests: Sequence[tuple[Sequence[int], SamplingParams]]) -> None:
        self.engine_loop = engine_loop
        self.requests = list(requests)
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.ids: list[int] = []
        self.pending = set(range(len(self.requests)))
        self.closed = False

    async def start(self) -> None:
        future = self.engine_loop.submit(self.requests, self.queue)
        try:
            self.ids = await asyncio.shield(asyncio.wrap_future(future))
        except UserError as exc:
            raise APIError(400, str(exc), param=_param_named(str(exc))) from None
        except QueueFull as exc:
            raise APIError(429, str(exc), code="rate_limit_exceeded") from None
        except asyncio.CancelledError:  # the client left while the group was being added: abort it once added
            future.add_done_callback(self._abort_when_added)
            raise
        except EngineStopped as exc:
            raise APIError(503, str(exc), code="engine_unavailable") from None

    def _abort_when_added(self, future: concurrent.futures.Future[list[int]]) -> None:
        if future.exception() is None:
            self.engine_loop.abort(future.result())

    async def batches(self) -> AsyncIterator[list[tuple[int, ServedOutput]]]:
        """What arrived since the last batch: everything the queue holds once it holds something, each request's
        outputs merged into one (``sse.coalesce``; requests in the order they first appear). A stream that falls
        behind the engine thus catches up in one pass. An engine failure raises (after the outputs before it)."""
        queue = self.queue
        while self.pending:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            by_tag: dict[int, list[ServedOutput]] = {}
            failure: APIError | None = None
            for tag, item in items:
                if isinstance(item, BaseException):
                    self.pending.discard(tag)
                    failure = _failure(item)
                    break
                by_tag.setdefault(tag, []).append(item)
                if item.finished:
                    self.pending.discard(tag)
            if by_tag:
                yield [(tag, outs[0] if len(outs) == 1 else coalesce(outs)) for tag, outs in by_tag.items()]
            if failure is not None:
                raise failure

    def close(self) -> None:
        """Abort what has not finished (its blocks go back); idempotent."""
        if not self.closed:
            self.closed = True
            self.engine_loop.abort([self.ids[i] for i in sorted(self.pending) if i < len(self.ids)])
            self.pending.clear()


def _failure(exc: BaseException) -> APIError:
    """The HTTP error of an engine that failed a request: 503 if it stopped, else 500."""
    if isinstance(exc, EngineStopped):
        return APIError(503, str(exc), code="engine_unavailable")
    detail = str(exc) if isinstance(exc, EngineFailed) else f"{type(exc).__name__}: {exc}"
    return APIError(500, f"the engine failed: {detail}")


class _EventStream(StreamingResponse):
    """A server-sent event stream that calls ``on_close`` however it ends (finished, or the client went away).

    A client that goes away ends the stream inside Starlette; a cancellation that reaches here is the server's
    (uvicorn cancels the responses still open when its graceful shutdown times out): the stream ends quietly,
    its requests aborted, rather than with an error traceback in the log."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:
            _log.info("a stream was cut at shutdown; its requests are aborted")
        finally:
            self._on_close()


class _Server:
    """The routes' shared logic (one per app: its engine loop, model name, key, limits and chat template)."""

    def __init__(
        self,
        engine_loop: EngineClient,
        model_name: str,
        api_key: str | None,
        max_body_bytes: int,
        template: ChatTemplate,
        body_timeout: float = BODY_TIMEOUT_S,
    ) -> None:
        self.engine_loop, self.model_name = engine_loop, model_name
        self.api_key, self.max_body_bytes, self.template = api_key, max_body_bytes, template
        self.body_timeout = body_timeout
        self.tokenizer = engine_loop.tokenizer
        self.max_model_len = engine_loop.max_model_len
        self.created = int(time.time())

    # ----- request checks -----

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(
                401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
            )

    async def read_body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes: the limit is {limit}", code="request_too_large")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise APIError(413, f"request body over the limit of {limit} bytes", code="request_too_large")
                    chunks.append(chunk)
        except TimeoutError:
            raise APIError(
                408, f"request body not received within {self.body_timeout:g} s", code="request_timeout"
            ) from None
        except ClientDisconnect:  # nobody to answer; a 400 instead of an "Exception in ASGI application" traceback
            raise APIError(400, "the client went away while sending its body", code="client_disconnected") from None
        return b"".join(chunks)

    async def parse(self, request: Request, kind: type[Any]) -> Any:
        self.check_key(request)
        body = await self.read_body(request)
        try:
            parsed = kind.model_validate_json(body)
        except ValidationError as exc:
            raise from_validation(list(exc.errors())) from None
        if parsed.model != self.model_name:
            raise APIError(
                404,
                f"model {parsed.model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return parsed

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, "this server's model has no tokenizer: send prompts as token ids", param="prompt")
        return [int(i) for i in self.tokenizer.encode(text)]

    def check_length(self, ids: list[int], param: str) -> None:
        limit = self.max_model_len
        if limit is not None and len(ids) >= limit:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this model's context holds {limit} with room for at least one "
                "generated token: shorten it",
                param=param,
                code="context_length_exceeded",
            )

    def max_tokens(self, asked: int | None, prompt_len: int) -> int:
        if asked is not None:
            return asked
        limit = self.max_model_len
        return max(1, limit - prompt_len) if limit is not None else DEFAULT_MAX_TOKENS

    def params(self, req: Any, max_tokens: int, logprobs: int | None) -> SamplingParams:
        try:
            return req.sampling_params(max_tokens=max_tokens, logprobs=logprobs)  # type: ignore[no-any-return]
        except UserError as exc:
            raise APIError(400, str(exc), param=_param_named(str(exc))) from None

    def top_by_text(self, entry: dict[int, float]) -> dict[str, float]:
        """``{token text: logprob}``, most likely first; tokens that decode alike (byte pieces of a character: all
        U+FFFD) keep the likeliest one's value."""
        out: dict[str, float] = {}
        for token_id, value in sorted(entry.items(), key=lambda kv: -kv[1]):
            out.setdefault(self.token_text(token_id), value)
        return out

    def token_text(self, token_id: int) -> str:
        return "" if self.tokenizer is None else str(self.tokenizer.decode([token_id]))

    # ----- running a group -----

    async def collect(self, request: Request, group: _Group) -> dict[int, ServedOutput]:
        """Every request's final output; aborts the group if the client disconnects first."""

        async def run() -> dict[int, ServedOutput]:
            last: dict[int, ServedOutput] = {}
            async for batch in group.batches():
                last.update(batch)
            return last

        task = asyncio.ensure_future(run())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise APIError(499, "the client disconnected")
        finally:
            if not task.done():
                task.cancel()
            group.close()

    # ----- /v1/completions -----

    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = await self.parse(request, CompletionRequest)
        prompts = self.completion_prompts(req.prompt, req.n)
        for ids in prompts:
            self.check_length(ids, "prompt")
        scored = req.echo and req.logprobs is not None  # the echoed prompt carries its tokens' logprobs
        requests = []
        for ids in prompts:
            params = self.params(req, self.max_tokens(req.max_tokens, len(ids)), req.logprobs)
            if scored:
                params = dataclasses.replace(params, prompt_logprobs=req.logprobs)
            requests += [(ids, p) for p in _choices(params, req.n)]
        group = _Group(self.engine_loop, requests)
        await group.start()
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echoes = [self.tokenizer.decode(ids) if req.echo and self.tokenizer is not None else "" for ids in prompts]
        echoes = [echoes[i // req.n] for i in range(len(requests))]
        echoed = [prompts[i // req.n] for i in range(len(requests))]
        prompt_tokens = sum(len(ids) for ids in prompts)
        if req.stream:
            events = self.completion_events(req, group, rid, created, echoes, echoed, prompt_tokens)
            return _EventStream(events, group.close)
        final = await self.collect(request, group)
        choices = []
        for i in range(len(requests)):
            out = final[i]
            lp = None
            if req.logprobs is not None:
                lp = self.completion_logprobs(out.token_ids, out.logprobs, out.top_logprobs, len(echoes[i]))
                if scored:
                    lp = _joined(self.prompt_logprobs(echoed[i], out), lp)
            choices.append(
                {
                    "index": i,
                    "text": echoes[i] + out.text,
                    "logprobs": lp,
                    "finish_reason": out.finish_reason,
                    "stop_reason": out.stop_reason,
                }
            )
        completion_tokens = sum(len(out.token_ids) for out in final.values())
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": choices,
                "usage": _usage(prompt_tokens, completion_tokens),
            }
        )

    def completion_prompts(self, prompt: Any, n: int = 1) -> list[list[int]]:
        """The prompts' token ids; a 400 for an empty prompt, or for more than ``MAX_CHOICES`` prompts x ``n``
        (checked before anything is encoded)."""
        if isinstance(prompt, str):
            return [self.encode(prompt)]
        if not prompt:
            raise APIError(400, "prompt is empty: give a string, a list of strings or token ids", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        if len(prompt) * n > MAX_CHOICES:
            raise APIError(
                400,
                f"prompt holds {len(prompt)} prompts x n = {n}: {len(prompt) * n} choices; allowed: at most "
                f"{MAX_CHOICES} a request (send the rest in other requests)",
                param="prompt",
            )
        return [self.encode(p) if isinstance(p, str) else list(p) for p in prompt]

    def completion_logprobs(
        self, ids: Sequence[int], logprobs: Sequence[float] | None, top: Sequence[dict[int, float]] | None, offset: int
    ) -> dict[str, Any]:
        """OpenAI's legacy completions shape: parallel lists of tokens, their logprobs, top dicts, text offsets."""
        logprobs, top = logprobs or [], top or []
        tokens = [self.token_text(t) for t in ids[: len(logprobs)]]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": list(logprobs),
            "top_logprobs": [self.top_by_text(entry) for entry in top],
            "text_offset": offsets,
        }

    def prompt_logprobs(self, ids: Sequence[int], out: ServedOutput) -> dict[str, Any]:
        """The echoed prompt's part of a completions ``logprobs``: its first token has none (null), as OpenAI's."""
        part = self.completion_logprobs(ids[1:], out.prompt_logprobs, out.prompt_top_logprobs, 0)
        first = self.token_text(ids[0])
        part["tokens"] = [first, *part["tokens"]]
        part["token_logprobs"] = [None, *part["token_logprobs"]]
        part["top_logprobs"] = [None, *part["top_logprobs"]]
        part["text_offset"] = [0, *(offset + len(first) for offset in part["text_offset"])]
        return part

    async def completion_events(
        self,
        req: CompletionRequest,
        group: _Group,
        rid: str,
        created: int,
        echoes: list[str],
        echoed: list[list[int]],
        prompt_tokens: int,
    ) -> AsyncIterator[str]:
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        template = ChunkTemplate(head, chat=False)
        offsets = [len(e) for e in echoes]
        completion_tokens = 0
        scored = req.echo and req.logprobs is not None  # each echo waits for its prompt's logprobs (first delta)
        pending = set(range(len(echoes))) if scored else set()
        for i, text in enumerate(echoes):
            if text and not scored:
                yield dumps(head | {"choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": None}]})
        try:
            async for batch in group.batches():  # one write per batch: every event of it in one string
                events = []
                for tag, out in batch:
                    if tag in pending and out.prompt_logprobs is not None:
                        pending.discard(tag)
                        scores = self.prompt_logprobs(echoed[tag], out)
                        echo = {"index": tag, "text": echoes[tag], "logprobs": scores, "finish_reason": None}
                        events.append(dumps(head | {"choices": [echo]}))
                    completion_tokens += len(out.new_token_ids)
                    if not (out.new_text or out.finished or (req.logprobs is not None and out.new_token_ids)):
                        continue
                    if req.logprobs is None:
                        events.append(template.event(tag, out.new_text, _finish(out), out.stop_reason))
                        continue
                    lp = self.completion_logprobs(
                        out.new_token_ids, out.new_logprobs, out.new_top_logprobs, offsets[tag]
                    )
                    offsets[tag] += len(out.new_text)
                    choice = {"index": tag, "text": out.new_text, "logprobs": lp, "finish_reason": _finish(out),
                              "stop_reason": out.stop_reason}  # fmt: skip
                    events.append(dumps(head | {"choices": [choice]}))
                if events:
                    yield "".join(events)
        except APIError as exc:
            yield dumps(exc.body())
        if req.include_usage:
            yield dumps(head | {"choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield dumps("[DONE]")

    # ----- /v1/chat/completions -----

    async def chat(self, request: Request) -> Response:
        req: ChatCompletionRequest = await self.parse(request, ChatCompletionRequest)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = (
                self.template.render(messages)
                if self.template.source is None
                else (
                    await asyncio.to_thread(self.template.render, messages)  # a slow template stalls no other request
                )
            )
        except UserError as exc:
            raise APIError(400, str(exc), param="messages") from None
        ids = self.encode(prompt)
        self.check_length(ids, "messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.params(req, self.max_tokens(asked, len(ids)), logprobs)
        group = _Group(self.engine_loop, [(ids, p) for p in _choices(params, req.n)])
        await group.start()
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return _EventStream(self.chat_events(req, group, rid, created, len(ids)), group.close)
        final = await self.collect(request, group)
        choices = []
        for i in range(req.n):
            out = final[i]
            lp = self.chat_logprobs(out.token_ids, out.logprobs, out.top_logprobs) if req.logprobs else None
            message = {"role": "assistant", "content": out.text}
            choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": out.finish_reason,
                            "stop_reason": out.stop_reason})  # fmt: skip
        completion_tokens = sum(len(out.token_ids) for out in final.values())
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": self.model_name,
                "choices": choices,
                "usage": _usage(len(ids), completion_tokens),
            }
        )

    def chat_logprobs(
        self, ids: Sequence[int], logprobs: Sequence[float] | None, top: Sequence[dict[int, float]] | None
    ) -> dict[str, Any]:
        """The chat shape: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``."""
        content = []
        for token_id, value, entry in zip(ids, logprobs or [], top or []):
            text = self.token_text(token_id)
            alts = []
            for alt, alt_value in entry.items():
                alt_text = self.token_text(alt)
                alts.append({"token": alt_text, "logprob": alt_value, "bytes": list(alt_text.encode())})
            content.append({"token": text, "logprob": value, "bytes": list(text.encode()), "top_logprobs": alts})
        return {"content": content}

    async def chat_events(
        self, req: ChatCompletionRequest, group: _Group, rid: str, created: int, prompt_tokens: int
    ) -> AsyncIterator[str]:
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        for i in range(req.n):
            role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            yield dumps(head | {"choices": [role]})
        template = ChunkTemplate(head, chat=True)
        completion_tokens = 0
        try:
            async for batch in group.batches():  # one write per batch: every event of it in one string
                events = []
                for tag, out in batch:
                    completion_tokens += len(out.new_token_ids)
                    if not (out.new_text or out.finished or (req.logprobs and out.new_token_ids)):
                        continue
                    if not req.logprobs:
                        events.append(template.event(tag, out.new_text, _finish(out), out.stop_reason))
                        continue
                    lp = self.chat_logprobs(out.new_token_ids, out.new_logprobs, out.new_top_logprobs)
                    delta = {"content": out.new_text} if out.new_text else {}
                    choice = {"index": tag, "delta": delta, "logprobs": lp, "finish_reason": _finish(out),
                              "stop_reason": out.stop_reason}  # fmt: skip
                    events.append(dumps(head | {"choices": [choice]}))
                if events:
                    yield "".join(events)
        except APIError as exc:
            yield dumps(exc.body())
        if req.include_usage:
            yield dumps(head | {"choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield dumps("[DONE]")


def _param_named(message: str) -> str | None:
    """The request field a ``SamplingParams`` error names (``SamplingParams.logit_bias[5] = ...``, ``logit_bias key
    'abc': ...`` -> ``logit_bias``), for the error body's ``param``; None when it names none."""
    match = re.match(r"(?:SamplingParams\.)?([a-z_]+)\b", message)
    if match is None or match.group(1) not in _PARAM_NAMES:
        return None
    return match.group(1)


def _choices(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The params of ``n`` choices: with a ``seed``, choice ``j`` draws with ``seed + j`` (the engine's draws depend
    only on the seed and the position, so one seed would give ``n`` equal choices); choice 0 is what ``n=1`` gives."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=(params.seed + j) % 2**64) for j in range(n)]


def _joined(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two completions ``logprobs`` parts, one after the other (their offsets already absolute)."""
    return {key: [*first[key], *second[key]] for key in first}


def _finish(out: ServedOutput) -> str | None:
    return out.finish_reason if out.finished else None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
