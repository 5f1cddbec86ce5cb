"""Data for ``moekit train``: tokenizers, corpus loading, a cached token dataset and a resumable batch sampler.

The pieces fit together like this::

    source = None                           # the embedded Shakespeare corpus, or a file / folder path
    tok = ByteTokenizer()                   # or BPETokenizer.train([load_corpus_text(source)], vocab_size=4096)
    ds = TokenDataset.build(source, tok, "runs/x/data", block_size=256)
    sampler = BatchSampler(ds.train, batch_size=32, block_size=256, seed=0)
    inputs, targets = sampler.next_batch()  # int64 [32, 256] each; targets are inputs shifted by one
    for inputs, targets in iter_eval_batches(ds.val, 32, 256, max_batches=8): ...

Token ids live in a file (``tokens.bin``) that is memory-mapped with :func:`torch.from_file`, as ``uint16``
when the vocabulary fits in 16 bits and ``uint32`` otherwise, so numpy is not needed: torch does not depend on
numpy, and moekit's only hard dependency is torch.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from .._files import write_json

__all__ = [
    "DOCUMENT_SEPARATOR",
    "EOS_TOKEN",
    "TEXT_SUFFIXES",
    "TOKENIZER_FILE",
    "BPETokenizer",
    "BatchSampler",
    "ByteTokenizer",
    "HFTokenizer",
    "TokenDataset",
    "Tokenizer",
    "build_tokenizer",
    "iter_eval_batches",
    "load_corpus_text",
    "load_tokenizer",
    "token_dtype",
]

EOS_TOKEN = "<|endoftext|>"
"""End-of-document token; both tokenizers give it an id of its own by default."""

DOCUMENT_SEPARATOR = f"\n\n{EOS_TOKEN}\n\n"
"""Placed between documents: between the works of the embedded corpus and between the files of a folder."""

TOKENIZER_FILE = "moekit_tokenizer.json"
"""The file that :meth:`ByteTokenizer.save`/:meth:`BPETokenizer.save` write and :func:`load_tokenizer` reads."""

HF_TOKENIZER_FILE = "tokenizer.json"
"""The ``tokenizers`` library's own file, written next to :data:`TOKENIZER_FILE` by :class:`BPETokenizer`."""

TEXT_SUFFIXES = (".txt", ".md")
"""File types :func:`load_corpus_text` reads from a folder."""

EMBEDDED_CORPUS = "shakespeare.txt.gz"
_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------- tokenizers


