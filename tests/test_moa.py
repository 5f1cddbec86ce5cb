"""Mixture-of-Agents against real local stub servers: layers, faults, retries, limits, streaming, config, CLI."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("httpx", reason="moekit.moa needs httpx (moekit[serve])")
pytest.importorskip("uvicorn", reason="the stub servers need uvicorn (moekit[serve])")

from moekit.moa import (
    DEFAULT_AGGREGATE_PROMPT,
    MoAConfig,
    MoAConfigError,
    MoAError,
    load_config,
    run_moa,
    run_moa_sync,
)
from moekit.moa.client import MoAClient, parse_retry_after

from .moa_stubs import Stub, StubServers, closed_port_url, words

FAST = {"timeout_s": 5, "max_retries": 0, "backoff_s": 0.05, "max_backoff_s": 5}


@pytest.fixture
def servers():
    running = StubServers()
    yield running
    running.close()


def config_for(endpoints: dict[str, str | dict], layers: list[list[str]], aggregator: str, **top) -> MoAConfig:
    """A config whose proposer i of a layer calls endpoint name `layers[l][i]` (model = endpoint name)."""
    data = {
        "endpoints": {name: {**FAST, **({"base_url": spec} if isinstance(spec, str) else spec)}
                      for name, spec in endpoints.items()},
        "layers": [[{"endpoint": name, "model": f"m-{name}", "max_tokens": 32} for name in layer]
                   for layer in layers],
        "aggregator": {"endpoint": aggregator, "model": f"m-{aggregator}", "temperature": 0.0},
        **top,
    }
    return MoAConfig.from_dict(data)


def system_of(request: dict) -> str:
    messages = request["body"]["messages"]
    return messages[0]["content"] if messages[0]["role"] == "system" else ""


def test_each_layer_sees_the_previous_answers(servers):
    a, b, c = (servers.start(Stub(tag)) for tag in ("A", "B", "C"))
    config = config_for({"a": a.url, "b": b.url, "c": c.url}, [["a", "b"], ["a", "b"], ["a", "b"]], "c")
    result = run_moa_sync(config, "What is six times seven?")
    by_answer = {r["answer"]: r for stub in (a, b, c) for r in stub.requests}
    assert len(a.requests) == len(b.requests) == 3 and len(c.requests) == 1
    for number, answers in enumerate(result.layers):
        assert len(answers) == 2 and all(answers)
        for answer in answers:
            request = by_answer[answer]
            assert request["body"]["messages"][-1] == {"role": "user", "content": "What is six times seven?"}
            system = system_of(request)
            if number == 0:
                assert system == ""  # layer 1 answers the prompt alone
            else:  # exactly the previous layer's answers, numbered, inside the aggregate message
                assert system == DEFAULT_AGGREGATE_PROMPT.format(
                    responses="\n\n".join(f"{i}. {x}" for i, x in enumerate(result.layers[number - 1], 1)))
                for older in result.layers[:number - 1]:
                    assert not any(x in system for x in older)
    aggregator_system = system_of(c.requests[0])
    assert all(answer in aggregator_system for answer in result.layers[-1])
    assert result.answer == c.requests[0]["answer"] and result.answer.startswith("C#1 ")
    # the report: one line per call, tokens from each server's usage
    report = result.report
    assert [(call.layer, call.role) for call in report.calls] == [
        (1, "proposer"), (1, "proposer"), (2, "proposer"), (2, "proposer"), (3, "proposer"), (3, "proposer"),
        (4, "aggregator")]
    for call in report.calls:
        stub = {"a": a, "b": b, "c": c}[call.endpoint]
        assert call.ok and call.retries == 0 and call.latency_s > 0 and call.base_url == stub.url
    assert report.completion_tokens == sum(words(r["answer"]) for s in (a, b, c) for r in s.requests)
    assert report.prompt_tokens == sum(words(m["content"]) for s in (a, b, c) for r in s.requests
                                       for m in r["body"]["messages"])
    assert report.to_dict()["totals"]["calls"] == 7 and "aggregator" in report.format_table()


def test_own_aggregate_prompt_and_agent_system(servers):
    a, c = servers.start(Stub("A")), servers.start(Stub("C"))
    config = MoAConfig.from_dict({
        "endpoints": {"a": a.url, "c": c.url},
        "proposers": [{"endpoint": "a", "model": "x", "system": "You are terse."}], "layers": 2,
        "aggregator": {"endpoint": "c", "model": "y"},
        "aggregate_prompt": "Merge these:\n{responses}\nEnd."})
    result = run_moa_sync(config, [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}])
    first, second = a.requests
    assert system_of(first) == "Be kind.\n\nYou are terse."
    assert system_of(second) == f"Be kind.\n\nYou are terse.\n\nMerge these:\n1. {first['answer']}\nEnd."
    assert system_of(c.requests[0]) == f"Be kind.\n\nMerge these:\n1. {second['answer']}\nEnd."
    assert result.answer == c.requests[0]["answer"]


@pytest.mark.parametrize("fault", ["down", "slow", "500", "429"])
def test_a_faulty_proposer_is_dropped_and_reported(servers, fault):
    good, agg = servers.start(Stub("G")), servers.start(Stub("C"))
    bad_spec: dict = {}
    if fault == "down":
        bad_spec = {"base_url": closed_port_url(), "max_retries": 1}
    elif fault == "slow":
        bad_spec = {"base_url": servers.start(Stub("S", delay=3.0)).url, "timeout_s": 0.4}
    elif fault == "500":
        bad_spec = {"base_url": servers.start(bad := Stub("E", mode="500")).url, "max_retries": 2}
    else:
        bad_spec = {"base_url": servers.start(bad := Stub("R", mode="429once")).url, "max_retries": 2}
    config = config_for({"good": good.url, "bad": bad_spec, "agg": agg.url}, [["good", "bad"]], "agg")
    start = time.monotonic()
    result = run_moa_sync(config, "q")
    took = time.monotonic() - start
    assert result.answer.startswith("C#1 ")
    bad_call = next(call for call in result.report.calls if call.endpoint == "bad")
    aggregator_system = system_of(agg.requests[0])
    assert good.requests[0]["answer"] in aggregator_system
    if fault == "429":  # retried after the Retry-After of 1 s, then answered
        assert bad_call.ok and bad_call.retries == 1 and result.report.retries == 1
        assert bad.requests[1]["time"] - bad.requests[0]["time"] >= 1.0 and bad_call.latency_s >= 1.0
        assert bad_call.attempt_errors == ["HTTP 429: slow down (Retry-After 1 s)"]
        assert bad.requests[1]["answer"] in aggregator_system and all(result.layers[0])
        return
    assert not bad_call.ok and result.report.failures == [bad_call] and result.layers[0][1] is None
    assert "FAILED" in result.report.format_table() and result.report.to_dict()["totals"]["failed"] == 1
    if fault == "down":
        assert bad_call.error.startswith("connection failed") and bad_call.retries == 1
    elif fault == "slow":
        assert bad_call.error.startswith("timed out after 0.4 s") and took < 2.5  # not waiting for the 3 s answer
    else:
        assert bad_call.error == "HTTP 500: E broke" and bad_call.retries == 2 and len(bad.requests) == 3
        assert len(bad_call.attempt_errors) == 3


def test_min_ok_not_met_names_every_failure(servers, tmp_path, capsys):
    good, agg = servers.start(Stub("G")), servers.start(Stub("C"))
    broken = servers.start(Stub("E", mode="500"))
    down = closed_port_url()
    config = config_for({"good": good.url, "down": down, "broken": broken.url, "agg": agg.url},
                        [["good", "down", "broken"]], "agg", min_ok=2)
    with pytest.raises(MoAError) as caught:
        run_moa_sync(config, "q")
    message = str(caught.value)
    assert message.startswith("layer 1: 1 of 3 proposers answered, min_ok is 2; failed: ")
    assert f"down (m-down at {down}): connection failed" in message
    assert f"broken (m-broken at {broken.url}): HTTP 500: E broke" in message
    assert "good" not in message and agg.requests == []  # the aggregator was never asked
    assert len(caught.value.report.failures) == 2
    # the CLI: exit status 2, the message and the table on stderr, the report still written
    from moekit.cli import main

    path = tmp_path / "moa.yaml"
    path.write_text(json.dumps({"endpoints": {"down": {"base_url": down, "max_retries": 0}},
                                "proposers": [{"endpoint": "down", "model": "x"}],
                                "aggregator": {"endpoint": "down", "model": "x"}}))
    assert main(["moa", str(path), "--prompt", "q", "--report", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "moekit moa: error: layer 1: 0 of 1 proposers answered" in err and "FAILED: connection failed" in err
    assert json.loads((tmp_path / "r.json").read_text())["totals"]["failed"] == 1


def test_per_endpoint_concurrency_limit(servers):
    limited, free, agg = servers.start(Stub("L", delay=0.3)), servers.start(Stub("F", delay=0.3)), \
        servers.start(Stub("C"))
    config = config_for({"limited": {"base_url": limited.url, "max_concurrency": 2},
                         "free": {"base_url": free.url, "max_concurrency": 8}, "agg": agg.url},
                        [["limited"] * 5 + ["free"] * 5], "agg")
    start = time.monotonic()
    result = run_moa_sync(config, "q")
    assert all(result.layers[0])
    assert limited.max_active == 2  # five calls, two at a time: three waves of 0.3 s
    assert free.max_active == 5  # the stub does see overlap when nothing limits it
    assert time.monotonic() - start >= 0.9


def test_endpoints_sharing_a_base_url_share_the_smallest_limit(servers):
    stub, agg = servers.start(Stub("L", delay=0.2)), servers.start(Stub("C"))
    config = config_for({"one": {"base_url": stub.url, "max_concurrency": 3},
                         "two": {"base_url": stub.url, "max_concurrency": 1}, "agg": agg.url},
                        [["one", "one", "two", "two"]], "agg")
    run_moa_sync(config, "q")
    assert stub.max_active == 1


def test_final_answer_streams_before_the_aggregator_finishes(servers):
    a, agg = servers.start(Stub("A")), servers.start(Stub("C", chunk_delay=0.1))
    config = config_for({"a": a.url, "agg": agg.url}, [["a"]], "agg")
    arrivals: list[tuple[float, str]] = []
    result = run_moa_sync(config, "q", on_text=lambda piece: arrivals.append((time.monotonic(), piece)))
    expected = agg.requests[0]["answer"]
    assert "".join(piece for _, piece in arrivals) == result.answer == expected
    assert len(arrivals) == len(expected.split(" "))  # one piece per streamed chunk
    assert arrivals[0][0] < agg.stream_done_at - 0.5  # the first words came well before the stub's last
    aggregator = result.report.calls[-1]
    assert aggregator.first_token_s < aggregator.latency_s - 0.5
    assert aggregator.completion_tokens == words(expected) and aggregator.finish_reason == "stop"
    assert agg.requests[0]["body"]["stream"] is True
    # --no-stream: one piece, the same text
    pieces: list[str] = []
    result = run_moa_sync(config, "q", stream=False, on_text=pieces.append)
    assert pieces == [result.answer] and agg.requests[-1]["body"]["stream"] is False


def test_stream_retries_before_text_and_stream_usage_option(servers):
    a, agg = servers.start(Stub("A")), servers.start(Stub("C", mode="429once", retry_after="0"))
    config = config_for({"a": a.url, "agg": {"base_url": agg.url, "max_retries": 1, "stream_usage": False}},
                        [["a"]], "agg")
    result = run_moa_sync(config, "q")
    aggregator = result.report.calls[-1]
    assert aggregator.ok and aggregator.retries == 1 and result.answer.startswith("C#2 ")
    assert "stream_options" not in agg.requests[-1]["body"] and aggregator.completion_tokens is None


def test_api_key_from_the_environment(servers, monkeypatch):
    a = servers.start(Stub("A"))
    data = {"endpoints": {"a": {"base_url": a.url, "api_key_env": "MOA_TEST_KEY"}},
            "layers": 0, "aggregator": {"endpoint": "a", "model": "x"}}
    monkeypatch.delenv("MOA_TEST_KEY", raising=False)
    with pytest.raises(MoAConfigError, match="MOA_TEST_KEY, which is not set"):
        run_moa_sync(MoAConfig.from_dict(data), "q")
    monkeypatch.setenv("MOA_TEST_KEY", "sk-local")
    result = run_moa_sync(MoAConfig.from_dict(data), "q")  # layers: 0 is the single-model baseline
    assert a.requests[0]["headers"]["authorization"] == "Bearer sk-local"
    assert len(result.report.calls) == 1 and system_of(a.requests[0]) == ""


def test_run_moa_is_async_and_shares_a_client(servers):
    a, agg = servers.start(Stub("A", delay=0.2)), servers.start(Stub("C"))
    config = config_for({"a": {"base_url": a.url, "max_concurrency": 1}, "agg": agg.url}, [["a"]], "agg")

    async def two_at_once():
        async with MoAClient(config.endpoints) as client:
            return await asyncio.gather(run_moa(config, "x", client=client), run_moa(config, "y", client=client))

    first, second = asyncio.run(two_at_once())
    assert first.answer and second.answer and a.max_active == 1  # the limit holds across runs on one client


def test_backoff_and_retry_after():
    config = MoAConfig.from_dict({"endpoints": {"e": {"base_url": "http://x/v1", "backoff_s": 1,
                                                      "max_backoff_s": 6}},
                                  "layers": 0, "aggregator": {"endpoint": "e", "model": "m"}})
    client = MoAClient(config.endpoints, seed=0)
    endpoint = config.endpoints["e"]
    for retry, ceiling in ((1, 1), (2, 2), (3, 4), (4, 6), (9, 6)):
        delays = [client.backoff(endpoint, retry, None) for _ in range(50)]
        assert all(ceiling * 0.5 <= d <= ceiling for d in delays) and len(set(delays)) > 1  # jittered
    assert client.backoff(endpoint, 1, 3.0) == 3.0
    asyncio.run(client.aclose())
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.5") == 0.5 and parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    import email.utils

    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 27 <= parse_retry_after(later) <= 31


@pytest.mark.parametrize(("change", "message"), [
    ({"endpoints": {}}, "endpoints must be a mapping of name"),
    ({"endpoints": {"e": {"url": "x"}}}, "endpoints.e has unknown field(s) url"),
    ({"endpoints": {"e": {"base_url": "localhost:8000"}}}, "endpoints.e.base_url must start with http://"),
    ({"endpoints": {"e": {"base_url": "http://h/v1", "timeout_s": 0}}}, "endpoints.e.timeout_s must be > 0"),
    ({"endpoints": {"e": {"base_url": "http://h/v1", "max_concurrency": 0}}}, "endpoints.e.max_concurrency must be"),
    ({"proposers": [{"endpoint": "nope", "model": "m"}]}, "proposers[0].endpoint names 'nope', which is not"),
    ({"proposers": [{"endpoint": "e"}]}, "proposers[0].model is missing"),
    ({"proposers": [{"endpoint": "e", "model": "m", "temperature": "hot"}]}, "proposers[0].temperature must be"),
    ({"proposers": [{"endpoint": "e", "model": "m", "top_p": 2}]}, "proposers[0].top_p must be <= 1"),
    ({"layers": [[{"endpoint": "e", "model": "m"}], []]}, "layers[1] must be a non-empty list"),
    ({"layers": "two"}, "layers must be an integer"),
    ({"min_ok": 3}, "min_ok is 3 but a layer has only 2 proposer(s)"),
    ({"aggregator": None}, "aggregator must be a mapping"),
    ({"aggregate_prompt": "no slot"}, "aggregate_prompt must contain {responses}"),
    ({"aggregate_prompt": "{responses} {other}"}, "aggregate_prompt has a brace other than {responses}"),
    ({"temperature": 1}, "the config has unknown field(s) temperature"),
])
def test_config_errors_name_the_field(change, message):
    data = {"endpoints": {"e": "http://127.0.0.1:9/v1"},
            "proposers": [{"endpoint": "e", "model": "m"}, {"endpoint": "e", "model": "n"}], "layers": 2,
            "aggregator": {"endpoint": "e", "model": "m"}}
    data.update(change)
    if "layers" in change and isinstance(change["layers"], list):
        del data["proposers"]
    with pytest.raises(MoAConfigError) as caught:
        MoAConfig.from_dict(data, source="moa.yaml")
    assert str(caught.value).startswith("moa.yaml: ") and message in str(caught.value)


def test_self_moa_samples_and_layers_count():
    config = MoAConfig.from_dict({
        "endpoints": {"e": "http://127.0.0.1:9/v1/"},
        "proposers": [{"endpoint": "e", "model": "m", "samples": 4, "seed": 10, "temperature": 1.0}], "layers": 2,
        "aggregator": {"endpoint": "e", "model": "m"}, "min_ok": 3})
    assert config.endpoints["e"].base_url == "http://127.0.0.1:9/v1"
    assert len(config.layers) == 2 and [a.seed for a in config.layers[1]] == [10, 11, 12, 13]
    assert {a.model for a in config.layers[0]} == {"m"} and config.layers[0][0].body()["seed"] == 10


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "moa"


def test_example_configs_are_the_variants_they_claim():
    moa = load_config(EXAMPLES / "moa.yaml")
    assert len(moa.layers) == 2 and all(len(layer) == 3 for layer in moa.layers)
    lite = load_config(EXAMPLES / "moa-lite.yaml")
    assert len(lite.layers) == 1 and len(lite.layers[0]) >= 2
    self_moa = load_config(EXAMPLES / "self-moa.yaml")
    models = {(a.endpoint, a.model) for layer in self_moa.layers for a in layer}
    seeds = [a.seed for a in self_moa.layers[0]]
    assert len(models) == 1 and len(seeds) >= 3 and len(set(seeds)) == len(seeds)
    single = load_config(EXAMPLES / "single.yaml")
    assert single.layers == []
    for config in (moa, lite, self_moa, single):  # every example runs against `moekit serve` on the default port
        assert {e.base_url for e in config.endpoints.values()} == {"http://127.0.0.1:8000/v1"}


def test_cli_prints_the_answer_and_writes_the_report(servers, tmp_path, capsys):
    from moekit.cli import main

    a, agg = servers.start(Stub("A")), servers.start(Stub("C"))
    path = tmp_path / "moa.yaml"
    path.write_text(f"endpoints:\n  a: {{base_url: '{a.url}'}}\n  c: {{base_url: '{agg.url}'}}\n"
                    "proposers:\n  - {endpoint: a, model: small}\n  - {endpoint: a, model: small, seed: 1}\n"
                    "aggregator: {endpoint: c, model: big}\n")
    assert main(["moa", str(path), "--prompt", "2+2?", "--report", str(tmp_path / "r.json")]) == 0
    out, err = capsys.readouterr()
    assert out == agg.requests[0]["answer"] + "\n"
    assert "layer  role" in err and "3 calls, 0 failed, 0 retries" in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert [c["model"] for c in report["calls"]] == ["small", "small", "big"]
    assert report["calls"][2]["completion_tokens"] == words(agg.requests[0]["answer"])
    assert main(["moa", str(path), "--prompt", "2+2?", "--no-stream"]) == 0
    assert capsys.readouterr().out == agg.requests[1]["answer"] + "\n"
    assert main(["moa", str(tmp_path / "missing.yaml"), "--prompt", "x"]) == 2
    assert "missing.yaml not found" in capsys.readouterr().err


def _moa_eval():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "moa_eval.py"
    spec = importlib.util.spec_from_file_location("moa_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_scoring_and_question_set():
    moa_eval = _moa_eval()
    assert moa_eval.contains("The answer is 42.", ["42"]) and moa_eval.contains("It's Paris!", ["paris"])
    assert not moa_eval.contains("420 or 4.2", ["42"]) and not moa_eval.contains("42.5", ["42"])
    assert not moa_eval.contains("Parisian food", ["paris"])
    assert moa_eval.contains("Carbon  dioxide (CO2).", ["carbon dioxide"])
    assert moa_eval.exact(" Paris. ", ["paris"]) and not moa_eval.exact("Paris is the capital", ["paris"])
    rows = [json.loads(line) for line in moa_eval.DATA.read_text().splitlines()]
    assert 20 <= len(rows) <= 30 and len({r["id"] for r in rows}) == len(rows)
    assert all(r["question"].endswith("?") and r["answers"] and all(a == a.lower() for a in r["answers"])
               for r in rows)
    names = list(moa_eval.variants("http://127.0.0.1:8000/v1", ["m"], 16, 3, 10, 2))
    assert [len(c.layers) for c in moa_eval.variants("http://h/v1", ["m"], 16, 3, 10, 2).values()] == [0, 1, 1, 2]
    assert names[1] == "Self-MoA (3 samples)"
