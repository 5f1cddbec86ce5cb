"""Deterministic OpenAI-compatible stub servers for the Mixture-of-Agents tests (starlette on uvicorn, in threads).

Each stub answers `/v1/chat/completions` with "<tag>#<n> ..." (n counts its requests), records every request, the
most requests it held at once, and can inject faults: "500" (always), "429once" (429 with Retry-After first, then
answers), "slow" (waits `delay` before answering). Usage counts words: prompt = words over the messages' contents,
completion = words of the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def words(text: str) -> int:
    """The stub's token count: whitespace-separated words."""
    return len(text.split())


@dataclass
class Stub:
    """One stub server's behaviour and what it saw."""

    tag: str
    mode: str = "ok"
    delay: float = 0.0
    """Seconds before answering (mode "slow", or any mode to make requests overlap)."""
    chunk_delay: float = 0.0
    """Seconds between streamed chunks."""
    retry_after: str = "1"
    requests: list[dict[str, Any]] = field(default_factory=list)
    """Each request: body, headers, time (monotonic) and the answer given."""
    active: int = 0
    max_active: int = 0
    stream_done_at: float | None = None
    """time.monotonic() when a stream sent its last text chunk."""
    url: str = ""

    def answer_for(self, body: dict[str, Any], n: int) -> str:
        return f"{self.tag}#{n} says: the answer from model {body.get('model')} seed {body.get('seed')} is 42"

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        entry: dict[str, Any] = {"body": body, "headers": dict(request.headers), "time": time.monotonic()}
        self.requests.append(entry)
        n = len(self.requests)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.mode == "500":
                return JSONResponse({"error": {"message": f"{self.tag} broke", "type": "server_error"}}, 500)
            if self.mode == "429once" and n == 1:
                return JSONResponse({"error": {"message": "slow down", "type": "rate_limit"}}, 429,
                                    headers={"Retry-After": self.retry_after})
            answer = self.answer_for(body, n)
            entry["answer"] = answer
            usage = {"prompt_tokens": sum(words(m.get("content") or "") for m in body["messages"]),
                     "completion_tokens": words(answer)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            if not body.get("stream"):
                return JSONResponse({"id": f"c{n}", "object": "chat.completion", "model": body.get("model"),
                                     "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                                  "finish_reason": "stop"}], "usage": usage})
        finally:
            self.active -= 1
        return StreamingResponse(self._events(body, answer, usage, n), media_type="text/event-stream")

    async def _events(self, body: dict[str, Any], answer: str, usage: dict[str, int], n: int):
        def event(data: dict[str, Any]) -> str:
            return f"data: {json.dumps(data)}\n\n"

        base = {"id": f"c{n}", "object": "chat.completion.chunk", "model": body.get("model")}
        yield event({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
        for i, word in enumerate(answer.split(" ")):  # the pieces join back to the answer exactly
            await asyncio.sleep(self.chunk_delay)
            piece = word if i == 0 else " " + word
            yield event({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        self.stream_done_at = time.monotonic()
        yield event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            yield event({**base, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"


class StubServers:
    """Start stubs on 127.0.0.1, port 0, each uvicorn in its own thread; `close()` stops them all."""

    def __init__(self) -> None:
        self._running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(self, stub: Stub) -> Stub:
        app = Starlette(routes=[Route("/v1/chat/completions", stub.chat, methods=["POST"])])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off", timeout_graceful_shutdown=1))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"stub {stub.tag} did not start")
            time.sleep(0.01)
        stub.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self._running.append((server, thread))
        return stub

    def close(self) -> None:
        for server, _ in self._running:
            server.should_exit = True
        for _, thread in self._running:
            thread.join(timeout=5)
        self._running.clear()


def closed_port_url() -> str:
    """A loopback URL nothing listens on (the port was bound, then released)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