@runtime_checkable
class Tokenizer(Protocol):
    """What the trainer needs from a tokenizer; :class:`ByteTokenizer` and :class:`BPETokenizer` provide it."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: str | os.PathLike[str]) -> Path: ...

    def fingerprint(self) -> str: ...


def _check_special_tokens(special_tokens: Sequence[str]) -> tuple[str, ...]:
    if isinstance(special_tokens, str):
        raise TypeError(f"special_tokens must be a sequence of strings, not the string {special_tokens!r}; "
                        f"write ({special_tokens!r},)")
    specials = tuple(special_tokens)
    for tok in specials:
        if not isinstance(tok, str) or not tok:
            raise ValueError(f"special tokens must be non-empty strings, got {tok!r}")
    if len(set(specials)) != len(specials):
        raise ValueError(f"special tokens must be unique, got {list(specials)}")
    return specials


def _read_marker(directory: str | os.PathLike[str], expected_type: str | None = None) -> dict[str, Any]:
    """The tokenizer folder's marker JSON; with `expected_type`, refuse a tokenizer of another kind."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer in {os.fspath(directory)!r}: {TOKENIZER_FILE} is missing; pass the folder a tokenizer was "
            "saved to with .save(folder), e.g. a training run's output folder"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it and save the tokenizer again") from err
    if not isinstance(meta, dict) or "type" not in meta:
        raise ValueError(f"{path} has no \"type\" field; it was not written by moekit, save the tokenizer again")
    if expected_type is not None and meta["type"] != expected_type:
        kind = {"bpe": "BPE"}.get(expected_type, expected_type)
        raise ValueError(f"{path} holds a {meta['type']!r} tokenizer, not a {kind} tokenizer; "
                         "use load_tokenizer(folder) to load any kind")
    return meta


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255 are bytes, then one id per special token (by default ``<|endoftext|>``
    = 256, so ``vocab_size`` is 257).

    Special-token strings occurring in the text are encoded as their single id. Any text round-trips exactly;
    decoding ids that cut a multi-byte character gives U+FFFD replacement characters.
    """

    type_name = "byte"

    def __init__(self, special_tokens: Sequence[str] = (EOS_TOKEN,)) -> None:
        self.special_tokens = _check_special_tokens(special_tokens)
        self._special_ids = {tok: 256 + i for i, tok in enumerate(self.special_tokens)}
        # longest first, so a special token that contains another wins
        ordered = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @property
    def vocab_size(self) -> int:
        """256 byte ids plus the special tokens."""
        return 256 + len(self.special_tokens)

    @property
    def eos_id(self) -> int | None:
        """Id of ``<|endoftext|>``, or None when it is not one of the special tokens."""
        return self._special_ids.get(EOS_TOKEN)

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token, or None."""
        return self._special_ids.get(token)

    def _pieces(self, text: str) -> Iterator[str | int]:
        """Text pieces (str) and special-token ids (int), in order."""
        if self._special_re is None:
            if text:
                yield text
            return
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                yield text[pos : m.start()]
            yield self._special_ids[m.group(0)]
            pos = m.end()
        if pos < len(text):
            yield text[pos:]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        ids: list[int] = []
        for piece in self._pieces(text):
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids.extend(piece.encode("utf-8"))
        return ids

    def encode_to_tensor(self, text: str) -> torch.Tensor:
        """Like :meth:`encode` but returns a 1-D ``int64`` tensor; fast for large texts."""
        parts: list[torch.Tensor] = []
        for piece in self._pieces(text):
            if isinstance(piece, int):
                parts.append(torch.tensor([piece], dtype=torch.int64))
            else:
                parts.append(torch.frombuffer(bytearray(piece.encode("utf-8")), dtype=torch.uint8).to(torch.int64))
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD. Raises ValueError for ids outside the vocabulary."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            if 0 <= i < 256:
                out.append(i)
            elif 256 <= i < self.vocab_size:
                out += self.special_tokens[i - 256].encode("utf-8")
            else:
                raise ValueError(f"token id {i} is outside this ByteTokenizer's vocabulary of {self.vocab_size}; "
                                 "decode ids made by the same tokenizer")
        return out.decode("utf-8", errors="replace")

    def config(self) -> dict[str, Any]:
        """The JSON object :meth:`save` writes."""
        return {"type": self.type_name, "format": _FORMAT_VERSION, "special_tokens": list(self.special_tokens)}

    def fingerprint(self) -> str:
        """sha256 identifying this tokenizer's mapping (used to validate token caches)."""
        return hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode("utf-8")).hexdigest()

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``directory/moekit_tokenizer.json`` (created with its parents if needed); returns the file path."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / TOKENIZER_FILE, self.config())
        return path / TOKENIZER_FILE

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ByteTokenizer:
        """Read a tokenizer written by :meth:`save`."""
        meta = _read_marker(directory, cls.type_name)
        return cls(special_tokens=meta.get("special_tokens", ()))

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, special_tokens={list(self.special_tokens)})"


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError(
            "BPETokenizer and HFTokenizer need the optional `tokenizers` package, which is not installed; run "
            "`pip install tokenizers`, or use ByteTokenizer, which needs nothing"
        ) from err
    return tokenizers


# Cutting after a lone newline between two non-space characters never changes the byte-level pre-tokens (the
# GPT-2 split pattern makes such a newline a pre-token of its own either way), so encoding chunk by chunk gives
# exactly the ids of encoding the whole text, and the chunks encode in parallel.
_SAFE_BREAK = re.compile(r"(?<=\S)\n(?=\S)")


def _chunks(text: str, size: int = 1 << 18) -> list[str]:
    out: list[str] = []
    start = 0
    while start < len(text):
        m = _SAFE_BREAK.search(text, start + size) if start + size < len(text) else None
        end = m.end() if m else len(text)
        out.append(text[start:end])
        start = end
    return out


