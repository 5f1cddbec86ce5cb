"""Loading what `moekit serve` serves: a moekit run, a Hugging Face folder, or a GGUF file, behind one interface.

`load_served_model(path)` returns a `ServedModel`: the module, its tokenizer's encode/decode, its chat rendering,
its end-of-text ids, its context length, and `forward(ids, past)` (one step with the KV cache). Chat messages are
rendered with the tokenizer's chat template (transformers' `apply_chat_template(add_generation_prompt=True)`); a
tokenizer without one (a moekit run with a byte or BPE tokenizer) gets the plain transcript of `fallback_transcript`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ServedModel", "fallback_transcript", "load_served_model", "model_name"]

def fallback_transcript(messages: list[dict[str, str]]) -> str:
    """The prompt of a model without a chat template: one "role: content" line per message, then "assistant:"."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


@dataclass
class ServedModel:
    """A loaded model and everything generation needs from it (see the module docstring)."""

    name: str
    module: nn.Module
    context_length: int
    vocab_limit: int
    """Ids at or above this are embedding rows the tokenizer does not know: never sampled."""
    eos_ids: frozenset[int]
    encode_chat: Callable[[list[dict[str, str]]], list[int]]
    encode_prompt: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    step: Callable[[Tensor, Any], tuple[Tensor, Any]]
    """`step(ids [1, T], past)` -> (logits of the last position [1, V], new past)."""
    chat_template: bool
    source: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_step: Callable[[Tensor, Tensor, Tensor, Any], tuple[Tensor, Any]] | None = None
    """`batch_step(ids [B, T], attention_mask [B, past + T], position_ids [B, T], past)` -> (logits [B, V], past),
    for models that take padded batches (transformers' classes); None for moekit's own model."""
    pad_id: int = 0

    def forward(self, ids: list[int], past: Any) -> tuple[Tensor, Any]:
        """Logits [1, vocab_limit] after feeding `ids` on top of `past` (None for the prompt), and the new past."""
        with torch.inference_mode():
            logits, past = self.step(torch.tensor([ids], dtype=torch.long, device=self.device), past)
        return logits[:, :self.vocab_limit], past

    def forward_batch(self, ids: Tensor, mask: Tensor, positions: Tensor, past: Any) -> tuple[Tensor, Any]:
        """`batch_step` on this model's device: logits [B, vocab_limit] and the new (batched) past."""
        assert self.batch_step is not None, f"{self.name} does not take padded batches"
        with torch.inference_mode():
            logits, past = self.batch_step(ids.to(self.device), mask.to(self.device), positions.to(self.device), past)
        return logits[:, :self.vocab_limit], past


def model_name(path: str | os.PathLike[str]) -> str:
    """The id a model is served under: its folder's name, or a GGUF file's name without `.gguf`."""
    path = Path(path).expanduser().resolve()
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def _moekit_step(model: nn.Module) -> Callable[[Tensor, Any], tuple[Tensor, Any]]:
    def step(ids: Tensor, past: Any) -> tuple[Tensor, Any]:
        out = model(ids, past_key_values=past, use_cache=True, logits_to_keep=1, router_stats=False)
        return out.logits[:, -1], out.past_key_values
    return step


def _transformers_step(model: nn.Module, after: Callable[[], None] | None = None
                       ) -> Callable[[Tensor, Any], tuple[Tensor, Any]]:
    # transformers >= 5.2x names the KV cache `cache`; earlier versions `past_key_values`
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step(ids: Tensor, past: Any) -> tuple[Tensor, Any]:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: past})
        if after is not None:
            after()
        return out.logits[:, -1], getattr(out, name)
    return step


def _transformers_batch_step(model: nn.Module, after: Callable[[], None] | None = None
                             ) -> Callable[[Tensor, Tensor, Tensor, Any], tuple[Tensor, Any]]:
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def batch_step(ids: Tensor, mask: Tensor, positions: Tensor, past: Any) -> tuple[Tensor, Any]:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                    **{name: past})
        if after is not None:
            after()
        return out.logits[:, -1], getattr(out, name)
    return batch_step


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _eos_ids(*values: Any) -> frozenset[int]:
    ids: set[int] = set()
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int) and not isinstance(v, bool))
    return frozenset(ids)


def _hf_tokenizer_functions(tokenizer: Any) -> tuple[Callable, Callable, Callable, bool]:
    """encode_chat, encode_prompt, decode and whether a chat template exists, for a transformers tokenizer."""
    has_template = bool(getattr(tokenizer, "chat_template", None))

    def encode_chat(messages: list[dict[str, str]]) -> list[int]:
        if has_template:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template writes its own BOS
        return encode_prompt(fallback_transcript(messages))

    def encode_prompt(text: str) -> list[int]:
        return list(tokenizer(text)["input_ids"])

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=True))

    return encode_chat, encode_prompt, decode, has_template


