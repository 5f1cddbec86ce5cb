"""Tokenizers for ``moekit train``: bytes, a locally trained byte-level BPE, and a pretrained model's own.

All three are :class:`Tokenizer` subclasses, which hold what they share: the id range check of :meth:`decode`,
:meth:`fingerprint` (the sha256 that keys the token cache), :meth:`save` (data files, then the
``moekit_tokenizer.json`` marker, each written atomically) and :meth:`load` (the marker read and checked)::

    tok = ByteTokenizer()                        # or BPETokenizer.train([text], vocab_size=4096)
    tok.save("runs/x/tokenizer")                 # moekit_tokenizer.json (+ tokenizer.json for BPE and HF)
    same = load_tokenizer("runs/x/tokenizer")    # whichever kind the marker names

A subclass gives its vocabulary, encoding, the decoding of ids already checked (:meth:`Tokenizer._decode_ids`), the
text its fingerprint hashes, its marker fields and data files, and how it is rebuilt from a saved folder.

BPE training cuts runs of more than :data:`MAX_TRAINING_RUN` non-space (or space) characters into pieces, since the
``tokenizers`` trainer is quadratic in the length of one pre-token; encoding never depends on how the training
text was cut.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from .._files import atomic_write, storage_faults, write_json

__all__ = [
    "EOS_TOKEN",
    "HF_COMPANION_FILES",
    "HF_TOKENIZER_FILE",
    "MAX_TRAINING_RUN",
    "TOKENIZER_FILE",
    "BPETokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "load_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
"""End-of-document token; both tokenizers give it an id of its own by default."""

TOKENIZER_FILE = "moekit_tokenizer.json"
"""The marker file that :meth:`Tokenizer.save` writes and :func:`load_tokenizer` reads."""

HF_TOKENIZER_FILE = "tokenizer.json"
"""The ``tokenizers`` library's own file, written next to :data:`TOKENIZER_FILE` by :class:`BPETokenizer` and
:class:`HFTokenizer`."""

HF_COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "chat_template.jinja", "chat_template.json")
"""Files next to a ``tokenizer.json`` that :class:`HFTokenizer` carries along (transformers reads them)."""

_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------ the base class


class Tokenizer(abc.ABC):
    """What the trainer needs from a tokenizer, and what every moekit tokenizer does the same way.

    A subclass sets :attr:`type_name` (the marker's ``"type"``) and implements :attr:`vocab_size`,
    :meth:`token_to_id`, :meth:`encode`, :meth:`encode_to_tensor` and the hooks :meth:`_decode_ids`,
    :meth:`_fingerprint_text`, :meth:`_marker_fields`, :meth:`_data_files` and :meth:`_from_folder`.
    """

    type_name: ClassVar[str]
    """The kind written as ``"type"`` in :data:`TOKENIZER_FILE`."""

    eos_token: str | None = EOS_TOKEN
    """The end-of-text token that separates documents, or None when the tokenizer has none."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids: every id is in ``range(vocab_size)``."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (e.g. a special token), or None."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""

    @abc.abstractmethod
    def encode_to_tensor(self, text: str) -> torch.Tensor:
        """Like :meth:`encode` but returns a 1-D ``int64`` tensor; fast for large texts."""

    @property
    def eos_id(self) -> int | None:
        """Id of :attr:`eos_token`, or None when the tokenizer has no such token."""
        return self.token_to_id(self.eos_token) if self.eos_token is not None else None

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 (e.g. a cut character) become U+FFFD.

        Raises ValueError for ids outside the vocabulary.
        """
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside this tokenizer's vocabulary of {self.vocab_size}; "
                             "decode ids made by the same tokenizer")
        return self._decode_ids(ids, skip_special_tokens)

    def fingerprint(self) -> str:
        """sha256 identifying this tokenizer's mapping (keys the token cache)."""
        return hashlib.sha256(self._fingerprint_text().encode("utf-8")).hexdigest()

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the tokenizer's files and then ``moekit_tokenizer.json`` into ``directory`` (created with its
        parents if needed), each atomically; returns the marker's path."""
        path = Path(directory)
        with storage_faults("tokenizer", path):
            path.mkdir(parents=True, exist_ok=True)
        for name, data in self._data_files():
            atomic_write(path / name, data, what="tokenizer")
        write_json(path / TOKENIZER_FILE, self.marker(), what="tokenizer")
        return path / TOKENIZER_FILE

    def marker(self) -> dict[str, Any]:
        """The JSON object :meth:`save` writes to :data:`TOKENIZER_FILE`."""
        return {"type": self.type_name, "format": _FORMAT_VERSION, **self._marker_fields()}

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        """Read a tokenizer of this kind written by :meth:`save` (:func:`load_tokenizer` reads any kind)."""
        return cls._from_folder(Path(directory), cls.read_marker(directory, cls.type_name))

    @staticmethod
    def read_marker(directory: str | os.PathLike[str], expected_type: str | None = None) -> dict[str, Any]:
        """The tokenizer folder's marker JSON; with `expected_type`, refuse a tokenizer of another kind."""
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer in {os.fspath(directory)!r}: {TOKENIZER_FILE} is missing; pass the folder a tokenizer "
                "was saved to with .save(folder), e.g. a training run's output folder"
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

    # ---- what each kind gives

    @abc.abstractmethod
    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        """Text of ids already checked to be in the vocabulary."""

    @abc.abstractmethod
    def _fingerprint_text(self) -> str:
        """The text whose sha256 is :meth:`fingerprint` (fixed per kind: token caches are keyed by it)."""

    def _marker_fields(self) -> dict[str, Any]:
        """What the marker holds after ``type`` and ``format``."""
        return {}

    def _data_files(self) -> list[tuple[str, bytes | str]]:
        """``(file name, content)`` of the files :meth:`save` writes before the marker."""
        return []

    @classmethod
    @abc.abstractmethod
    def _from_folder(cls, path: Path, meta: dict[str, Any]) -> Tokenizer:
        """The tokenizer saved in `path`, whose marker `meta` names this kind."""


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


