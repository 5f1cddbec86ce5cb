"""`moekit serve --moa`: a real mixture (moekit.moa) over a real served model, used through the openai client.

Server A serves a tiny chat model; the mixture's proposers and aggregator are that model on A; server B serves
the mixture as `moa:NAME`. What B answers must be what the library (`run_moa_sync`) answers for the same prompt,
streamed or not, and a proposer endpoint that is down must not stop the answer.
"""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from moekit.moa import run_moa_sync  # noqa: E402
from moekit.serve.server import build_app, server_in_thread  # noqa: E402

from .serve_fixtures import make_chat_model, served  # noqa: E402

TIMEOUT = 60


def _config(path, url: str, down_url: str | None = None) -> str:
    endpoints = f"""
endpoints:
  local: {{base_url: "{url}/v1", max_concurrency: 2, timeout_s: 30, max_retries: 0}}
"""
    proposers = """
proposers:
  - {endpoint: local, model: tinyqwen, temperature: 0.8, max_tokens: 6, seed: 1}
  - {endpoint: local, model: tinyqwen, temperature: 0.8, max_tokens: 6, seed: 2}
"""
    if down_url is not None:
        endpoints += f"""  down: {{base_url: "{down_url}/v1", max_concurrency: 1, timeout_s: 2, max_retries: 0}}
"""
        proposers += """  - {endpoint: down, model: tinyqwen, max_tokens: 6}
"""
    path.write_text(f"name: tiny{endpoints}{proposers}layers: 1\n"
                    "aggregator: {endpoint: local, model: tinyqwen, temperature: 0.0, max_tokens: 8}\nmin_ok: 2\n"
                    # the tiny model's context is 256 tokens: a short aggregate-and-synthesize prompt
                    "aggregate_prompt: \"Answers:\\n{responses}\"\n")
    return str(path)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("serve-moa") / "tinyqwen")


def test_the_mixture_served_as_a_model_answers_as_the_library_does(chat_model, tmp_path):
    prompt = [{"role": "user", "content": "the king and the queen"}]
    with served([chat_model]) as (url, _):
        config = _config(tmp_path / "moa.yaml", url)
        expected = run_moa_sync(config, prompt)
        assert expected.answer and expected.report  # the library path: proposers and aggregator on server A
        app = build_app([], moa=[config])
        with server_in_thread(app, timeout=20) as moa_url:
            client = openai.OpenAI(base_url=moa_url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
            assert [m.id for m in client.models.list()] == ["moa:tiny"]
            reply = client.chat.completions.create(model="moa:tiny", messages=prompt)
            assert reply.choices[0].message.content == expected.answer
            assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
            chunks = client.chat.completions.create(model="moa:tiny", messages=prompt, stream=True)
            streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
            assert streamed == expected.answer


def test_a_proposer_endpoint_that_is_down_is_dropped_and_the_answer_still_comes(chat_model, tmp_path):
    prompt = [{"role": "user", "content": "cook bread"}]
    with served([chat_model]) as (url, _):
        with served([chat_model]) as (gone_url, _):
            pass  # a server that existed and is now shut: its port refuses
        config = _config(tmp_path / "moa.yaml", url, down_url=gone_url)
        result = run_moa_sync(config, prompt)
        failed = [call for call in result.report.calls if call.error]
        assert len(failed) == 1 and failed[0].endpoint == "down"
        app = build_app([], moa=[config])
        with server_in_thread(app, timeout=20) as moa_url:
            client = openai.OpenAI(base_url=moa_url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
            reply = client.chat.completions.create(model="moa:tiny", messages=prompt)
            assert reply.choices[0].message.content == result.answer
