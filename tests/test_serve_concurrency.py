"""`moekit serve` under load: 16 concurrent streams, clients that leave, a full queue, and virtual models."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import types

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from moekit.serve.backend import ChatBackend, ChatParams, TextDelta, Usage  # noqa: E402

from .serve_fixtures import make_chat_model, served  # noqa: E402

TIMEOUT = 20


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("serve-load") / "tinyqwen")


def _messages(i: int) -> list[dict[str, str]]:
    words = "the king queen dragon castle forest magic hero journey night bread soup salt oven garlic onion".split()
    return [{"role": "user", "content": f"tell a story of the {words[i]} and the {words[-1 - i]}"}]


def _slow_steps(app, name: str, delay_s: float) -> list[int]:
    """Make every model step of `name` take `delay_s` longer; returns a list whose length counts the steps."""
    model = app.state.backends[name].model
    step, batch_step, steps = model.step, model.batch_step, []

    def slow(*args):
        steps.append(1)
        time.sleep(delay_s)
        return step(*args)

    def slow_batch(*args):
        steps.append(1)
        time.sleep(delay_s)
        return batch_step(*args)

    model.step, model.batch_step = slow, slow_batch if batch_step is not None else None
    return steps


def _wait_idle(url: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(url + "/health", timeout=TIMEOUT).json()
        if health["active"] == 0 and health["waiting"] == 0:
            return health
        assert time.monotonic() < deadline, f"the scheduler did not empty: {health}"
        time.sleep(0.02)


def test_sixteen_concurrent_streams_each_get_the_answer_they_get_alone(chat_model):
    with served([chat_model], max_batch=8, max_queue=16) as (url, app):
        model = app.state.backends["tinyqwen"].model
        batch_step, batch_sizes = model.batch_step, []

        def counted(ids, *args):
            batch_sizes.append(ids.shape[0])
            return batch_step(ids, *args)

        model.batch_step = counted
        sync = openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
        alone = [sync.chat.completions.create(model="tinyqwen", messages=_messages(i), max_tokens=8, temperature=0)
                 for i in range(16)]
        assert len({reply.choices[0].message.content for reply in alone}) > 1  # the prompts give different answers

        async def stream(client, i: int) -> tuple[str, str | None, int]:
            chunks = await client.chat.completions.create(model="tinyqwen", messages=_messages(i), max_tokens=8,
                                                          temperature=0, stream=True,
                                                          stream_options={"include_usage": True})
            text, finish, tokens = "", None, 0
            async for chunk in chunks:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return text, finish, tokens

        async def all_at_once():
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
            try:
                return await asyncio.wait_for(asyncio.gather(*(stream(client, i) for i in range(16))), 3 * TIMEOUT)
            finally:
                await client.close()

        batch_sizes.clear()
        results = asyncio.run(all_at_once())
        assert max(batch_sizes) > 1 and len(batch_sizes) < 16 * 8  # requests shared forwards
        for reply, (text, finish, tokens) in zip(alone, results, strict=True):
            assert text == reply.choices[0].message.content
            assert finish == reply.choices[0].finish_reason
            assert tokens == reply.usage.completion_tokens
        _wait_idle(url)


def test_a_client_that_leaves_mid_stream_frees_its_slot(chat_model):
    with served([chat_model], max_batch=1, max_queue=0) as (url, app):
        steps = _slow_steps(app, "tinyqwen", 0.02)  # 200 tokens would take 4 s
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
        stream = client.chat.completions.create(model="tinyqwen", messages=_messages(0), max_tokens=200,
                                                temperature=0, stream=True)
        chunks = iter(stream)
        next(chunks), next(chunks)
        assert httpx.get(url + "/health", timeout=TIMEOUT).json()["active"] == 1
        stream.close()
        started = time.monotonic()
        _wait_idle(url, timeout=3)
        assert time.monotonic() - started < 2 and len(steps) < 150  # freed, not run to its end
        reply = client.chat.completions.create(model="tinyqwen", messages=_messages(1), max_tokens=3)
        assert reply.usage.completion_tokens == 3


def test_a_full_queue_answers_503_with_retry_after_and_a_queued_client_can_leave(chat_model):
    with served([chat_model], max_batch=1, max_queue=1) as (url, app):
        _slow_steps(app, "tinyqwen", 0.02)
        body = {"model": "tinyqwen", "messages": _messages(0), "max_tokens": 200, "stream": True}
        with httpx.Client(timeout=TIMEOUT) as first, first.stream("POST", url + "/v1/chat/completions",
                                                                   json=body) as running:
            assert running.status_code == 200  # headers come with the first token: it is running
            queued = _raw_post(url, {**body, "stream": False})  # a client of its own, left below
            deadline = time.monotonic() + 5
            while httpx.get(url + "/health", timeout=TIMEOUT).json()["waiting"] != 1:
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.02)
            refused = httpx.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            error = refused.json()["error"]
            assert error["code"] == "overloaded" and "--max-queue" in error["message"]
            with pytest.raises(openai.InternalServerError):
                openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0
                              ).chat.completions.create(model="tinyqwen", messages=_messages(1), max_tokens=2)
            queued.close()  # the queued client leaves: its place is freed without running
            deadline = time.monotonic() + 5
            while httpx.get(url + "/health", timeout=TIMEOUT).json()["waiting"] != 0:
                assert time.monotonic() < deadline, "the queued request that left still waits"
                time.sleep(0.02)
            assert httpx.get(url + "/health", timeout=TIMEOUT).json()["active"] == 1
        _wait_idle(url)
        assert httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 2, "stream": False},
                          timeout=TIMEOUT).status_code == 200


def _raw_post(url: str, body: dict) -> socket.socket:
    """Send a POST on a socket of its own (closing it is a client that leaves) without reading the answer."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    connection = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
                       b"Content-Type: application/json\r\nContent-Length: " + str(len(data)).encode() +
                       b"\r\n\r\n" + data)
    return connection


