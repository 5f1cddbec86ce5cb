"""The HTTP layer of `moekit serve`: OpenAI's routes, request validation, and errors in OpenAI's schema.

Routes: `GET /health` (never needs a key), `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`,
`POST /v1/completions` (local models only). Responses and stream chunks have OpenAI's JSON shapes
(`chat.completion`, `chat.completion.chunk`, `text_completion`), streams are server-sent events ending with
`data: [DONE]`. Every error is `{"error": {"message", "type", "param", "code"}}` with its status: 400 (the field
named in `param`), 401 (missing or wrong bearer key), 404 (unknown model or route), 413 (body or prompt too large),
503 (queue full, with `Retry-After`), 500 (a failure of the server itself; the server keeps serving).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .backend import ChatBackend, ChatParams, TextDelta
from .engine import Overloaded, RequestRejected, Scheduler

__all__ = ["MAX_BODY_BYTES", "MAX_N", "ROLES", "APIError", "create_app"]

MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted (413 beyond)."""

MAX_N = 16
"""Largest `n` (choices per request)."""

MAX_STOP = 4
"""Most stop strings per request, as OpenAI allows."""

ROLES = ("system", "developer", "user", "assistant", "tool")
"""Message roles accepted; "developer" is given to the chat template as "system"."""

RETRY_AFTER_S = 1


class APIError(Exception):
    """An error answered in OpenAI's schema: `status`, message, type, param (the field at fault), code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The error object OpenAI's clients read."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The error as a JSON response with its status and headers."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


# ----------------------------------------------------------------------------------------------- validation

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _optional_int(body: dict, key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
        raise _bad(key, f"{value!r} is not allowed: {bound}")
    return value


def _number(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not _is_number(value) or value > high or (value <= low if low_open else value < low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _bad(key, f"{value!r} is not allowed: a number in {interval}")
    return float(value)


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values) or len(values) > MAX_STOP:
        raise _bad("stop", f"{value!r} is not allowed: a non-empty string or a list of up to {MAX_STOP} of them")
    return list(values)


def parse_params(body: dict) -> ChatParams:
    """The sampling settings of a request body, or APIError(400) naming the first bad field."""
    max_tokens = _optional_int(body, "max_tokens", 1)
    completion_tokens = _optional_int(body, "max_completion_tokens", 1)
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -(2**63) <= seed < 2**64):
        raise _bad("seed", f"{seed!r} is not allowed: an integer (the same seed and request give the same text)")
    n = _optional_int(body, "n", 1, MAX_N)
    for key in ("stream", "echo"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise _bad(key, f"{body[key]!r} is not allowed: true or false")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False),
                                                                                  bool)):
        raise _bad("stream_options", f"{options!r} is not allowed: an object such as {{\"include_usage\": true}}")
    for key in ("logprobs", "top_logprobs", "tools", "functions", "suffix", "echo"):
        if body.get(key) not in (None, False, [], 0):
            raise _bad(key, "is not supported by moekit serve; leave it out")
    return ChatParams(max_tokens=completion_tokens if completion_tokens is not None else max_tokens,
                      temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                      top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
                      stop=_stop(body), seed=seed, n=n or 1)


def _content(value: Any, where: str, role: str) -> str:
    if isinstance(value, str):
        return value
    if value is None and role == "assistant":
        return ""
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}.content[{j}]", "only text parts ({\"type\": \"text\", \"text\": \"...\"}) "
                           "are served")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"{where}.content", f"{type(value).__name__} is not allowed: a string or a list of text parts")


def parse_messages(body: dict) -> list[dict[str, str]]:
    """The chat messages of a body as {"role", "content"} strings, or APIError(400) naming the bad entry."""
    messages = body.get("messages")
    if messages is None:
        raise _bad("messages", "is required: a non-empty list of {\"role\": ..., \"content\": ...} objects")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, "must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role", f"{role!r} is not a known role: one of {', '.join(ROLES)}")
        parsed.append({"role": "system" if role == "developer" else role,
                       "content": _content(message.get("content"), where, role)})
    return parsed


# ----------------------------------------------------------------------------------------------- responses

def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class EventStream(StreamingResponse):
    """Server-sent events that stop, and close their source, as soon as the client goes away."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(content, headers=headers)
        self.cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away while we wrote
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                group.start_soon(watch)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # frees the request's scheduler slots at once
                await self.cleanup()


