"""Tiny served models for the `moekit serve` tests: an HF Qwen3 folder with a chat template, a moekit run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from .merge_fixtures import make_dense_model

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('this template has no role ' + message['role']) }}{% endif %}"
    "{{ message['role'] }} : {{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)
"""A small template over the test tokenizer's words: "<s>role : content</s>..." then "assistant : "."""


def make_chat_model(path: Path, family: str = "qwen3", seed: int = 0) -> Path:
    """A tiny random HF model of `family` whose tokenizer carries `CHAT_TEMPLATE`."""
    from transformers import AutoTokenizer

    make_dense_model(path, family, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(path))
    return path


def make_tiny_run(path: Path) -> Path:
    """A tiny-mixtral moekit run at `path` (byte tokenizer, no chat template), trained 2 steps on a small corpus."""
    from moekit.train.loop import Trainer

    from .run_helpers import TEXT, small_run

    corpus = path.parent / f"{path.name}-corpus.txt"
    corpus.write_text(TEXT)
    run = small_run("tiny-mixtral", corpus, "train.max_steps=2", "train.eval_interval=2",
                    "train.checkpoint_interval=2", "train.tokenizer=byte", "model.max_position_embeddings=256")
    Trainer(run, path, progress=False).train()
    return path


@contextlib.contextmanager
def served(paths: list[Path], api_key: str | None = None, max_batch: int = 8, max_queue: int = 64,
           max_tokens_limit: int | None = None, extra_backends: list | None = None) -> Iterator[tuple[str, object]]:
    """A server for `paths` (plus `extra_backends`) on 127.0.0.1, port 0; yields (base URL, app)."""
    from moekit.serve.app import create_app
    from moekit.serve.engine import LocalBackend, Scheduler
    from moekit.serve.models import load_served_model
    from moekit.serve.server import server_in_thread

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: one thread is many times faster than two
    try:
        scheduler = Scheduler(max_batch=max_batch, max_queue=max_queue)
        backends = [LocalBackend(load_served_model(path), scheduler, max_tokens_limit) for path in paths]
        app = create_app([*backends, *(extra_backends or [])], scheduler, api_key=api_key)
        with server_in_thread(app, timeout=20) as url:
            yield url, app
    finally:
        torch.set_num_threads(threads)