# ----------------------------------------------------------------------------------------------- virtual models

class ReverseBackend:
    """A stand-in virtual model: answers the last message's words in reverse order, one word per delta."""

    def __init__(self, name: str = "moa:reverse", delay_s: float = 0.0) -> None:
        self.name, self.delay_s = name, delay_s
        self.closed = False
        self.open_streams = 0
        self.calls: list[ChatParams] = []

    async def chat_stream(self, messages: list[dict], params: ChatParams):
        self.calls.append(params)
        self.open_streams += 1
        try:
            words = messages[-1]["content"].split()[::-1]
            limit = params.max_tokens or len(words)
            for i, word in enumerate(words[:limit]):
                await asyncio.sleep(self.delay_s)
                last = i == min(limit, len(words)) - 1
                yield TextDelta(("" if i == 0 else " ") + word,
                                finish_reason=("length" if limit < len(words) else "stop") if last else None,
                                usage=Usage(len(messages), min(limit, len(words))) if last else None)
        finally:
            self.open_streams -= 1

    async def aclose(self) -> None:
        self.closed = True


def test_a_virtual_backend_is_served_like_a_model_streaming_included(chat_model):
    virtual = ReverseBackend()
    assert isinstance(virtual, ChatBackend)
    with served([chat_model], extra_backends=[virtual]) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
        assert [m.id for m in client.models.list()] == ["tinyqwen", "moa:reverse"]
        ask = [{"role": "user", "content": "one two three four"}]
        reply = client.chat.completions.create(model="moa:reverse", messages=ask, seed=5, n=2)
        assert [c.message.content for c in reply.choices] == ["four three two one"] * 2
        assert [p.seed for p in virtual.calls] == [5, 6]
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (1, 8)
        chunks = list(client.chat.completions.create(model="moa:reverse", messages=ask, max_tokens=2, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "four three"
        assert chunks[-1].choices[0].finish_reason == "length"
        refused = httpx.post(url + "/v1/completions", json={"model": "moa:reverse", "prompt": "x"}, timeout=TIMEOUT)
        assert refused.status_code == 400 and "chat" in refused.json()["error"]["message"]
        virtual.delay_s = 0.05  # a long answer, left after two chunks: the backend's stream is closed
        stream = client.chat.completions.create(model="moa:reverse", messages=[{"role": "user", "content": "w " * 100}],
                                                stream=True)
        chunks = iter(stream)
        next(chunks), next(chunks)
        stream.close()
        deadline = time.monotonic() + 3
        while virtual.open_streams:
            assert time.monotonic() < deadline, "the virtual model's stream was not closed"
            time.sleep(0.02)
    assert virtual.closed  # the server closes its backends when it stops


def test_serve_moa_loads_the_mixture_through_moekit_moa(chat_model, tmp_path, monkeypatch):
    from moekit.serve.server import build_app

    loaded = []

    def load_moa_backend(path):
        loaded.append(path)
        return ReverseBackend("moa:test")

    package, module = types.ModuleType("moekit.moa"), types.ModuleType("moekit.moa.backend")
    module.load_moa_backend = load_moa_backend
    package.backend = module
    monkeypatch.setitem(sys.modules, "moekit.moa", package)
    monkeypatch.setitem(sys.modules, "moekit.moa.backend", module)
    config = tmp_path / "moa.yaml"
    app = build_app([str(chat_model)], moa=[str(config)])
    try:
        assert loaded == [str(config)] and list(app.state.backends) == ["tinyqwen", "moa:test"]
    finally:
        app.state.scheduler.stop()
    with pytest.raises(ValueError, match="nothing to serve"):
        build_app([])


def test_a_cohort_decodes_prompts_of_different_lengths_as_each_alone(chat_model):
    """One padded forward per step gives each row the tokens it gets alone, greedy or seeded, rows leaving early."""
    import torch

    from moekit.serve.engine import Cohort, Generation, GenerationJob
    from moekit.serve.models import load_served_model

    model = load_served_model(chat_model)
    prompts = [model.encode_chat(_messages(i)) + model.encode_prompt(" the" * i) for i in range(4)]
    assert len({len(p) for p in prompts}) == 4
    params = [ChatParams(temperature=0), ChatParams(temperature=1.0, seed=3), ChatParams(temperature=0.7, seed=9,
                                                                                         top_p=0.9),
              ChatParams(temperature=0, max_tokens=3)]
    limits = [10, 10, 10, 3]

    def alone(i: int) -> str:
        generation, text = Generation(model, prompts[i], params[i], limits[i]), ""
        while True:
            delta = generation.step()
            text += delta.text if delta else ""
            if delta and delta.finish_reason:
                return text

    async def together() -> list[str]:
        loop = asyncio.get_running_loop()
        jobs = [GenerationJob(Generation(model, prompts[i], params[i], limits[i]), loop) for i in range(4)]
        cohort, steps = Cohort(jobs), 0
        with torch.inference_mode():
            while not cohort.step():
                steps += 1
                if steps == 2:
                    jobs[0].cancelled = True  # a client gone: its row leaves the batch and the cache
        await asyncio.sleep(0.05)
        texts = []
        for job in jobs:
            text = ""
            while not job.queue.empty():
                text += job.queue.get_nowait().text
            texts.append(text)
        return texts

    texts = asyncio.run(together())
    assert texts[1:] == [alone(i) for i in range(1, 4)]
    assert alone(0).startswith(texts[0])


class FailingBackend:
    """A virtual model that fails: at once (`after=0`) or after `after` deltas."""

    def __init__(self, name: str, after: int) -> None:
        self.name, self.after = name, after

    async def chat_stream(self, messages: list[dict], params: ChatParams):
        for i in range(self.after):
            yield TextDelta(f"part{i} ")
        raise RuntimeError("the proposer endpoint is down")

    async def aclose(self) -> None:
        pass


def test_a_failing_backend_gives_a_500_or_an_error_event_and_the_server_goes_on(chat_model):
    with served([chat_model], extra_backends=[FailingBackend("moa:down", 0), FailingBackend("moa:half", 2)]) as (
            url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
        ask = [{"role": "user", "content": "hi"}]
        refused = httpx.post(url + "/v1/chat/completions", json={"model": "moa:down", "messages": ask},
                             timeout=TIMEOUT)
        assert refused.status_code == 500
        error = refused.json()["error"]
        assert error["type"] == "server_error" and "the proposer endpoint is down" in error["message"]
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="moa:down", messages=ask)
        with pytest.raises(openai.APIError, match="the proposer endpoint is down"):
            for _ in client.chat.completions.create(model="moa:half", messages=ask, stream=True):
                pass
        raw = httpx.post(url + "/v1/chat/completions", json={"model": "moa:half", "messages": ask, "stream": True},
                         timeout=TIMEOUT).text
        assert '"error"' in raw and raw.endswith("data: [DONE]\n\n")
        assert client.chat.completions.create(model="tinyqwen", messages=ask, max_tokens=2).choices