def _load_run(path: Path, name: str, device: torch.device) -> ServedModel:
    from ..hf.causal_lm import HFCausalLM
    from ..train.chat import chat_renderer
    from ..train.load import load_run
    from ..train.tokenizers import HFTokenizer

    _, module, tokenizer = load_run(path, what="serve the run")
    module = module.to(device)
    batch_step = None
    if isinstance(module, HFCausalLM):
        step = _transformers_step(module.model, module.capture.clear)  # routing is recorded for training only
        batch_step = _transformers_batch_step(module.model, module.capture.clear)
        context = int(_text_config(module.model.config).max_position_embeddings)
    else:  # moekit's own model takes no padding mask: each request is decoded on its own
        step = _moekit_step(module)
        context = int(module.config.max_position_embeddings)
    pretrained = isinstance(tokenizer, HFTokenizer)
    renderer = None
    if pretrained:
        try:
            renderer = chat_renderer(tokenizer, f"the tokenizer of {path}")
        except ValueError:  # no chat template: the fallback transcript
            renderer = None

    def encode_prompt(text: str) -> list[int]:
        return tokenizer.encode_prompt(text) if pretrained else tokenizer.encode(text)

    def encode_chat(messages: list[dict[str, str]]) -> list[int]:
        if renderer is not None:
            return tokenizer.encode(renderer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return encode_prompt(fallback_transcript(messages))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True) if pretrained else tokenizer.decode(ids)

    eos = tokenizer.eos_id
    return ServedModel(name=name, module=module, context_length=context, vocab_limit=int(tokenizer.vocab_size),
                       eos_ids=_eos_ids(eos), encode_chat=encode_chat, encode_prompt=encode_prompt, decode=decode,
                       step=step, chat_template=renderer is not None, source=str(path), device=device,
                       batch_step=batch_step, pad_id=eos if eos is not None else 0)


def _load_transformers(path: Path, name: str, device: torch.device) -> ServedModel:
    from transformers import AutoTokenizer

    gguf = path.suffix.lower() == ".gguf"
    folder, extra = (path.parent, {"gguf_file": path.name}) if gguf else (path, {})
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **extra)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: transformers cannot read its tokenizer ({error}); serve a folder with "
                         "tokenizer.json (and its chat template) or a GGUF file") from error
    if gguf:
        from ..interop.gates import load_dense_model  # transformers' GGUF reader, with or without accelerate

        try:
            module = load_dense_model(folder, path.name, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"{path}: transformers cannot load the GGUF file as a causal LM ({error})") from error
    else:
        from ..hf.load import load_model

        module = load_model(path)
    module = module.to(device).eval()
    encode_chat, encode_prompt, decode, has_template = _hf_tokenizer_functions(tokenizer)
    text = _text_config(module.config)
    generation = getattr(module, "generation_config", None)
    vocab = max(len(tokenizer), 1)
    return ServedModel(name=name, module=module, context_length=int(text.max_position_embeddings),
                       vocab_limit=vocab, eos_ids=_eos_ids(tokenizer.eos_token_id, getattr(text, "eos_token_id", None),
                                                           getattr(generation, "eos_token_id", None)),
                       encode_chat=encode_chat, encode_prompt=encode_prompt, decode=decode,
                       step=_transformers_step(module), chat_template=has_template, source=str(path), device=device,
                       batch_step=_transformers_batch_step(module),
                       pad_id=next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None))


def load_served_model(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                      name: str | None = None) -> ServedModel:
    """Load a moekit run directory, a Hugging Face model folder or a `.gguf` file for serving, offline.

    The model is served as `name` (default: `model_name(path)`). Raises FileNotFoundError for a path that is none
    of these, ValueError (naming the path) when transformers or moekit cannot load it.
    """
    from ..train.rundir import is_run_config

    resolved = Path(path).expanduser()
    name = name or model_name(resolved)
    device = torch.device(device)
    if resolved.is_dir() and is_run_config(resolved):
        return _load_run(resolved, name, device)
    if (resolved.is_dir() and (resolved / "config.json").is_file()) or (
            resolved.is_file() and resolved.suffix.lower() == ".gguf"):
        return _load_transformers(resolved, name, device)
    raise FileNotFoundError(f"{os.fspath(path)!r} is not a moekit run directory, a Hugging Face model folder "
                            "(with config.json) or a .gguf file; pass one of those")
