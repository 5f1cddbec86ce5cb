"""Async chat completions against OpenAI-compatible endpoints, with httpx.

Per base_url a semaphore bounds the requests in flight; each try has the endpoint's timeouts; a connection error,
a timeout, a 429 or a 5xx is retried with exponential backoff and jitter, waiting at least the server's Retry-After
(a stream is retried only while it has produced no text). Streams are read as server-sent events.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from .config import Endpoint
from .report import CallRecord

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
"""Statuses worth another try (the rest of 4xx would fail the same way again)."""


class CallError(RuntimeError):
    """A call that failed for good (after its retries); `record.error` says why."""

    def __init__(self, record: CallRecord) -> None:
        super().__init__(f"{record.endpoint} ({record.model} at {record.base_url}): {record.error}")
        self.record = record


class _Failure(Exception):
    """One failed try: what happened, whether another try may help, and the server's Retry-After (s)."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _status_failure(response: httpx.Response) -> _Failure:
    """A failure from a non-200 answer, with the server's own error message when it sent one."""
    detail = ""
    try:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        detail = str(error.get("message") if isinstance(error, dict) else error or body)
    except (ValueError, UnicodeDecodeError):
        detail = response.text[:200]
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    message = f"HTTP {response.status_code}" + (f": {detail.strip()}" if detail.strip() else "")
    if retry_after is not None:
        message += f" (Retry-After {retry_after:g} s)"
    return _Failure(message, response.status_code in RETRY_STATUS, retry_after)


def _transport_failure(error: Exception, endpoint: Endpoint) -> _Failure:
    if isinstance(error, httpx.TimeoutException):
        return _Failure(f"timed out after {endpoint.timeout_s:g} s ({type(error).__name__})", True)
    return _Failure(f"connection failed ({type(error).__name__}: {error or 'no detail'})", True)


