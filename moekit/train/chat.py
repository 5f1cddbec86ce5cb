"""Chat-formatted JSONL as training data: conversations rendered with the model's chat template, loss on the
assistant's tokens only.

A `train.data` file ending in `.jsonl` holds one JSON object per line with a `messages` list
(`{"role": "user" | "assistant" | "system" | ..., "content": "..."}`), the format instruction-tuning sets use.
Each conversation is rendered with the chat template of the run's tokenizer (`tokenizer_config.json`'s
`chat_template` or `chat_template.jinja`, from `train.init_from`) through transformers' own
`apply_chat_template`, message by message: the text an assistant message adds after the prompt that asks for it
(`add_generation_prompt=True`) is trained on; everything else (system and user turns, the assistant headers) is
context only. Conversations are packed one after another into the token stream, as the rest of the data is.

The token cache stores both in one array: a token that carries no loss is stored as `id + vocab_size`
(`label_shift`), so inputs are `stored % vocab_size` and targets `stored` where it is below `vocab_size`, else
-100 (ignored by the cross-entropy). `moekit.train.data` reads and writes that array like any other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

CHAT_SUFFIX = ".jsonl"


def is_chat_source(source: str | os.PathLike[str] | None) -> bool:
    """True for a `train.data` path that names a chat JSONL file (by its `.jsonl` suffix)."""
    return source is not None and Path(source).suffix.lower() == CHAT_SUFFIX


def _template(tokenizer: Any, origin: str) -> str:
    files = getattr(tokenizer, "files", None)
    if files is None:
        raise ValueError(f"{origin} is chat JSONL, which is rendered with the model's chat template: start the run "
                         "from a Hugging Face folder (train.init_from) whose tokenizer has one, or pass plain text")
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].decode("utf-8")
    config = json.loads(files.get("tokenizer_config.json", b"{}").decode("utf-8"))
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((item.get("template") for item in template if item.get("name") == "default"), None)
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"{origin} is chat JSONL, but the tokenizer of train.init_from has no chat template "
                         "(tokenizer_config.json's chat_template or chat_template.jinja); add the base model's "
                         "template to the folder, or pass plain text")
    return template


def chat_renderer(tokenizer: Any, origin: str):
    """transformers' tokenizer around the run's tokenizer.json, with its special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    from .tokenizers import _import_tokenizers

    template = _template(tokenizer, origin)
    config = json.loads(tokenizer.files.get("tokenizer_config.json", b"{}").decode("utf-8"))
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    core = _import_tokenizers().Tokenizer.from_str(tokenizer.tokenizer_json)
    return PreTrainedTokenizerFast(tokenizer_object=core, chat_template=template, **special)


def _messages(line: str, number: int, origin: str) -> list[dict[str, Any]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{origin}, line {number}: not valid JSON ({error}); chat JSONL holds one object with a "
                         "'messages' list per line") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError(f"{origin}, line {number}: needs a non-empty 'messages' list of {{'role': ..., 'content': "
                         "...}} objects with string values")
    return messages


def render_conversation(renderer: Any, messages: list[dict[str, Any]], where: str) -> list[tuple[str, bool]]:
    """The conversation's text in pieces, each with whether it is trained on (an assistant message's own text)."""
    def render(part: list[dict[str, Any]], prompt: bool) -> str:
        return renderer.apply_chat_template(part, tokenize=False, add_generation_prompt=prompt)

    pieces: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, full = render(messages[:index], True) if index else "", render(messages[:index + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(f"{where}: the chat template does not render this conversation as a growing text "
                             "(a later turn rewrites an earlier one), so its assistant tokens cannot be marked; "
                             "use a template that appends each message")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    whole = render(messages, False)
    if not whole.startswith(done):
        raise ValueError(f"{where}: the chat template renders the whole conversation differently from its turns")
    pieces.append((whole[len(done):], False))
    return [(text, trains) for text, trains in pieces if text]


def encode_chat(text: str, tokenizer: Any, origin: str, vocab_size: int) -> torch.Tensor:
    """The JSONL `text` as one int64 stream: assistant tokens as their ids, every other token as id + vocab_size.

    Raises ValueError (naming the line) for a line that is not a conversation, for a file without any assistant
    message (nothing to train on), or for a template that cannot be split into turns.
    """
    renderer = chat_renderer(tokenizer, origin)
    parts: list[torch.Tensor] = []
    trained = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        for piece, trains in render_conversation(renderer, _messages(line, number, origin), f"{origin}, line {number}"):
            ids = tokenizer.encode_to_tensor(piece)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
                raise ValueError(f"the tokenizer produced an id outside its vocab_size {vocab_size} for {origin}, "
                                 f"line {number}; the tokenizer is inconsistent, reload it")
            trained += ids.numel() if trains else 0
            parts.append(ids if trains else ids + vocab_size)
    if not trained:
        raise ValueError(f"{origin} has no assistant message with text: chat training learns the assistant's "
                         "turns only, so there is nothing to train on")
    return torch.cat(parts)


def split_labels(window: torch.Tensor, label_shift: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of stored windows [B, T + 1]: a window's ids, and targets with -100 where no loss."""
    inputs, targets = window[:, :-1], window[:, 1:]
    if label_shift is None:
        return inputs, targets
    return inputs % label_shift, targets.masked_fill(targets >= label_shift, -100)