class BPETokenizer:
    """Byte-level BPE trained locally with the ``tokenizers`` package (an optional dependency).

    Any text round-trips exactly. Special tokens (by default ``<|endoftext|>``) get ids of their own, before the
    merged tokens. Saved as the ``tokenizers`` library's ``tokenizer.json`` (loadable by other tools too) plus
    moekit's ``moekit_tokenizer.json`` marker.
    """

    type_name = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        """Wrap a ``tokenizers.Tokenizer``; use :meth:`train` or :meth:`load` to make one."""
        self._tok = tokenizer

    @classmethod
    def train(
        cls,
        texts: Iterable[str] | str,
        vocab_size: int,
        *,
        special_tokens: Sequence[str] = (EOS_TOKEN,),
        min_frequency: int = 2,
    ) -> BPETokenizer:
        """Learn a byte-level BPE vocabulary of at most ``vocab_size`` ids (fewer if the text runs out of merges).

        ``vocab_size`` counts the 256 byte tokens and the special tokens, so it must exceed 256 + their number.
        Occurrences of a special token in ``texts`` are not merged into other tokens.
        """
        tokenizers = _import_tokenizers()
        specials = _check_special_tokens(special_tokens)
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(vocab_size, int) or not 256 + len(specials) < vocab_size <= 2**32:
            raise ValueError(f"vocab_size must be an integer above 256 + {len(specials)} special token(s) = "
                             f"{256 + len(specials)} (the byte alphabet), got {vocab_size!r}; e.g. use 4096")
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(specials),
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        n_chars = 0

        def chunked() -> Iterator[str]:
            nonlocal n_chars
            for text in texts:
                n_chars += len(text)
                yield from _chunks(text)

        tok.train_from_iterator(chunked(), trainer=trainer)
        if n_chars == 0:
            raise ValueError("BPETokenizer.train got no text; pass a non-empty list of strings, "
                             "e.g. [load_corpus_text(None)]")
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def eos_id(self) -> int | None:
        """Id of ``<|endoftext|>``, or None when the tokenizer has no such token."""
        return self.token_to_id(EOS_TOKEN)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (e.g. a special token), or None."""
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_to_tensor(self, text: str) -> torch.Tensor:
        """Like :meth:`encode` but returns a 1-D ``int64`` tensor; encodes large texts in parallel chunks."""
        encodings = self._tok.encode_batch(_chunks(text), add_special_tokens=False)
        parts = [torch.tensor(e.ids, dtype=torch.int64) for e in encodings]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 (e.g. a cut character) become U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside this BPETokenizer's vocabulary of {self.vocab_size}; "
                             "decode ids made by the same tokenizer")
        return str(self._tok.decode(list(ids), skip_special_tokens=False))

    def fingerprint(self) -> str:
        """sha256 identifying this tokenizer's mapping (used to validate token caches)."""
        return hashlib.sha256(f"{self.type_name}\n{self._tok.to_str()}".encode()).hexdigest()

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` and ``moekit_tokenizer.json`` into ``directory``; returns the marker's path."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / HF_TOKENIZER_FILE))
        write_json(path / TOKENIZER_FILE, {"type": self.type_name, "format": _FORMAT_VERSION,
                                            "tokenizer_file": HF_TOKENIZER_FILE})
        return path / TOKENIZER_FILE

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> BPETokenizer:
        """Read a tokenizer written by :meth:`save`."""
        meta = _read_marker(directory, cls.type_name)
        tokenizers = _import_tokenizers()
        hf_path = Path(directory) / meta.get("tokenizer_file", HF_TOKENIZER_FILE)
        if not hf_path.is_file():
            raise FileNotFoundError(f"{hf_path} is missing; the tokenizer folder is incomplete, save it again")
        return cls(tokenizers.Tokenizer.from_file(str(hf_path)))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


HF_COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "chat_template.jinja", "chat_template.json")
"""Files next to a ``tokenizer.json`` that :class:`HFTokenizer` carries along (transformers reads them)."""


def _config_token(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) and value else None


class HFTokenizer:
    """A pretrained model's own ``tokenizer.json`` (the ``tokenizers`` library's format), used as it is.

    This is the tokenizer of a run started from a Hugging Face checkpoint (``train.init_from``). Training text is
    encoded without the tokenizer's added special tokens (no BOS in the middle of a stream); the document
    separator ``<|endoftext|>`` of :data:`DOCUMENT_SEPARATOR` becomes the tokenizer's own end-of-text token (the
    ``eos_token`` of ``tokenizer_config.json``) when it has one. :meth:`encode_prompt` adds the special tokens the
    tokenizer adds by default (e.g. Llama's BOS), as transformers does for a prompt. The text is encoded document
    by document, never cut elsewhere, since an arbitrary pretrained pre-tokenizer may not split on newlines.

    :meth:`save` writes the original ``tokenizer.json`` byte for byte, the companion files
    (:data:`HF_COMPANION_FILES`) it came with, and moekit's ``moekit_tokenizer.json`` marker, so a run's tokenizer
    folder is also what `export_hf` copies into an exported checkpoint.
    """

    type_name = "hf"

    def __init__(self, tokenizer_json: str, files: dict[str, bytes] | None = None, source: str | None = None) -> None:
        """Wrap the text of a ``tokenizer.json``; `files` are companion files by name, `source` where it came from.

        Use :meth:`from_model_dir` or :meth:`load` to read one from a folder.
        """
        tokenizers = _import_tokenizers()
        try:
            self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as err:  # the tokenizers library raises a bare Exception for a bad file
            raise ValueError(f"tokenizer.json{f' in {source}' if source else ''} is not a tokenizer the `tokenizers` "
                             f"library reads ({err}); pass the folder of a Hugging Face model with a fast tokenizer"
                             ) from err
        self._json = tokenizer_json
        self.files = dict(files or {})
        self.source = source
        config: dict[str, Any] = {}
        if "tokenizer_config.json" in self.files:
            try:
                config = json.loads(self.files["tokenizer_config.json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"tokenizer_config.json{f' in {source}' if source else ''} is not valid JSON "
                                 f"({err}); fix or delete it") from err
        eos = _config_token(config, "eos_token") if isinstance(config, dict) else None
        if eos is None or self._tok.token_to_id(eos) is None:
            eos = EOS_TOKEN if self._tok.token_to_id(EOS_TOKEN) is not None else None
        self.eos_token = eos
        """The end-of-text token that separates documents, or None when the tokenizer has none."""
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(int(self._tok.get_vocab_size(with_added_tokens=True)),
                               max(vocab.values(), default=-1) + 1)

    @classmethod
    def from_model_dir(cls, directory: str | os.PathLike[str]) -> HFTokenizer:
        """Read ``tokenizer.json`` (and its companion files) from a Hugging Face model folder."""
        path = Path(directory).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{os.fspath(directory)!r} is not a folder; pass the Hugging Face model folder "
                                    "whose tokenizer.json to use")
        if not (path / HF_TOKENIZER_FILE).is_file():
            present = [name for name in ("tokenizer.model", "vocab.json", "vocab.txt") if (path / name).is_file()]
            what = f" (it has {', '.join(present)}, a slow-tokenizer format)" if present else ""
            raise FileNotFoundError(
                f"{path} has no {HF_TOKENIZER_FILE}{what}; moekit reads a model's tokenizer from its tokenizer.json: "
                "copy the base model's tokenizer files (tokenizer.json, tokenizer_config.json) into the folder, or "
                "write them with transformers' AutoTokenizer.from_pretrained(...).save_pretrained(folder)")
        files = {name: (path / name).read_bytes() for name in HF_COMPANION_FILES if (path / name).is_file()}
        return cls((path / HF_TOKENIZER_FILE).read_text(encoding="utf-8"), files, source=str(path.resolve()))

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (special tokens included): the embedding rows a model needs at least."""
        return self._vocab_size

    @property
    def eos_id(self) -> int | None:
        """Id of :attr:`eos_token`, or None."""
        return self._tok.token_to_id(self.eos_token) if self.eos_token is not None else None

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None."""
        return self._tok.token_to_id(token)

    def encode_to_tensor(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` as a 1-D ``int64`` tensor (documents encoded in parallel)."""
        eos = self.eos_id
        documents = text.split(EOS_TOKEN) if eos is not None else [text]
        encodings = self._tok.encode_batch(documents, add_special_tokens=False)
        parts: list[torch.Tensor] = []
        for i, encoding in enumerate(encodings):
            if i:
                parts.append(torch.tensor([eos], dtype=torch.int64))
            parts.append(torch.tensor(encoding.ids, dtype=torch.int64))
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, as training data is encoded (no added BOS; separators become EOS)."""
        return self.encode_to_tensor(text).tolist()

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt with the special tokens the tokenizer adds by default (e.g. a leading BOS)."""
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ids outside the vocabulary raise ValueError."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside this tokenizer's vocabulary of {self.vocab_size}; "
                             "decode ids made by the same tokenizer")
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def fingerprint(self) -> str:
        """sha256 of the kind, the end-of-text token and the tokenizer itself (keys the token cache)."""
        return hashlib.sha256(f"{self.type_name}\n{self.eos_token}\n{self._tok.to_str()}".encode()).hexdigest()

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json``, the companion files and ``moekit_tokenizer.json``; returns the marker's path."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        for name, data in [(HF_TOKENIZER_FILE, self._json.encode("utf-8")), *sorted(self.files.items())]:
            tmp = path / f"{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, path / name)
        write_json(path / TOKENIZER_FILE, {"type": self.type_name, "format": _FORMAT_VERSION,
                                            "tokenizer_file": HF_TOKENIZER_FILE, "files": sorted(self.files),
                                            "source": self.source})
        return path / TOKENIZER_FILE

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> HFTokenizer:
        """Read a tokenizer written by :meth:`save`."""
        meta = _read_marker(directory, cls.type_name)
        path = Path(directory)
        hf_path = path / meta.get("tokenizer_file", HF_TOKENIZER_FILE)
        if not hf_path.is_file():
            raise FileNotFoundError(f"{hf_path} is missing; the tokenizer folder is incomplete, save it again")
        names = meta.get("files", [name for name in HF_COMPANION_FILES if (path / name).is_file()])
        missing = [name for name in names if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{path / missing[0]} is missing; the tokenizer folder is incomplete, "
                                    "save it again")
        files = {name: (path / name).read_bytes() for name in names}
        return cls(hf_path.read_text(encoding="utf-8"), files, source=meta.get("source"))

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos_token={self.eos_token!r}, source={self.source!r})"


def build_tokenizer(train_config: Any) -> ByteTokenizer | BPETokenizer | HFTokenizer:
    """The tokenizer a training config asks for (duck-typed on ``moekit.config.TrainConfig``).

    ``train_config.tokenizer`` is ``"byte"`` (a :class:`ByteTokenizer`), ``"bpe"`` (a :class:`BPETokenizer`
    trained on the corpus ``train_config.data`` with ``train_config.bpe_vocab_size`` ids) or ``"hf"`` (the
    :class:`HFTokenizer` of the model folder ``train_config.init_from``).
    """
    kind = getattr(train_config, "tokenizer", "byte")
    if kind == ByteTokenizer.type_name:
        return ByteTokenizer()
    if kind == BPETokenizer.type_name:
        vocab_size = getattr(train_config, "bpe_vocab_size", 2048)
        return BPETokenizer.train([load_corpus_text(getattr(train_config, "data", None))], vocab_size)
    if kind == HFTokenizer.type_name:
        init_from = getattr(train_config, "init_from", None)
        if init_from is None:
            raise ValueError("tokenizer 'hf' reads the tokenizer.json of train.init_from, which is not set; set "
                             "train.init_from to a Hugging Face model folder, or use 'byte' or 'bpe'")
        return HFTokenizer.from_model_dir(init_from)
    raise ValueError(f"unknown tokenizer {kind!r}; use 'byte' or 'bpe' (or 'hf' with train.init_from)")


def load_tokenizer(directory: str | os.PathLike[str]) -> ByteTokenizer | BPETokenizer | HFTokenizer:
    """Load whichever tokenizer a moekit tokenizer's ``save`` wrote to ``directory``."""
    kind = _read_marker(directory)["type"]
    for cls in (ByteTokenizer, BPETokenizer, HFTokenizer):
        if kind == cls.type_name:
            return cls.load(directory)
    raise ValueError(f"{Path(directory) / TOKENIZER_FILE} has unknown tokenizer type {kind!r}; this moekit knows "
                     f"'byte', 'bpe' and 'hf', upgrade moekit or save it again")