async def _sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The `data` of each server-sent event (multi-line data joined by newlines; comments and other fields skipped)."""
    lines: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            lines.append(value[1:] if value.startswith(" ") else value)
    if lines:
        yield "\n".join(lines)


def _choice(data: Any) -> dict[str, Any] | None:
    choices = data.get("choices") if isinstance(data, dict) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return None


def _usage(record: CallRecord, data: Any) -> None:
    usage = data.get("usage") if isinstance(data, dict) else None
    if isinstance(usage, dict):
        for key in ("prompt_tokens", "completion_tokens"):
            if isinstance(usage.get(key), int):
                setattr(record, key, usage[key])


class MoAClient:
    """Chat completions over a set of endpoints; one per event loop (it holds an `httpx.AsyncClient`)."""

    def __init__(self, endpoints: dict[str, Endpoint], *, transport: httpx.AsyncBaseTransport | None = None,
                 seed: int | None = None) -> None:
        self.endpoints = endpoints
        self._keys = {name: endpoint.api_key() for name, endpoint in endpoints.items()}  # a missing key: now
        self._http = httpx.AsyncClient(transport=transport)
        self._random = random.Random(seed)
        limits: dict[str, int] = {}
        for endpoint in endpoints.values():
            limits[endpoint.base_url] = min(limits.get(endpoint.base_url, endpoint.max_concurrency),
                                            endpoint.max_concurrency)
        self._slots = {url: asyncio.Semaphore(limit) for url, limit in limits.items()}

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> MoAClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def backoff(self, endpoint: Endpoint, retry: int, retry_after: float | None) -> float:
        """Delay before retry number `retry` (1-based): exponential with jitter, never under Retry-After."""
        ceiling = min(endpoint.max_backoff_s, endpoint.backoff_s * 2 ** (retry - 1))
        delay = ceiling * self._random.uniform(0.5, 1.0)
        return delay if retry_after is None else max(delay, retry_after)

    async def complete(self, endpoint: Endpoint, body: dict[str, Any], record: CallRecord) -> str:
        """The answer of a non-streamed call; raises `CallError` (with `record.error` set) when it fails for good."""
        return "".join([piece async for piece in self._call(endpoint, body, record, stream=False)])

    def stream(self, endpoint: Endpoint, body: dict[str, Any], record: CallRecord) -> AsyncIterator[str]:
        """The answer's text as it streams; raises `CallError` when it fails for good."""
        return self._call(endpoint, body, record, stream=True)

    async def _call(self, endpoint: Endpoint, body: dict[str, Any], record: CallRecord,
                    stream: bool) -> AsyncIterator[str]:
        url = endpoint.base_url + "/chat/completions"
        headers = {"Accept": "text/event-stream" if stream else "application/json"}
        if self._keys.get(endpoint.name):
            headers["Authorization"] = f"Bearer {self._keys[endpoint.name]}"
        body = {**body, "stream": stream}
        if stream and endpoint.stream_usage:
            body["stream_options"] = {"include_usage": True}
        timeout = httpx.Timeout(endpoint.timeout_s)
        start = time.monotonic()
        try:
            while True:
                emitted = False
                try:
                    async with self._slots[endpoint.base_url]:
                        if not stream:
                            response = await self._http.post(url, json=body, headers=headers, timeout=timeout)
                            if response.status_code != 200:
                                raise _status_failure(response)
                            yield self._read_whole(response, record)
                            return
                        async with self._http.stream("POST", url, json=body, headers=headers,
                                                     timeout=timeout) as response:
                            if response.status_code != 200:
                                await response.aread()
                                raise _status_failure(response)
                            async for piece in self._read_stream(response, record, start):
                                emitted = True
                                yield piece
                            return
                except (httpx.TransportError, httpx.StreamError) as error:
                    failure = _transport_failure(error, endpoint)
                except _Failure as error:
                    failure = error
                record.attempt_errors.append(failure.message)
                if emitted or not failure.retryable or record.retries >= endpoint.max_retries:
                    if emitted:
                        failure.message += " (after the stream had started)"
                    record.error = failure.message
                    raise CallError(record)
                if failure.retry_after is not None and failure.retry_after > endpoint.max_backoff_s:
                    record.error = (f"{failure.message}: the server asks to wait longer than max_backoff_s "
                                    f"({endpoint.max_backoff_s:g} s) of endpoint {endpoint.name}")
                    raise CallError(record)
                record.retries += 1
                await asyncio.sleep(self.backoff(endpoint, record.retries, failure.retry_after))
        finally:
            record.latency_s = time.monotonic() - start

    @staticmethod
    def _read_whole(response: httpx.Response, record: CallRecord) -> str:
        try:
            data = response.json()
        except ValueError:
            raise _Failure(f"the answer is not JSON: {response.text[:120]!r}", False) from None
        choice = _choice(data)
        message = choice.get("message") if choice else None
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            raise _Failure(f"the answer has no choices[0].message.content: {str(data)[:160]}", False)
        record.finish_reason = choice.get("finish_reason")
        _usage(record, data)
        return text

    @staticmethod
    async def _read_stream(response: httpx.Response, record: CallRecord, start: float) -> AsyncIterator[str]:
        done = False
        async for data in _sse_data(response):
            if data.strip() == "[DONE]":
                done = True
                break
            try:
                event = json.loads(data)
            except ValueError:
                raise _Failure(f"a stream event is not JSON: {data[:120]!r}", False) from None
            if isinstance(event, dict) and event.get("error"):
                error = event["error"]
                detail = error.get("message", error) if isinstance(error, dict) else error
                raise _Failure(f"the stream sent an error: {detail}", False)
            _usage(record, event)
            choice = _choice(event)
            if choice is None:
                continue
            if choice.get("finish_reason"):
                record.finish_reason = choice["finish_reason"]
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(text, str) and text:
                if record.first_token_s is None:
                    record.first_token_s = time.monotonic() - start
                yield text
        if not done and record.finish_reason is None:
            raise _Failure("the stream ended before its last event ([DONE] or a finish_reason)", True)
