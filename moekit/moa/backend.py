"""`MoABackend`: a mixture served as one chat model (`moekit serve --moa CONFIG.yaml`, model id `moa:NAME`).

It satisfies the `ChatBackend` protocol of `moekit.serve.backend` (see /work/notes/serve_contract.md): `chat_stream`
yields the aggregator's answer as `TextDelta`s, the last one with the finish_reason and the usage summed over every
call of the mixture. The serve package is imported lazily, so this module works (and is tested) without it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .client import MoAClient
from .config import MoAConfig, load_config
from .mixture import MoARun
from .report import MoAReport


@dataclass
class _Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _TextDelta:
    text: str
    finish_reason: str | None = None
    usage: _Usage | None = None


def _delta_types() -> tuple[type, type]:
    """(TextDelta, Usage) of moekit.serve.backend, or stand-ins with the same fields when serve is not installed."""
    try:
        from ..serve.backend import TextDelta, Usage
    except ImportError:
        return _TextDelta, _Usage
    return TextDelta, Usage


class MoABackend:
    """A Mixture-of-Agents config as a streaming chat backend named `moa:<config.name>`.

    Of a request's parameters, `max_tokens`, `stop` and `seed` apply to the aggregator (its temperature and top_p
    stay those of the config: the mixture's sampling is part of its definition). `last_report` is the report of
    the latest finished request.
    """

    def __init__(self, config: MoAConfig) -> None:
        self.config = config
        self.name = "moa:" + config.name
        self._client: MoAClient | None = None
        self.last_report: MoAReport | None = None

    async def chat_stream(self, messages: list[dict[str, Any]], params: Any) -> AsyncIterator[Any]:
        """The aggregator's answer to `messages` as TextDeltas; raises `MoAError` when the mixture cannot answer."""
        text_delta, usage_type = _delta_types()
        if self._client is None:
            self._client = MoAClient(self.config.endpoints)
        changes: dict[str, Any] = {}
        if getattr(params, "max_tokens", None) is not None:
            changes["max_tokens"] = params.max_tokens
        if getattr(params, "stop", None):
            changes["stop"] = tuple(params.stop)
        if getattr(params, "seed", None) is not None:
            changes["seed"] = params.seed
        config = self.config.with_aggregator(**changes) if changes else self.config
        run = MoARun(config, messages, self._client)
        async for piece in run.stream():
            yield text_delta(text=piece)
        self.last_report = run.report
        usage = usage_type(prompt_tokens=run.report.prompt_tokens, completion_tokens=run.report.completion_tokens)
        yield text_delta(text="", finish_reason=run.finish_reason or "stop", usage=usage)

    async def aclose(self) -> None:
        """Close the connections to the endpoints."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def load_moa_backend(path: str | os.PathLike[str]) -> MoABackend:
    """A `MoABackend` from a YAML config file (what `moekit serve --moa CONFIG.yaml` calls)."""
    return MoABackend(load_config(path))
