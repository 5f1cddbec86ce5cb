"""The Mixture-of-Agents layers (Wang et al. 2024, arXiv 2406.04692).

Layer 1's proposers answer the prompt. Each later layer's proposers get the prompt again with the previous layer's
answers inside the aggregate-and-synthesize system message; the aggregator does the same with the last layer's
answers and writes the final answer, streamed. A proposer that fails is dropped and reported; a layer with fewer
than `min_ok` answers stops the run with a `MoAError` naming every failure.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from .client import CallError, MoAClient
from .config import Agent, MoAConfig, load_config
from .report import CallRecord, MoAReport


class MoAError(RuntimeError):
    """A mixture that could not answer; `report` holds every call made up to then."""

    def __init__(self, message: str, report: MoAReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class MoAResult:
    """The final answer, the report of every call and each layer's answers (None where a proposer failed)."""

    answer: str
    report: MoAReport
    layers: list[list[str | None]] = field(default_factory=list)
    finish_reason: str | None = None


def as_messages(prompt: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A prompt as chat messages: a string becomes one user message; a message list is checked and copied."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("the prompt is empty; pass the question to answer")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) and "role" in m for m in prompt):
        raise ValueError("the prompt must be a string or a non-empty list of {role, content} messages")
    return [dict(message) for message in prompt]


def aggregate_message(template: str, answers: list[str]) -> str:
    """The aggregate-and-synthesize system text with `answers` numbered in place of `{responses}`."""
    return template.format(responses="\n\n".join(f"{i}. {answer.strip()}" for i, answer in enumerate(answers, 1)))


def with_system(messages: list[dict[str, Any]], parts: list[str]) -> list[dict[str, Any]]:
    """`messages` with `parts` added to the system message (after the caller's own system text, if any)."""
    parts = [part for part in parts if part]
    if not parts:
        return messages
    text = "\n\n".join(parts)
    if messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


class MoARun:
    """One run of a mixture: iterate `stream()` for the final answer's text, then read `result()`."""

    def __init__(self, config: MoAConfig, prompt: str | list[dict[str, Any]], client: MoAClient, *,
                 stream: bool = True) -> None:
        self.config = config
        self.messages = as_messages(prompt)
        self.client = client
        self.streamed = stream
        self.report = MoAReport()
        self.layers: list[list[str | None]] = []
        self.answer = ""
        self.finish_reason: str | None = None

    def _record(self, agent: Agent, layer: int, role: str, index: int) -> CallRecord:
        endpoint = self.config.endpoint_of(agent)
        record = CallRecord(endpoint=endpoint.name, base_url=endpoint.base_url, model=agent.model, layer=layer,
                            role=role, index=index)
        self.report.calls.append(record)
        return record

    def _messages(self, agent: Agent, previous: list[str] | None) -> list[dict[str, Any]]:
        parts = [agent.system or ""]
        if previous is not None:
            parts.append(aggregate_message(self.config.aggregate_prompt, previous))
        return with_system(self.messages, parts)

    async def _propose(self, layer: int, index: int, agent: Agent, previous: list[str] | None) -> str | None:
        record = self._record(agent, layer, "proposer", index)
        body = {**agent.body(), "messages": self._messages(agent, previous)}
        try:
            text = await self.client.complete(self.config.endpoint_of(agent), body, record)
        except CallError:
            return None
        if not text.strip():
            record.error = "answered with empty text"
            return None
        return text

    async def stream(self) -> AsyncIterator[str]:
        """Run the layers, then yield the aggregator's answer as it arrives; raises `MoAError` when it cannot."""
        start = time.monotonic()
        try:
            previous: list[str] | None = None
            for number, agents in enumerate(self.config.layers, 1):
                answers = list(await asyncio.gather(*(self._propose(number, i, agent, previous)
                                                      for i, agent in enumerate(agents))))
                self.layers.append(answers)
                kept = [answer for answer in answers if answer is not None]
                if len(kept) < self.config.min_ok:
                    failed = [call for call in self.report.calls if call.layer == number and not call.ok]
                    raise MoAError(f"layer {number}: {len(kept)} of {len(agents)} proposers answered, min_ok is "
                                   f"{self.config.min_ok}; failed: " + "; ".join(
                                       f"{c.endpoint} ({c.model} at {c.base_url}): {c.error}" for c in failed),
                                   self.report)
                previous = kept
            agent = self.config.aggregator
            record = self._record(agent, len(self.config.layers) + 1, "aggregator", 0)
            body = {**agent.body(), "messages": self._messages(agent, previous)}
            endpoint = self.config.endpoint_of(agent)
            try:
                if self.streamed:
                    async for piece in self.client.stream(endpoint, body, record):
                        self.answer += piece
                        yield piece
                else:
                    self.answer = await self.client.complete(endpoint, body, record)
                    yield self.answer
            except CallError as error:
                raise MoAError(f"the aggregator failed: {error}", self.report) from None
            self.finish_reason = record.finish_reason
        finally:
            self.report.total_s = time.monotonic() - start

    def result(self) -> MoAResult:
        """The answer and report (after `stream()` is exhausted)."""
        return MoAResult(answer=self.answer, report=self.report, layers=self.layers,
                         finish_reason=self.finish_reason)


def _config(config: MoAConfig | str | os.PathLike[str]) -> MoAConfig:
    return config if isinstance(config, MoAConfig) else load_config(config)


async def run_moa(config: MoAConfig | str | os.PathLike[str], prompt: str | list[dict[str, Any]], *,
                  stream: bool = True, on_text: Callable[[str], None] | None = None,
                  client: MoAClient | None = None) -> MoAResult:
    """Run a mixture on `prompt` (a string or chat messages); `on_text` gets the final answer's pieces as they come.

    `config` is a `MoAConfig` or the path of a YAML config. A `client` shared between runs keeps its connections and
    concurrency limits; without one, a client is made and closed here. Raises `MoAError` when a layer gets fewer than
    `min_ok` answers or the aggregator fails (its `report` says which calls failed and why).
    """
    config = _config(config)
    own = client is None
    client = client or MoAClient(config.endpoints)
    try:
        run = MoARun(config, prompt, client, stream=stream)
        async for piece in run.stream():
            if on_text is not None:
                on_text(piece)
        return run.result()
    finally:
        if own:
            await client.aclose()


def run_moa_sync(config: MoAConfig | str | os.PathLike[str], prompt: str | list[dict[str, Any]], *,
                 stream: bool = True, on_text: Callable[[str], None] | None = None) -> MoAResult:
    """`run_moa` from synchronous code (it runs its own event loop; call `run_moa` inside one)."""
    return asyncio.run(run_moa(config, prompt, stream=stream, on_text=on_text))
