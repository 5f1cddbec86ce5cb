"""What a served model is to the HTTP layer: the `ChatBackend` protocol and the values it passes.

A local model (`moekit.serve.engine.LocalBackend`) and a virtual one (a Mixture-of-Agents, `moekit.moa`) both
implement `ChatBackend`; the server serves any object that does, under its `name`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = ["ChatBackend", "ChatParams", "TextDelta", "Usage"]


@dataclass
class ChatParams:
    """Sampling settings of one request, already validated by the HTTP layer.

    `max_tokens` None means "up to the model's context"; `temperature` 0 is greedy; `stop` holds the stop strings
    (output is cut before the first one); `seed` None draws a fresh one; `n` is the number of choices asked for
    (a backend streams one choice per `chat_stream` call: the server calls it `n` times).
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1


@dataclass
class Usage:
    """Token counts of one answer: the prompt's and the completion's."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """prompt_tokens + completion_tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TextDelta:
    """A piece of streamed answer text; the last one carries `finish_reason` ("stop" | "length") and `usage`."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


@runtime_checkable
class ChatBackend(Protocol):
    """A model the server serves under `name` (the "model" id in /v1/models and in requests)."""

    name: str

    def chat_stream(self, messages: list[dict], params: ChatParams) -> AsyncIterator[TextDelta]:
        """Stream choice 0 of the answer to `messages` (OpenAI chat messages, already validated)."""
        ...

    async def aclose(self) -> None:
        """Release what the backend holds (called once when the server stops)."""
        ...
