"""MoABackend as a chat model: behind a tiny OpenAI-style server of this test, used by the real `openai` client.

The server here is a test fixture written against the ChatBackend protocol of the serve contract (moekit.serve's own
app serves the backend in production; its tests are the serve package's).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

pytest.importorskip("httpx", reason="moekit.moa needs httpx (moekit[serve])")
pytest.importorskip("uvicorn", reason="the test servers need uvicorn (moekit[serve])")
pytest.importorskip("openai", reason="the client side of this test is the openai package (moekit[dev])")

import openai
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from moekit.moa import MoABackend, MoAConfig, MoAError, load_moa_backend
from moekit.serve.backend import ChatParams

from .moa_stubs import Stub, StubServers, closed_port_url, words


def backend_app(backend) -> Starlette:
    """/v1/chat/completions over one ChatBackend: SSE chunks and [DONE], or one JSON answer; 502 on MoAError."""

    async def chat(request: Request):
        body = await request.json()
        params = ChatParams(max_tokens=body.get("max_tokens"), temperature=body.get("temperature", 1.0),
                            top_p=body.get("top_p", 1.0), stop=body.get("stop") or [], seed=body.get("seed"))
        deltas = backend.chat_stream(body["messages"], params)
        if not body.get("stream"):
            text, last = "", None
            try:
                async for delta in deltas:
                    text, last = text + delta.text, delta
            except MoAError as error:
                return JSONResponse({"error": {"message": str(error), "type": "upstream_error"}}, 502)
            return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": backend.name,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": last.finish_reason}],
                                 "usage": {"prompt_tokens": last.usage.prompt_tokens,
                                           "completion_tokens": last.usage.completion_tokens,
                                           "total_tokens": last.usage.prompt_tokens + last.usage.completion_tokens}})

        async def events():
            base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": backend.name}
            async for delta in deltas:
                choice = {"index": 0, "delta": {"content": delta.text} if delta.text else {},
                          "finish_reason": delta.finish_reason}
                chunk = {**base, "choices": [choice]}
                if delta.usage is not None:
                    chunk["usage"] = {"prompt_tokens": delta.usage.prompt_tokens,
                                      "completion_tokens": delta.usage.completion_tokens,
                                      "total_tokens": delta.usage.prompt_tokens + delta.usage.completion_tokens}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture
def serve_backend():
    """Start a server for a backend; yields a function backend -> base_url; stops the servers at the end."""
    running = []

    def start(backend) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(backend_app(backend), log_level="error", lifespan="off",
                                               timeout_graceful_shutdown=1))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the backend server did not start"
            time.sleep(0.01)
        running.append((server, thread))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=5)


@pytest.fixture
def stubs():
    running = StubServers()
    yield running
    running.close()


def mixture(tmp_path, stubs, down: bool = False):
    a, b, agg = stubs.start(Stub("A")), stubs.start(Stub("B")), stubs.start(Stub("C", chunk_delay=0.02))
    path = tmp_path / "moa.yaml"
    path.write_text(json.dumps({
        "name": "trio",
        "endpoints": {"a": a.url, "b": {"base_url": closed_port_url() if down else b.url, "max_retries": 0},
                      "agg": agg.url},
        "proposers": [{"endpoint": "a", "model": "pa"}, {"endpoint": "b", "model": "pb"}],
        "aggregator": {"endpoint": "agg", "model": "big", "max_tokens": 64}, "min_ok": 1}))
    return load_moa_backend(path), (a, b, agg)


def test_openai_client_streams_from_the_mixture(tmp_path, stubs, serve_backend):
    backend, (a, b, agg) = mixture(tmp_path, stubs)
    assert backend.name == "moa:trio"
    client = openai.OpenAI(base_url=serve_backend(backend), api_key="unused", timeout=20, max_retries=0)
    stream = client.chat.completions.create(model="moa:trio", messages=[{"role": "user", "content": "2+2?"}],
                                            stream=True, max_tokens=7, seed=5, stop=["END"])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == agg.requests[0]["answer"] and len(chunks) > 5  # the aggregator's words, streamed through
    assert chunks[-1].choices[0].finish_reason == "stop"
    calls = [*a.requests, *b.requests, *agg.requests]
    assert chunks[-1].usage.prompt_tokens == sum(words(m["content"]) for r in calls for m in r["body"]["messages"])
    assert chunks[-1].usage.completion_tokens == sum(words(r["answer"]) for r in calls)  # summed over the mixture
    # the request's max_tokens, seed and stop reach the aggregator; the proposers keep their own
    assert {k: agg.requests[0]["body"].get(k) for k in ("max_tokens", "seed", "stop")} == {
        "max_tokens": 7, "seed": 5, "stop": ["END"]}
    assert "seed" not in a.requests[0]["body"] and a.requests[0]["body"]["max_tokens"] == 512
    assert [call.role for call in backend.last_report.calls] == ["proposer", "proposer", "aggregator"]



def test_async_openai_client_with_a_proposer_down(tmp_path, stubs, serve_backend):
    backend, (_, _, agg) = mixture(tmp_path, stubs, down=True)
    url = serve_backend(backend)

    async def ask():
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", timeout=20, max_retries=0)
        try:
            return await client.chat.completions.create(model="moa:trio", messages=[{"role": "user",
                                                                                       "content": "hi"}])
        finally:
            await client.close()

    answer = asyncio.run(ask())
    assert answer.choices[0].message.content == agg.requests[0]["answer"]
    failed = backend.last_report.failures
    assert [c.endpoint for c in failed] == ["b"] and failed[0].error.startswith("connection failed")


def test_backend_satisfies_the_serve_protocol_when_serve_is_installed(tmp_path):
    serve = pytest.importorskip("moekit.serve.backend", reason="moekit.serve (branch i18-serve) is not merged here")
    backend = MoABackend(MoAConfig.from_dict({"endpoints": {"e": "http://127.0.0.1:9/v1"}, "layers": 0,
                                              "aggregator": {"endpoint": "e", "model": "m"}}))
    assert isinstance(backend, serve.ChatBackend)
