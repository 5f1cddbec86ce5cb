"""The Mixture-of-Agents config: endpoints, proposer layers, the aggregator, `min_ok` and the aggregate prompt.

Read from YAML with `load_config(path)` or built from a dict with `MoAConfig.from_dict(data)`; every problem is a
`MoAConfigError` naming the field (`layers[1][0].endpoint`, `endpoints.local.timeout_s`) and what to write instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

DEFAULT_AGGREGATE_PROMPT = """\
Below are answers that several assistants gave to the user's latest message. Read them critically: some may \
be wrong, incomplete or biased. Combine what is correct and useful in them into one answer of your own that is \
accurate, complete and clearly written. Do not copy an answer as it stands, do not mention that there were \
several answers, and reply to the user directly.

Answers:
{responses}"""
"""Our wording of the aggregate-and-synthesize system message; `{responses}` becomes the numbered answers."""


class MoAConfigError(ValueError):
    """A Mixture-of-Agents config that cannot be used; the message names the field and the fix."""


@dataclass(frozen=True)
class Endpoint:
    """One OpenAI-compatible server: where it is and how it is called."""

    name: str
    base_url: str
    """Up to and including the version, e.g. `http://127.0.0.1:8000/v1` (`/chat/completions` is appended)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the bearer key (None: no Authorization header)."""
    max_concurrency: int = 4
    """Requests in flight at once to this base_url (endpoints sharing a base_url share the smallest limit)."""
    timeout_s: float = 120.0
    """Limit of each connect and each read (a stream's wait for its next chunk); a non-streamed call's whole try."""
    max_retries: int = 2
    """Retries after a connection error, a timeout, a 429 or a 5xx (0: one try only)."""
    backoff_s: float = 0.5
    """First retry delay; doubles each retry, with jitter, capped by `max_backoff_s`; a Retry-After wins if longer."""
    max_backoff_s: float = 30.0
    stream_usage: bool = True
    """Ask a streamed call for its token counts (`stream_options.include_usage`); off for servers that refuse it."""

    def api_key(self) -> str | None:
        """The key from `api_key_env`; an error naming the variable when it is set in the config but not in the env."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise MoAConfigError(f"endpoints.{self.name}.api_key_env names the environment variable "
                                 f"{self.api_key_env}, which is not set; export it or remove api_key_env")
        return key


@dataclass(frozen=True)
class Agent:
    """One call of a layer: a model on an endpoint with its sampling parameters."""

    endpoint: str
    model: str
    temperature: float = 0.7
    max_tokens: int | None = 512
    top_p: float = 1.0
    system: str | None = None
    """A system message of this agent's own (later layers put the aggregate message after it)."""
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def body(self) -> dict[str, Any]:
        """The sampling fields of a chat completion request."""
        body: dict[str, Any] = {"model": self.model, "temperature": self.temperature, "top_p": self.top_p}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stop:
            body["stop"] = list(self.stop)
        return body


@dataclass(frozen=True)
class MoAConfig:
    """A whole mixture: `layers[i]` are the proposers of layer i+1, `aggregator` writes the final answer.

    No layers at all is the single-model baseline: the aggregator answers the prompt alone.
    """

    endpoints: dict[str, Endpoint]
    layers: list[list[Agent]]
    aggregator: Agent
    name: str = "moa"
    min_ok: int = 1
    """Answers each layer needs; below it the run stops with an error naming every failure."""
    aggregate_prompt: str = DEFAULT_AGGREGATE_PROMPT

    @classmethod
    def from_dict(cls, data: Any, source: str = "the MoA config") -> MoAConfig:
        """Validate a parsed config; a `MoAConfigError` names the first wrong field."""
        return _parse(data, source)

    def endpoint_of(self, agent: Agent) -> Endpoint:
        """The endpoint an agent calls."""
        return self.endpoints[agent.endpoint]

    def with_aggregator(self, **changes: Any) -> MoAConfig:
        """A copy whose aggregator has `changes` applied (used by the server for a request's max_tokens)."""
        return replace(self, aggregator=replace(self.aggregator, **changes))