# ------------------------------------------------------------------------------------------------------- corpus


def _read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); convert it to UTF-8 "
                         "(e.g. `iconv -f latin1 -t utf-8`) or leave it out") from err
    return text.replace("\r\n", "\n").replace("\r", "\n")


def load_corpus_text(path: str | os.PathLike[str] | None = None) -> str:
    """Training text.

    ``None`` gives the embedded Shakespeare corpus (``moekit/data/shakespeare.txt.gz``, see its README.md). A file
    path gives that file's text (UTF-8; ``.gz`` is decompressed). A folder gives every ``*.txt`` and ``*.md`` file
    under it, recursively, skipping hidden files and folders, in sorted path order, joined with
    :data:`DOCUMENT_SEPARATOR`. Line endings are normalised to ``\\n``.

    Raises FileNotFoundError if ``path`` does not exist, ValueError if it holds no usable text.
    """
    if path is None:
        try:
            data = resources.files("moekit.data").joinpath(EMBEDDED_CORPUS).read_bytes()
        except (FileNotFoundError, ModuleNotFoundError) as err:
            raise FileNotFoundError(
                f"the embedded corpus moekit/data/{EMBEDDED_CORPUS} is missing from this installation; reinstall "
                "moekit (its package data must include data/*.txt.gz), or pass a text file or folder instead"
            ) from err
        return gzip.decompress(data).decode("utf-8")

    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"corpus path {os.fspath(path)!r} does not exist; pass an existing text file or a folder of "
            f"{'/'.join('*' + s for s in TEXT_SUFFIXES)} files, or no path to use the embedded Shakespeare corpus"
        )
    if root.is_dir():
        files = sorted(
            p
            for p in root.rglob("*")
            if p.suffix.lower() in TEXT_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not files:
            raise ValueError(
                f"corpus folder {os.fspath(path)!r} has no text files; it must contain (in any subfolder) files "
                f"ending in {' or '.join(TEXT_SUFFIXES)} (hidden files and folders are skipped)"
            )
        texts = [t for t in (_read_text_file(p) for p in files) if t.strip()]
        text = DOCUMENT_SEPARATOR.join(texts)
    else:
        text = _read_text_file(root)
    if not text.strip():
        raise ValueError(
            f"corpus path {os.fspath(path)!r} holds no text (empty or whitespace-only); pass UTF-8 text files "
            f"({' or '.join(TEXT_SUFFIXES)} in a folder, any name for a single file) that contain text"
        )
    return text


# ------------------------------------------------------------------------------------------------ token dataset


def token_dtype(vocab_size: int) -> torch.dtype:
    """``torch.uint16`` if every id fits in 16 bits (``vocab_size <= 65536``), else ``torch.uint32``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return torch.uint16
    if vocab_size <= 2**32:
        return torch.uint32
    raise ValueError(f"vocab_size {vocab_size} does not fit in 32 bits")


_DTYPE_NAMES = {torch.uint16: "uint16", torch.uint32: "uint32"}

TOKENS_FILE = "tokens.bin"
META_FILE = "tokens.json"


class TokenDataset:
    """A corpus as one long 1-D tensor of token ids, memory-mapped from ``cache_dir/tokens.bin``.

    The last ``val_fraction`` of the tokens, but at least one window of ``block_size + 1`` tokens, are the
    validation split (:attr:`val`) and the rest the training split (:attr:`train`). Both are views of
    :attr:`tokens`, so they are disjoint and the same on every run.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        *,
        val_fraction: float = 0.05,
        block_size: int | None = None,
        reused: bool = False,
    ) -> None:
        """Wrap a 1-D integer tensor of token ids (normally made by :meth:`build` or :meth:`from_text`).

        ``block_size`` is the context length the splits must serve; None means 1 (no minimum beyond 2 tokens).
        """
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(f"tokens must be a non-empty 1-D tensor, got shape {tuple(tokens.shape)}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}; the default is 0.05")
        self.tokens = tokens
        self.val_fraction = float(val_fraction)
        self.block_size = block_size
        self.reused = reused
        """True when the token cache was valid and reused (nothing was tokenised)."""
        self.split_sizes()  # fail now, with a clear message, if the corpus is too small

    def __len__(self) -> int:
        return self.tokens.numel()

    @classmethod
    def build(
        cls,
        source: str | os.PathLike[str] | None,
        tokenizer: Tokenizer,
        cache_dir: str | os.PathLike[str],
        *,
        val_fraction: float = 0.05,
        block_size: int | None = None,
    ) -> TokenDataset:
        """Tokenise the corpus at path ``source`` once into ``cache_dir/tokens.bin`` and memory-map it.

        ``source`` is read with :func:`load_corpus_text` (a file, a folder, or None for the embedded corpus).
        The cache is reused when ``cache_dir/tokens.json`` records the same text hash, tokenizer fingerprint and
        format; otherwise (or if its files are damaged) it is rebuilt in place. Use :meth:`from_text` for a
        string of text.
        """
        text = load_corpus_text(source)
        origin = "<embedded>" if source is None else os.fspath(source)
        return cls._build(text, origin, tokenizer, cache_dir, val_fraction, block_size)

    @classmethod
    def from_text(
        cls,
        text: str,
        tokenizer: Tokenizer,
        cache_dir: str | os.PathLike[str],
        *,
        val_fraction: float = 0.05,
        block_size: int | None = None,
    ) -> TokenDataset:
        """Like :meth:`build`, for text given as a string."""
        return cls._build(text, "<text>", tokenizer, cache_dir, val_fraction, block_size)

    @classmethod
    def _build(
        cls,
        text: str,
        origin: str,
        tokenizer: Tokenizer,
        cache_dir: str | os.PathLike[str],
        val_fraction: float,
        block_size: int | None,
    ) -> TokenDataset:
        if not 0.0 <= val_fraction < 1.0:  # checked again by __init__, but fail before tokenising a large corpus
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}; the default is 0.05")
        if not text:
            raise ValueError("the text to tokenise is empty; pass some text, a path, or None for the embedded corpus")
        vocab_size = int(tokenizer.vocab_size)
        dtype = token_dtype(vocab_size)
        expected = {
            "format": _FORMAT_VERSION,
            "dtype": _DTYPE_NAMES[dtype],
            "byteorder": sys.byteorder,
            "source_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "tokenizer_sha256": tokenizer.fingerprint(),
            "vocab_size": vocab_size,
        }
        cache = Path(cache_dir)
        tokens_path, meta_path = cache / TOKENS_FILE, cache / META_FILE

        meta = cls._read_meta(meta_path)
        if meta is not None and all(meta.get(k) == v for k, v in expected.items()):
            length = meta.get("length")
            if isinstance(length, int) and length > 0 and tokens_path.is_file() \
                    and tokens_path.stat().st_size == length * dtype.itemsize:
                tokens = _map(tokens_path, length, dtype)
                return cls(tokens, val_fraction=val_fraction, block_size=block_size, reused=True)

        encode = getattr(tokenizer, "encode_to_tensor", None)
        ids = encode(text) if encode is not None else torch.tensor(tokenizer.encode(text), dtype=torch.int64)
        if ids.numel() == 0:
            raise ValueError(f"tokenising {origin} gave no tokens; check the text and the tokenizer")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"the tokenizer produced id {hi if hi >= vocab_size else lo} outside its vocab_size "
                             f"{vocab_size}; the tokenizer is inconsistent, retrain or reload it")

        cache.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)  # invalidate first: a crash below leaves no valid-looking cache
        tmp = tokens_path.with_name(TOKENS_FILE + ".tmp")
        tmp.unlink(missing_ok=True)
        mapped = torch.from_file(str(tmp), shared=True, size=ids.numel(), dtype=dtype)
        mapped.copy_(ids)
        del mapped  # unmaps and flushes to the file
        os.replace(tmp, tokens_path)
        write_json(meta_path, {**expected, "length": ids.numel(), "source": origin})
        tokens = _map(tokens_path, ids.numel(), dtype)
        return cls(tokens, val_fraction=val_fraction, block_size=block_size, reused=False)

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any] | None:
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def split_sizes(self, block_size: int | None = None) -> tuple[int, int]:
        """``(train tokens, val tokens)`` for windows of ``block_size + 1`` tokens (default :attr:`block_size`)."""
        if block_size is None:
            block_size = self.block_size or 1
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        need = block_size + 1
        n = len(self)
        n_val = max(math.ceil(n * self.val_fraction), need)
        n_train = n - n_val
        if n_train < need:
            raise ValueError(
                f"the corpus has {n} tokens, too few for train and validation splits of at least block_size + 1 = "
                f"{need} tokens each; use more text or a smaller block size"
            )
        return n_train, n_val

    def split(self, name: Literal["train", "val"], block_size: int | None = None) -> torch.Tensor:
        """The ``"train"`` (first tokens) or ``"val"`` (last tokens) split, as a view of :attr:`tokens`.

        ``block_size`` defaults to the dataset's :attr:`block_size`.
        """
        n_train, _ = self.split_sizes(block_size)
        if name == "train":
            return self.tokens[:n_train]
        if name == "val":
            return self.tokens[n_train:]
        raise ValueError(f"split must be 'train' or 'val', got {name!r}")

    @property
    def train(self) -> torch.Tensor:
        """The training split (all tokens before :attr:`val`)."""
        return self.split("train")

    @property
    def val(self) -> torch.Tensor:
        """The validation split (the last tokens)."""
        return self.split("val")

    def __repr__(self) -> str:
        return f"TokenDataset({len(self)} tokens, dtype={self.tokens.dtype}, val_fraction={self.val_fraction})"