async def _merge(streams: list[tuple[TextDelta, AsyncIterator[TextDelta]]]
                 ) -> AsyncIterator[tuple[int, TextDelta]]:
    """(choice index, delta) of all choices as they come; the sources are closed when this is."""
    queue: asyncio.Queue[tuple[int, TextDelta | BaseException]] = asyncio.Queue()

    async def pump(index: int, first: TextDelta, source: AsyncIterator[TextDelta]) -> None:
        try:
            await queue.put((index, first))
            if first.finish_reason is None:
                async for delta in source:
                    await queue.put((index, delta))
                    if delta.finish_reason is not None:
                        break
                else:
                    await queue.put((index, RuntimeError("the backend ended a stream without a finish_reason")))
        except Exception as error:
            await queue.put((index, error))
        finally:
            await source.aclose()

    tasks = [asyncio.create_task(pump(i, first, source)) for i, (first, source) in enumerate(streams)]
    finished = 0
    try:
        while finished < len(streams):
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield index, item
            finished += item.finish_reason is not None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _rejection(error: Exception) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, Overloaded):
        return APIError(503, str(error), code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(error, RequestRejected):
        code = "context_length_exceeded" if error.status == 413 else "invalid_value"
        return APIError(error.status, str(error), code=code)
    return APIError(500, f"the model failed: {type(error).__name__}: {error}", code="internal_error")


class ClientGone(Exception):
    """The client closed the connection before its answer began."""


async def _unless_gone(request: Request, awaitable: Awaitable[Any], poll_s: float = 0.1) -> Any:
    """Await `awaitable`, cancelling it (and raising ClientGone) when the client disconnects meanwhile.

    A request waiting in the queue, or a non-streamed answer being generated, thus frees its slot when its client
    goes away.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _close_all(started: list[tuple[TextDelta | None, AsyncIterator[TextDelta]]]) -> None:
    for _, source in started:
        with contextlib.suppress(RuntimeError):  # RuntimeError: one still running elsewhere closes itself
            await source.aclose()


async def _start(request: Request, open_stream: Callable[[ChatParams], AsyncIterator[TextDelta]],
                 params: ChatParams) -> list[tuple[TextDelta, AsyncIterator[TextDelta]]]:
    """Open the `n` choices together and wait for the first delta of each, so refusals come before any header.

    Choice i is asked with seed + i (when a seed is given).
    """
    sources = [aiter(open_stream(ChatParams(params.max_tokens, params.temperature, params.top_p, list(params.stop),
                                            None if params.seed is None else params.seed + index, params.n)))
               for index in range(params.n)]
    started = [(None, source) for source in sources]
    try:
        firsts = await _unless_gone(request, asyncio.gather(*(anext(source) for source in sources),
                                                            return_exceptions=True))
    except BaseException:
        await _close_all(started)
        raise
    failures = [first for first in firsts if isinstance(first, BaseException)]
    if failures:
        await _close_all(started)
        if isinstance(failures[0], StopAsyncIteration):
            raise APIError(500, "the backend streamed nothing", code="internal_error")
        if isinstance(failures[0], Exception):
            raise _rejection(failures[0]) from failures[0]
        raise failures[0]
    return list(zip(firsts, sources, strict=True))


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------------------------- the app

async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body ({length} bytes) is larger than {limit} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError) as error:
        raise APIError(400, f"the body is not valid JSON ({str(error)[:200]}); send a JSON object",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body is JSON {type(data).__name__}, not an object; send a JSON object",
                       code="invalid_json")
    return data


def create_app(backends: list[ChatBackend], scheduler: Scheduler | None = None, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The Starlette app serving `backends` by name.

    `scheduler` (whose counts /health reports) is stopped when the app shuts down, after every backend's
    `aclose()`. With `api_key`, every route but /health needs `Authorization: Bearer <api_key>`.
    """
    served: dict[str, ChatBackend] = {}
    for backend in backends:
        if backend.name in served:
            raise ValueError(f"two served models are both named {backend.name!r}; serve each name once")
        served[backend.name] = backend
    created = int(time.time())

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                           "key given to moekit serve --api-key", code="invalid_api_key")

    def lookup(body: dict) -> ChatBackend:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise _bad("model", f"{name!r} is not allowed: the id of a served model ({', '.join(served)})")
        if name not in served:
            raise APIError(404, f"the model {name!r} does not exist here; this server serves: "
                           f"{', '.join(served)}", param="model", code="model_not_found")
        return served[name]

    def guarded(handler: Callable[[Request], Awaitable[Response]], needs_key: bool = True
                ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                if needs_key:
                    authorize(request)
                return await handler(request)
            except APIError as error:
                return error.response()
            except ClientGone:  # nobody reads the answer: a status for the log only
                return Response(status_code=499)
            except Exception as error:  # never let a request take the server down
                return _rejection(error).response()
        return endpoint

    async def health(request: Request) -> Response:
        counts = {"active": scheduler.active, "waiting": scheduler.waiting} if scheduler else {}
        return JSONResponse({"status": "ok", "models": list(served), **counts})

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "moekit"}

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card(name) for name in served]})

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        lookup({"model": name})
        return JSONResponse(model_card(name))

    async def respond(request: Request, body: dict, backend: ChatBackend, chat: bool,
                      open_stream: Callable[[ChatParams], AsyncIterator[TextDelta]], params: ChatParams) -> Response:
        started = await _start(request, open_stream, params)
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": backend.name}
        prompt_tokens = completion_tokens = 0

        def count(delta: TextDelta, index: int) -> None:
            nonlocal prompt_tokens, completion_tokens
            if delta.usage is not None:
                prompt_tokens = delta.usage.prompt_tokens if index == 0 else prompt_tokens  # the prompt counts once
                completion_tokens += delta.usage.completion_tokens

        if not body.get("stream"):
            texts, reasons = [""] * params.n, [None] * params.n

            async def collect() -> None:
                merged = _merge(started)
                try:
                    async for index, delta in merged:
                        texts[index] += delta.text
                        reasons[index] = delta.finish_reason or reasons[index]
                        count(delta, index)
                finally:
                    await merged.aclose()

            try:
                await _unless_gone(request, collect())
            finally:
                await _close_all(started)
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": None, "finish_reason": reasons[i]} for i, text in enumerate(texts)]
            else:
                choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reasons[i]}
                           for i, text in enumerate(texts)]
            return JSONResponse({**head, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens),
                                 "system_fingerprint": None})

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion",
                      "system_fingerprint": None}
        if include_usage:
            chunk_head["usage"] = None

        async def events() -> AsyncIterator[str]:
            merged = _merge(started)
            seen: set[int] = set()
            try:
                async for index, delta in merged:
                    count(delta, index)
                    if chat:
                        content: dict[str, Any] = {"content": delta.text} if delta.text else {}
                        if index not in seen:
                            content = {"role": "assistant", "content": delta.text}
                            seen.add(index)
                        choice = {"index": index, "delta": content, "logprobs": None,
                                  "finish_reason": delta.finish_reason}
                    else:
                        choice = {"index": index, "text": delta.text, "logprobs": None,
                                  "finish_reason": delta.finish_reason}
                    yield _sse({**chunk_head, "choices": [choice]})
                if include_usage:
                    yield _sse({**chunk_head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
            except Exception as error:  # the headers are sent: the error goes in the stream, then it ends
                yield _sse(_rejection(error).body())
            finally:
                await merged.aclose()
            yield "data: [DONE]\n\n"

        return EventStream(events(), lambda: _close_all(started),
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def chat_completions(request: Request) -> Response:
        body = await _read_json(request, max_body_bytes)
        backend = lookup(body)
        messages = parse_messages(body)
        params = parse_params(body)
        return await respond(request, body, backend, True, lambda p: backend.chat_stream(messages, p), params)

    async def completions(request: Request) -> Response:
        body = await _read_json(request, max_body_bytes)
        backend = lookup(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise _bad("prompt", "is required: a non-empty string")
        params = parse_params(body)
        complete = getattr(backend, "complete_stream", None)
        if complete is None:
            raise APIError(400, f"{backend.name} serves chat only: use /v1/chat/completions", param="model",
                           code="unsupported_model")
        return await respond(request, body, backend, False, lambda p: complete(prompt, p), params)

    async def not_found(request: Request, error: Exception) -> Response:
        status = getattr(error, "status_code", 404)
        what = "no such route" if status == 404 else "method not allowed"
        return APIError(status, f"{what}: {request.method} {request.url.path}; the routes are GET /health, "
                        "GET /v1/models, POST /v1/chat/completions, POST /v1/completions",
                        code="not_found" if status == 404 else "method_not_allowed").response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            for backend in served.values():
                with contextlib.suppress(Exception):
                    await backend.aclose()
            if scheduler is not None:
                await asyncio.to_thread(scheduler.stop)

    routes = [Route("/health", guarded(health, needs_key=False), methods=["GET"]),
              Route("/v1/models", guarded(list_models), methods=["GET"]),
              Route("/v1/models/{model:path}", guarded(get_model), methods=["GET"]),
              Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
              Route("/v1/completions", guarded(completions), methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found})
    app.state.backends = served
    app.state.scheduler = scheduler
    return app