# ---------------------------------------------------------------------------------------------------------- bytes


class ByteTokenizer(Tokenizer):
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

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        out = bytearray()
        for i in ids:
            if i < 256:
                out.append(i)
            elif not skip_special_tokens:
                out += self.special_tokens[i - 256].encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def _fingerprint_text(self) -> str:
        return json.dumps(self.marker(), sort_keys=True)

    def _marker_fields(self) -> dict[str, Any]:
        return {"special_tokens": list(self.special_tokens)}

    @classmethod
    def _from_folder(cls, path: Path, meta: dict[str, Any]) -> ByteTokenizer:
        return cls(special_tokens=meta.get("special_tokens", ()))

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, special_tokens={list(self.special_tokens)})"


# ---------------------------------------------------------------------------------- the `tokenizers` library's


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError(
            "BPETokenizer and HFTokenizer need the optional `tokenizers` package, which is not installed; run "
            "`pip install tokenizers`, or use ByteTokenizer, which needs nothing"
        ) from err
    return tokenizers


def _tokenizer_json(path: Path, meta: dict[str, Any]) -> Path:
    """The ``tokenizer.json`` a marker names in the folder `path`; a FileNotFoundError when it is gone."""
    hf_path = path / meta.get("tokenizer_file", HF_TOKENIZER_FILE)
    if not hf_path.is_file():
        raise FileNotFoundError(f"{hf_path} is missing; the tokenizer folder is incomplete, save it again")
    return hf_path


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


MAX_TRAINING_RUN = 500
"""Longest run of non-space (or of space) characters :meth:`BPETokenizer.train` passes to the ``tokenizers``
trainer in one piece; longer runs are cut (the trainer's time grows with the square of a pre-token's length)."""

_LONG_RUN = re.compile(rf"\S{{{MAX_TRAINING_RUN + 1},}}|\s{{{MAX_TRAINING_RUN + 1},}}")


def _training_pieces(text: str, bound: int = MAX_TRAINING_RUN) -> Iterator[str]:
    """`text` in consecutive pieces, cut only inside runs of more than `bound` non-space (or space) characters, so
    that no piece holds such a run longer than `bound`; the pieces join back to `text`."""
    pattern = _LONG_RUN if bound == MAX_TRAINING_RUN else re.compile(rf"\S{{{bound + 1},}}|\s{{{bound + 1},}}")
    pos = 0
    for match in pattern.finditer(text):
        for cut in range(match.start() + bound, match.end(), bound):
            yield text[pos:cut]
            pos = cut
    if pos < len(text):
        yield text[pos:]