def _map(path: Path, length: int, dtype: torch.dtype) -> torch.Tensor:
    # shared=False maps the file copy-on-write: pages load on demand and writes never reach the file.
    return torch.from_file(str(path), shared=False, size=length, dtype=dtype)


# ------------------------------------------------------------------------------------------------------ batches


def _check_data(data: torch.Tensor, block_size: int, what: str) -> None:
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    if data.dim() != 1:
        raise ValueError(f"{what} must be a 1-D tensor of token ids, got shape {tuple(data.shape)}")
    if data.numel() < block_size + 1:
        raise ValueError(f"{what} has {data.numel()} tokens, fewer than block_size + 1 = {block_size + 1}; "
                         "use more text or a smaller block size")


def _windows(data: torch.Tensor, starts: Sequence[int], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(len(starts), block_size + 1, dtype=torch.int64)
    for row, start in enumerate(starts):
        out[row].copy_(data[start : start + block_size + 1])  # copy_ converts uint16/uint32 to int64
    return out[:, :-1], out[:, 1:]


class BatchSampler:
    """Random ``(inputs, targets)`` batches from a 1-D tensor of token ids, resumable exactly.

    Each batch takes ``batch_size`` windows of ``block_size + 1`` tokens at uniformly random starts; inputs are
    the first ``block_size`` tokens of each window and targets the last ``block_size`` (both ``int64`` on the CPU).
    Starts come from the sampler's own ``torch.Generator`` seeded with ``seed``, so the global RNG is untouched
    and :meth:`state_dict` / :meth:`load_state_dict` resume the exact same sequence of batches.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, block_size: int, seed: int = 0) -> None:
        _check_data(data, block_size, "the data")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.data = data
        self.batch_size = int(batch_size)
        self.block_size = int(block_size)
        self.seed = int(seed)
        self.step = 0
        """Number of batches drawn so far."""
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(inputs, targets)``, each ``[batch_size, block_size]`` int64."""
        high = self.data.numel() - self.block_size  # last valid start is numel - (block_size + 1)
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator).tolist()
        self.step += 1
        return _windows(self.data, starts, self.block_size)

    def skip_batch(self) -> None:
        """Advance past the next batch without building it (data parallelism: another rank's batch)."""
        high = self.data.numel() - self.block_size
        torch.randint(0, high, (self.batch_size,), generator=self.generator)
        self.step += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches (the same as calling :meth:`next_batch` repeatedly)."""
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with the same batches; saveable with ``torch.save``."""
        return {
            "seed": self.seed,
            "step": self.step,
            "generator_state": self.generator.get_state(),
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "num_tokens": self.data.numel(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the sampler must have the same data size, batch and block size."""
        missing = {"step", "generator_state"} - set(state)
        if missing:
            raise ValueError(f"sampler state lacks {sorted(missing)}; pass the dict BatchSampler.state_dict() made")
        for key, have in (("batch_size", self.batch_size), ("block_size", self.block_size),
                          ("num_tokens", self.data.numel())):
            if key in state and state[key] != have:
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this sampler has {key}={have}; resume with the same "
                    "data, batch size and block size as the saved run, or start a new run"
                )
        gen_state = torch.as_tensor(state["generator_state"], dtype=torch.uint8).cpu()
        self.generator.set_state(gen_state)
        self.step = int(state["step"])
        self.seed = int(state.get("seed", self.seed))


def iter_eval_batches(
    data: torch.Tensor, batch_size: int, block_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic ``(inputs, targets)`` batches for evaluation, in order.

    Windows of ``block_size + 1`` tokens start every ``block_size`` tokens, so every target position of ``data``
    is predicted exactly once (except a tail shorter than ``block_size``). With ``max_batches``, at most
    ``max_batches * batch_size`` windows are used, spread evenly over ``data``; the last batch may be smaller.
    """
    _check_data(data, block_size, "the evaluation data")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n_windows = (data.numel() - 1) // block_size
    starts = [i * block_size for i in range(n_windows)]
    if max_batches is not None:
        if max_batches < 1:
            raise ValueError(f"max_batches must be at least 1 or None, got {max_batches}")
        keep = max_batches * batch_size
        if n_windows > keep:
            picks = torch.linspace(0, n_windows - 1, keep).round().long().tolist()
            starts = [starts[i] for i in picks]
    for i in range(0, len(starts), batch_size):
        yield _windows(data, starts[i : i + batch_size], block_size)