def load_config(path: str | os.PathLike[str]) -> MoAConfig:
    """Read and validate a YAML (or JSON) MoA config file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MoAConfigError(f"MoA config {path} not found (or not a file); see examples/moa/ for configs")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise MoAConfigError(f"MoA config {path} is not valid YAML: {error}") from None
    return _parse(data, str(path))


_TOP = {"name", "endpoints", "proposers", "layers", "aggregator", "min_ok", "aggregate_prompt"}
_ENDPOINT = {"base_url", "api_key_env", "max_concurrency", "timeout_s", "max_retries", "backoff_s", "max_backoff_s",
             "stream_usage"}
_AGENT = {"endpoint", "model", "temperature", "max_tokens", "top_p", "system", "seed", "stop", "samples"}


def _fail(source: str, where: str, problem: str) -> MoAConfigError:
    return MoAConfigError(f"{source}: {where} {problem}")


def _unknown(source: str, where: str, data: dict, known: set[str]) -> None:
    extra = sorted(set(data) - known)
    if extra:
        raise _fail(source, where, f"has unknown field(s) {', '.join(map(str, extra))}; "
                                   f"known: {', '.join(sorted(known))}")


def _number(source: str, where: str, value: Any, *, integer: bool = False, low: float | None = None,
            high: float | None = None, positive: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _fail(source, where, f"must be {'an integer' if integer else 'a number'}, not {value!r}")
    if not math.isfinite(value):
        raise _fail(source, where, f"must be finite, not {value!r}")
    if positive and value <= 0:
        raise _fail(source, where, f"must be > 0, not {value!r}")
    if low is not None and value < low:
        raise _fail(source, where, f"must be >= {low}, not {value!r}")
    if high is not None and value > high:
        raise _fail(source, where, f"must be <= {high}, not {value!r}")
    return value


def _text(source: str, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(source, where, f"must be a non-empty string, not {value!r}")
    return value


def _endpoint(source: str, name: str, data: Any) -> Endpoint:
    where = f"endpoints.{name}"
    if isinstance(data, str):
        data = {"base_url": data}
    if not isinstance(data, dict):
        raise _fail(source, where, "must be a mapping with base_url (and optional api_key_env, max_concurrency, "
                                   "timeout_s, max_retries)")
    _unknown(source, where, data, _ENDPOINT)
    if "base_url" not in data:
        raise _fail(source, f"{where}.base_url", "is missing; write e.g. http://127.0.0.1:8000/v1")
    url = _text(source, f"{where}.base_url", data["base_url"]).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise _fail(source, f"{where}.base_url", f"must start with http:// or https://, not {url!r}")
    kwargs: dict[str, Any] = {"name": name, "base_url": url}
    if data.get("api_key_env") is not None:
        kwargs["api_key_env"] = _text(source, f"{where}.api_key_env", data["api_key_env"])
    if "max_concurrency" in data:
        kwargs["max_concurrency"] = _number(source, f"{where}.max_concurrency", data["max_concurrency"],
                                            integer=True, low=1)
    if "max_retries" in data:
        kwargs["max_retries"] = _number(source, f"{where}.max_retries", data["max_retries"], integer=True, low=0)
    for key in ("timeout_s", "backoff_s", "max_backoff_s"):
        if key in data:
            kwargs[key] = float(_number(source, f"{where}.{key}", data[key], positive=key == "timeout_s", low=0))
    if "stream_usage" in data:
        if not isinstance(data["stream_usage"], bool):
            raise _fail(source, f"{where}.stream_usage", f"must be true or false, not {data['stream_usage']!r}")
        kwargs["stream_usage"] = data["stream_usage"]
    return Endpoint(**kwargs)


def _agents(source: str, where: str, data: Any, endpoints: dict[str, Endpoint]) -> list[Agent]:
    """One agent, or several when it has `samples: N` (Self-MoA: seeds seed, seed+1, ...)."""
    if not isinstance(data, dict):
        raise _fail(source, where, "must be a mapping with endpoint and model")
    _unknown(source, where, data, _AGENT)
    for key in ("endpoint", "model"):
        if key not in data:
            raise _fail(source, f"{where}.{key}", "is missing")
    endpoint = _text(source, f"{where}.endpoint", data["endpoint"])
    if endpoint not in endpoints:
        raise _fail(source, f"{where}.endpoint", f"names {endpoint!r}, which is not under endpoints "
                                                 f"(defined: {', '.join(endpoints) or 'none'})")
    kwargs: dict[str, Any] = {"endpoint": endpoint, "model": _text(source, f"{where}.model", data["model"])}
    if "temperature" in data:
        kwargs["temperature"] = float(_number(source, f"{where}.temperature", data["temperature"], low=0, high=2))
    if "top_p" in data:
        kwargs["top_p"] = float(_number(source, f"{where}.top_p", data["top_p"], low=0, high=1))
    if "max_tokens" in data:
        value = data["max_tokens"]
        kwargs["max_tokens"] = None if value is None else _number(source, f"{where}.max_tokens", value,
                                                                   integer=True, low=1)
    if data.get("system") is not None:
        kwargs["system"] = _text(source, f"{where}.system", data["system"])
    if data.get("seed") is not None:
        kwargs["seed"] = _number(source, f"{where}.seed", data["seed"], integer=True)
    if data.get("stop") is not None:
        stop = data["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise _fail(source, f"{where}.stop", f"must be a string or a list of non-empty strings, not {stop!r}")
        kwargs["stop"] = tuple(stop)
    samples = _number(source, f"{where}.samples", data.get("samples", 1), integer=True, low=1)
    if samples == 1:
        return [Agent(**kwargs)]
    first = kwargs.pop("seed", 0)
    return [Agent(**kwargs, seed=first + i) for i in range(samples)]


def _proposer_list(source: str, where: str, data: Any, endpoints: dict[str, Endpoint]) -> list[Agent]:
    if not isinstance(data, list) or not data:
        raise _fail(source, where, "must be a non-empty list of proposers (each: endpoint, model, ...)")
    return [agent for i, item in enumerate(data) for agent in _agents(source, f"{where}[{i}]", item, endpoints)]


def _parse(data: Any, source: str) -> MoAConfig:
    if not isinstance(data, dict):
        raise MoAConfigError(f"{source} must hold a mapping with endpoints, proposers/layers and aggregator")
    _unknown(source, "the config", data, _TOP)
    raw_endpoints = data.get("endpoints")
    if not isinstance(raw_endpoints, dict) or not raw_endpoints:
        raise _fail(source, "endpoints", "must be a mapping of name -> {base_url: ...} with at least one entry")
    endpoints = {str(name): _endpoint(source, str(name), value) for name, value in raw_endpoints.items()}

    layers_value = data.get("layers")
    if isinstance(layers_value, list):
        if "proposers" in data:
            raise _fail(source, "proposers", "cannot be given with an explicit layers list; put the proposers "
                                             "of each layer in layers, or give proposers and layers: N")
        layers = [_proposer_list(source, f"layers[{i}]", layer, endpoints) for i, layer in enumerate(layers_value)]
    else:
        count = _number(source, "layers", 1 if layers_value is None else layers_value, integer=True, low=0)
        if count and "proposers" not in data:
            raise _fail(source, "proposers", "is missing; give proposers (used in every layer) with layers: N, "
                                             "layers as a list of proposer lists, or layers: 0 for the aggregator "
                                             "alone (the single-model baseline)")
        if not count and data.get("proposers"):
            raise _fail(source, "layers", "is 0 but proposers are given; set layers: 1 or more, or drop proposers")
        proposers = _proposer_list(source, "proposers", data["proposers"], endpoints) if count else []
        layers = [list(proposers) for _ in range(count)]

    if "aggregator" not in data:
        raise _fail(source, "aggregator", "is missing; give the model that writes the final answer "
                                          "(endpoint, model, ...)")
    aggregators = _agents(source, "aggregator", data["aggregator"], endpoints)
    if len(aggregators) != 1:
        raise _fail(source, "aggregator.samples", "must be 1: the aggregator writes one answer")

    min_ok = _number(source, "min_ok", data.get("min_ok", 1), integer=True, low=1)
    smallest = min((len(layer) for layer in layers), default=min_ok)
    if min_ok > smallest:
        raise _fail(source, "min_ok", f"is {min_ok} but a layer has only {smallest} proposer(s); "
                                      f"lower min_ok or add proposers")
    prompt = DEFAULT_AGGREGATE_PROMPT
    if data.get("aggregate_prompt") is not None:
        prompt = _text(source, "aggregate_prompt", data["aggregate_prompt"])
        if "{responses}" not in prompt:
            raise _fail(source, "aggregate_prompt", "must contain {responses} where the proposers' answers go")
        try:
            prompt.format(responses="")
        except (KeyError, IndexError, ValueError) as error:
            raise _fail(source, "aggregate_prompt", f"has a brace other than {{responses}} ({error!r}); "
                                                    f"write literal braces as {{{{ and }}}}") from None
    name = _text(source, "name", data.get("name", "moa"))
    return MoAConfig(endpoints=endpoints, layers=layers, aggregator=aggregators[0], name=name, min_ok=min_ok,
                     aggregate_prompt=prompt)