class BPETokenizer(Tokenizer):
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
        Occurrences of a special token in ``texts`` are not merged into other tokens. Runs of more than
        :data:`MAX_TRAINING_RUN` non-space (or space) characters are learned from in pieces of that length, which
        bounds the training time on text such as one line of megabytes without spaces; encoding is unaffected.
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
                for chunk in _chunks(text):
                    yield from _training_pieces(chunk)

        tok.train_from_iterator(chunked(), trainer=trainer)
        if n_chars == 0:
            raise ValueError("BPETokenizer.train got no text; pass a non-empty list of strings, "
                             "e.g. [load_corpus_text(None)]")
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

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

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def _fingerprint_text(self) -> str:
        return f"{self.type_name}\n{self._tok.to_str()}"

    def _marker_fields(self) -> dict[str, Any]:
        return {"tokenizer_file": HF_TOKENIZER_FILE}

    def _data_files(self) -> list[tuple[str, bytes | str]]:
        return [(HF_TOKENIZER_FILE, self._tok.to_str(pretty=True))]

    @classmethod
    def _from_folder(cls, path: Path, meta: dict[str, Any]) -> BPETokenizer:
        tokenizers = _import_tokenizers()
        return cls(tokenizers.Tokenizer.from_file(str(_tokenizer_json(path, meta))))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def _config_token(config: dict[str, Any], key: str) -> str | None:
    value = config.get(key)
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) and value else None


class HFTokenizer(Tokenizer):
    """A pretrained model's own ``tokenizer.json`` (the ``tokenizers`` library's format), used as it is.

    This is the tokenizer of a run started from a Hugging Face checkpoint (``train.init_from``). Training text is
    encoded without the tokenizer's added special tokens (no BOS in the middle of a stream); the document
    separator ``<|endoftext|>`` of ``moekit.train.data.DOCUMENT_SEPARATOR`` becomes the tokenizer's own end-of-text
    token (the ``eos_token`` of ``tokenizer_config.json``) when it has one. :meth:`encode_prompt` adds the special
    tokens the tokenizer adds by default (e.g. Llama's BOS), as transformers does for a prompt. The text is encoded
    document by document, never cut elsewhere, since an arbitrary pretrained pre-tokenizer may not split on newlines.

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
    def tokenizer_json(self) -> str:
        """The text of the ``tokenizer.json`` this tokenizer was read from."""
        return self._json

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

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def _fingerprint_text(self) -> str:
        return f"{self.type_name}\n{self.eos_token}\n{self._tok.to_str()}"

    def _marker_fields(self) -> dict[str, Any]:
        return {"tokenizer_file": HF_TOKENIZER_FILE, "files": sorted(self.files), "source": self.source}

    def _data_files(self) -> list[tuple[str, bytes | str]]:
        return [(HF_TOKENIZER_FILE, self._json.encode("utf-8")), *sorted(self.files.items())]

    @classmethod
    def _from_folder(cls, path: Path, meta: dict[str, Any]) -> HFTokenizer:
        hf_path = _tokenizer_json(path, meta)
        names = meta.get("files", [name for name in HF_COMPANION_FILES if (path / name).is_file()])
        missing = [name for name in names if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{path / missing[0]} is missing; the tokenizer folder is incomplete, "
                                    "save it again")
        files = {name: (path / name).read_bytes() for name in names}
        return cls(hf_path.read_text(encoding="utf-8"), files, source=meta.get("source"))

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos_token={self.eos_token!r}, source={self.source!r})"


# ----------------------------------------------------------------------------------------------- choosing one

_KINDS: tuple[type[Tokenizer], ...] = (ByteTokenizer, BPETokenizer, HFTokenizer)


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer:
    """Load whichever tokenizer a moekit tokenizer's ``save`` wrote to ``directory``."""
    kind = Tokenizer.read_marker(directory)["type"]
    for cls in _KINDS:
        if kind == cls.type_name:
            return cls.load(directory)
    raise ValueError(f"{Path(directory) / TOKENIZER_FILE} has unknown tokenizer type {kind!r}; this moekit knows "
                     f"'byte', 'bpe' and 'hf', upgrade moekit or save it again")
