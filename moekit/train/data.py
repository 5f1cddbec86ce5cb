"""Data for ``moekit train``: corpus loading, a cached token dataset and a resumable batch sampler.

The pieces fit together like this::

    source = None                           # the embedded Shakespeare corpus, or a file / folder path
    tok = ByteTokenizer()                   # from moekit.train.tokenizers, or BPETokenizer.train([text], 4096)
    ds = TokenDataset.build(source, tok, "runs/x/data", block_size=256)
    sampler = BatchSampler(ds.train, batch_size=32, block_size=256, seed=0)
    inputs, targets = sampler.next_batch()  # int64 [32, 256] each; targets are inputs shifted by one
    for inputs, targets in iter_eval_batches(ds.val, 32, 256, max_batches=8): ...

Token ids live in a file (``tokens.bin``) that is memory-mapped copy-on-write with :func:`torch.from_file`, as
``uint16`` when the vocabulary fits in 16 bits and ``uint32`` otherwise, so numpy is not needed: torch does not
depend on numpy, and moekit's only hard dependency is torch.

Checking before writing. :meth:`TokenDataset.build` is two steps, and a caller that must not create anything
on bad input (the trainer, before it makes a run directory) calls them apart::

    prepared = TokenDataset.prepare(source, tok, "runs/x/data", val_fraction=0.05, block_size=256)
    prepared.source_sha256                  # sha256 of the corpus text, to compare with the one a run began with
    ...                                     # create the run directory, save the tokenizer
    ds = prepared.write()                   # writes (or reuses) the cache; ds.source_sha256 is the same hash

:meth:`TokenDataset.prepare` reads and decodes the corpus, tokenises it in memory (only when the cache in
``cache_dir`` is missing, stale or damaged) and checks the split sizes; it writes nothing and raises every input
error (FileNotFoundError, ValueError). :meth:`PreparedTokens.write` can then fail only on storage
(:class:`moekit._files.StorageError`: full disk, file-size limit, read-only or forbidden folder), which removes its
temporary file and leaves a previous cache as it was.

The cache. ``tokens.bin`` is written with ordinary buffered writes into a temporary file next to it, flushed to
disk, renamed into place and the folder synced; ``tokens.json`` (written last, atomically) records the text's
sha256, the tokenizer's fingerprint, the length and the sha256 of ``tokens.bin``. A cache is reused only when all of
them match; a ``tokens.bin`` whose size or checksum does not match (e.g. zeroed by a crash) is never used: a warning
names it and it is rebuilt from the corpus.

Input that would hang or crash. A corpus path that is neither a regular file nor a folder (a FIFO, a socket, a
device) is refused without opening it, and non-regular files inside a corpus folder are skipped. A ``.gz`` file that
is not gzip, or is truncated, is a ValueError naming it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import os
import stat
import sys
import uuid
import warnings
import zlib
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from .._files import NotRegularFile, file_kind, fsync_dir, read_regular_file, storage_faults, write_json
from .chat import encode_chat, is_chat_source, split_labels
from .tokenizers import EOS_TOKEN, BPETokenizer, ByteTokenizer, HFTokenizer, Tokenizer

__all__ = [
    "DOCUMENT_SEPARATOR",
    "TEXT_SUFFIXES",
    "BatchSampler",
    "PreparedTokens",
    "TokenDataset",
    "build_tokenizer",
    "iter_eval_batches",
    "load_corpus_text",
    "token_dtype",
]

DOCUMENT_SEPARATOR = f"\n\n{EOS_TOKEN}\n\n"
"""Placed between documents: between the works of the embedded corpus and between the files of a folder."""

TEXT_SUFFIXES = (".txt", ".md")
"""File types :func:`load_corpus_text` reads from a folder."""

EMBEDDED_CORPUS = "shakespeare.txt.gz"


# ------------------------------------------------------------------------------------------------------- corpus


_GZIP_MAGIC = b"\x1f\x8b"


def _not_regular(path: Path, mode: int) -> ValueError:
    return ValueError(f"corpus path {os.fspath(path)!r} is {file_kind(mode)}, not a regular file or a folder; moekit "
                      "reads only files and folders of files (reading from a pipe or device could block forever): "
                      "save the text to a file and pass that")


def _read_regular_file(path: Path) -> bytes:
    """The bytes of the regular file `path`; anything else (a FIFO, a device...) is a ValueError, never opened."""
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        return read_regular_file(path)
    except NotRegularFile as err:  # it became a FIFO or device after the stat
        raise _not_regular(path, err.mode) from None
    except FileNotFoundError as err:
        raise FileNotFoundError(f"corpus file {os.fspath(path)!r} does not exist (it disappeared while being "
                                "read); pass an existing text file or folder") from err
    except PermissionError as err:
        raise ValueError(f"cannot read corpus file {os.fspath(path)!r}: permission denied; make it readable "
                         "(chmod +r) or leave it out") from err
    except OSError as err:
        raise ValueError(f"cannot read corpus file {os.fspath(path)!r}: {err.strerror or err}; check the file "
                         "and the disk, or leave it out") from err


def _gunzip(path: Path, data: bytes) -> bytes:
    """`data` decompressed; a file that is not gzip, or damaged gzip, is a ValueError naming `path`."""
    if not data:
        return data
    if data[:2] != _GZIP_MAGIC:
        raise ValueError(f"{path} is not a gzip file (it does not start with the gzip signature) although its name "
                         "ends in .gz; rename it without .gz if it is plain text, or compress it with gzip")
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path} is damaged: its gzip data is truncated or corrupt ({err}); copy or download it "
                         "again, or leave it out") from err


def _read_text_file(path: Path) -> str:
    data = _read_regular_file(path)
    if path.suffix.lower() == ".gz":
        data = _gunzip(path, data)
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

    A path that is neither a regular file nor a folder (a FIFO, a socket, a device) is refused without being opened,
    and inside a folder such entries are skipped (a FIFO named ``x.txt`` is not read), so nothing here can block.

    Raises FileNotFoundError if ``path`` does not exist, ValueError if it holds no usable text (not UTF-8, a ``.gz``
    file that is not gzip or is damaged, unreadable, empty, or not a file or folder).
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
    try:
        mode = root.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except OSError as err:
        raise ValueError(f"cannot read corpus path {os.fspath(path)!r}: {err.strerror or err}; pass a readable "
                         "text file or folder") from err
    if mode is None:
        raise FileNotFoundError(
            f"corpus path {os.fspath(path)!r} does not exist; pass an existing text file or a folder of "
            f"{'/'.join('*' + s for s in TEXT_SUFFIXES)} files, or no path to use the embedded Shakespeare corpus"
        )
    if stat.S_ISDIR(mode):
        files = sorted(
            p
            for p in root.rglob("*")
            if p.suffix.lower() in TEXT_SUFFIXES
            and p.is_file()  # regular files only (after symlinks): a FIFO, socket or device is skipped
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not files:
            raise ValueError(
                f"corpus folder {os.fspath(path)!r} has no text files; it must contain (in any subfolder) files "
                f"ending in {' or '.join(TEXT_SUFFIXES)} (hidden files and folders are skipped)"
            )
        texts = [t for t in (_read_text_file(p) for p in files) if t.strip()]
        text = DOCUMENT_SEPARATOR.join(texts)
    elif stat.S_ISREG(mode):
        text = _read_text_file(root)
    else:
        raise _not_regular(root, mode)
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
TOKENS_META_FILE = "tokens.json"
"""The token cache's index next to ``tokens.bin``: what the tokens were made from, their length and sha256."""
_CACHE_FORMAT = 2  # 2: tokens.json records the sha256 of tokens.bin
_WRITE_TOKENS = 1 << 20  # tokens converted and written per write call
_HASH_BLOCK = 1 << 20


def _check_split_args(val_fraction: float, block_size: int | None) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}; the default is 0.05")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or block_size < 1):
        raise ValueError(f"block_size must be an integer of at least 1, got {block_size!r}")


def _split_sizes(n: int, val_fraction: float, block_size: int) -> tuple[int, int]:
    """``(train tokens, val tokens)`` of `n` tokens; a ValueError when either split has less than one window."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    need = block_size + 1
    n_val = max(math.ceil(n * val_fraction), need)
    n_train = n - n_val
    if n_train < need:
        raise ValueError(
            f"the corpus has {n} tokens, too few for train and validation splits of at least block_size + 1 = "
            f"{need} tokens each; use more text or a smaller block size"
        )
    return n_train, n_val


def _tokenise(text: str, tokenizer: Tokenizer, origin: str, vocab_size: int) -> torch.Tensor:
    """`text` as a 1-D int64 tensor of ids, checked to be non-empty and inside the vocabulary."""
    ids = tokenizer.encode_to_tensor(text)
    if ids.numel() == 0:
        raise ValueError(f"tokenising {origin} gave no tokens; check the text and the tokenizer")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"the tokenizer produced id {hi if hi >= vocab_size else lo} outside its vocab_size "
                         f"{vocab_size}; the tokenizer is inconsistent, retrain or reload it")
    return ids


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


_Signature = tuple[tuple[int, int, int, int], ...]


def _signature(cache: Path) -> _Signature | None:
    """Identity of the two cache files (device, inode, size, mtime), or None when one is missing."""
    try:
        stats = [(cache / name).stat() for name in (TOKENS_FILE, TOKENS_META_FILE)]
    except OSError:
        return None
    return tuple((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for st in stats)


def _check_cache(cache: Path, expected: dict[str, Any], dtype: torch.dtype) -> tuple[int | None, str | None]:
    """``(length, None)`` when the cache in `cache` holds exactly the tokens `expected` describes.

    Otherwise ``(None, why)`` when it was made for this input but is damaged (the caller warns), or
    ``(None, None)`` when there is none or it was made for another text, tokenizer or format (rebuilt silently).
    """
    tokens_path, meta_path = cache / TOKENS_FILE, cache / TOKENS_META_FILE
    if not meta_path.is_file():
        return None, None
    meta = _read_meta(meta_path)
    if meta is None:
        return None, f"{meta_path} is not a JSON object"
    if any(meta.get(key) != value for key, value in expected.items()):
        return None, None
    length, digest = meta.get("length"), meta.get("tokens_sha256")
    if not isinstance(length, int) or isinstance(length, bool) or length <= 0 or not isinstance(digest, str):
        return None, f"{meta_path} lacks a valid length or tokens_sha256"
    try:
        st = tokens_path.stat()
    except OSError:
        return None, f"{tokens_path} is missing"
    if not stat.S_ISREG(st.st_mode):
        return None, f"{tokens_path} is {file_kind(st.st_mode)}"
    if st.st_size != length * dtype.itemsize:
        return None, (f"{tokens_path} has {st.st_size} bytes where {TOKENS_META_FILE} records {length} tokens = "
                      f"{length * dtype.itemsize} bytes")
    try:
        actual = _file_sha256(tokens_path)
    except OSError as err:
        return None, f"{tokens_path} cannot be read ({err.strerror or err})"
    if actual != digest:
        return None, f"{tokens_path} does not match the sha256 recorded in {TOKENS_META_FILE}"
    return length, None


def _warn_damaged(why: str, stacklevel: int) -> None:
    warnings.warn(f"the token cache is damaged: {why}; it is not used, it is being rebuilt from the corpus",
                  RuntimeWarning, stacklevel=stacklevel + 1)


def _write_cache(cache: Path, ids: torch.Tensor, dtype: torch.dtype, meta: dict[str, Any]) -> None:
    """Stream `ids` as `dtype` into ``cache/tokens.bin`` (temporary file, fsync, rename, folder sync), then write
    ``tokens.json`` with its sha256. A storage fault removes the temporary file, leaves a previous cache as it was
    and raises a one-line StorageError."""
    tokens_path, meta_path = cache / TOKENS_FILE, cache / TOKENS_META_FILE
    n = ids.numel()
    needed = n * dtype.itemsize
    with storage_faults("token cache", cache, needed):
        cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{TOKENS_FILE}.tmp-{uuid.uuid4().hex[:12]}"
    digest = hashlib.sha256()
    try:
        with storage_faults("token cache", tokens_path, needed):
            with open(tmp, "xb") as handle:
                # one reusable buffer: a tensor view of it converts each chunk of int64 ids to uint16/uint32 in place
                buffer = bytearray(min(n, _WRITE_TOKENS) * dtype.itemsize)
                view = torch.frombuffer(buffer, dtype=dtype)
                for start in range(0, n, _WRITE_TOKENS):
                    chunk = ids[start : start + _WRITE_TOKENS]
                    view[: chunk.numel()].copy_(chunk)
                    data = memoryview(buffer)[: chunk.numel() * dtype.itemsize]
                    handle.write(data)
                    digest.update(data)
                handle.flush()
                os.fsync(handle.fileno())
            meta_path.unlink(missing_ok=True)  # no index describes the old tokens once they are replaced
            os.replace(tmp, tokens_path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(cache)
    write_json(meta_path, {**meta, "length": n, "tokens_sha256": digest.hexdigest()}, what="token cache")


class PreparedTokens:
    """A corpus read, checked and tokenised in memory (or found in a valid cache), with nothing written yet.

    Made by :meth:`TokenDataset.prepare` / :meth:`TokenDataset.prepare_text`; every input error has been raised by
    then. :meth:`write` writes the cache (or reuses it) and returns the :class:`TokenDataset`.
    """

    def __init__(self, text: str, origin: str, tokenizer: Tokenizer, cache_dir: str | os.PathLike[str], *,
                 val_fraction: float, block_size: int | None, reuse: bool) -> None:
        """Check and tokenise `text` (use :meth:`TokenDataset.prepare`, which reads the corpus, rather than this)."""
        _check_split_args(val_fraction, block_size)
        if not text:
            raise ValueError("the text to tokenise is empty; pass some text, a path, or None for the embedded corpus")
        self.origin = origin
        """Where the text came from: the corpus path, ``<embedded>`` or ``<text>``."""
        self.cache_dir = Path(cache_dir)
        """The folder of ``tokens.bin`` and ``tokens.json``."""
        self.val_fraction = float(val_fraction)
        self.block_size = block_size
        self.source_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        """sha256 of the corpus text (UTF-8, line endings normalised): what ``tokens.json`` records as
        ``source_sha256``; compare it with the one a run started with to notice a changed corpus."""
        self._tokenizer = tokenizer
        self._vocab_size = int(tokenizer.vocab_size)
        self.label_shift = self._vocab_size if is_chat_source(origin) else None
        """For chat JSONL, the vocabulary size by which tokens without loss are shifted (see `moekit.train.chat`)."""
        self._dtype = token_dtype(2 * self._vocab_size if self.label_shift else self._vocab_size)
        self._expected = {
            "format": _CACHE_FORMAT,
            "dtype": _DTYPE_NAMES[self._dtype],
            "byteorder": sys.byteorder,
            "source_sha256": self.source_sha256,
            "tokenizer_sha256": tokenizer.fingerprint(),
            "vocab_size": self._vocab_size,
            "label_shift": self.label_shift,  # absent (None) in plain-text caches
        }
        self._text: str | None = text
        self._ids: torch.Tensor | None = None
        self._signature: _Signature | None = None
        length, why = _check_cache(self.cache_dir, self._expected, self._dtype) if reuse else (None, None)
        if length is not None:
            self._signature = _signature(self.cache_dir)
        else:
            if why is not None:
                _warn_damaged(why, stacklevel=3)  # the caller of TokenDataset.prepare
            self._ids = self._encode(text)
            self._text = None  # the ids are all write() needs
            length = self._ids.numel()
        self.num_tokens = int(length)
        """Number of tokens of the corpus."""
        self.reused = self._ids is None
        """True when a valid cache was found: nothing was tokenised and :meth:`write` maps it."""
        _split_sizes(self.num_tokens, self.val_fraction, block_size or 1)  # too small: fail before writing

    def write(self, cache_dir: str | os.PathLike[str] | None = None) -> TokenDataset:
        """Write ``tokens.bin`` and ``tokens.json`` (or reuse the valid cache) and return the memory-mapped dataset.

        If the cache that :meth:`TokenDataset.prepare` found valid has changed or gone since (e.g. its folder was
        replaced), it is checked again and rebuilt from the text when needed. `cache_dir` writes the cache into
        another folder than the one prepared for (a run directory being assembled under a temporary name); the
        tokens must then have been tokenised, not found in a cache. Raises :class:`moekit._files.StorageError`
        when the storage refuses the write (nothing half-written is left, a previous cache stays as it was).
        """
        if cache_dir is not None and Path(cache_dir) != self.cache_dir:
            if self._ids is None:
                raise ValueError(f"these tokens were found in the cache {self.cache_dir}; write them there, or "
                                 "prepare with reuse=False to write them elsewhere")
            self.cache_dir, self._signature = Path(cache_dir), None
        if self._cache_still_valid():
            return self._dataset(_map(self.cache_dir / TOKENS_FILE, self.num_tokens, self._dtype), reused=True)
        assert self._ids is not None
        _write_cache(self.cache_dir, self._ids, self._dtype, {**self._expected, "source": self.origin})
        self._ids, self._text = None, None
        self._signature = _signature(self.cache_dir)
        return self._dataset(_map(self.cache_dir / TOKENS_FILE, self.num_tokens, self._dtype), reused=False)

    def in_memory(self) -> TokenDataset:
        """The dataset without writing anything (e.g. for a read-only run directory).

        The valid cache is memory-mapped when there is one; otherwise the tokens are the ids tokenised in memory
        (as ``uint16``/``uint32``), and :meth:`write` can still write them afterwards.
        """
        if self._cache_still_valid():
            return self._dataset(_map(self.cache_dir / TOKENS_FILE, self.num_tokens, self._dtype), reused=True)
        assert self._ids is not None
        return self._dataset(self._ids.to(self._dtype), reused=False)

    def _cache_still_valid(self) -> bool:
        """True when the valid cache found by prepare (or written by write) is still there; when it has changed
        or gone since, check it again and, if it is no longer valid, tokenise the text (kept for this)."""
        if self._ids is not None:
            return False
        if self._signature is not None and self._signature == _signature(self.cache_dir):
            return True
        length, why = _check_cache(self.cache_dir, self._expected, self._dtype)
        if length is not None:
            self.num_tokens, self._signature = length, _signature(self.cache_dir)
            return True
        if self._text is None:
            raise ValueError(f"the token cache in {self.cache_dir} changed after it was written; call "
                             "TokenDataset.prepare again")
        if why is not None:
            _warn_damaged(why, stacklevel=3)  # the caller of write / in_memory
        self._ids = self._encode(self._text)
        self.num_tokens = self._ids.numel()
        return False

    def _encode(self, text: str) -> torch.Tensor:
        if self.label_shift is not None:
            return encode_chat(text, self._tokenizer, self.origin, self._vocab_size)
        return _tokenise(text, self._tokenizer, self.origin, self._vocab_size)

    def _dataset(self, tokens: torch.Tensor, reused: bool) -> TokenDataset:
        return TokenDataset(tokens, val_fraction=self.val_fraction, block_size=self.block_size, reused=reused,
                            source_sha256=self.source_sha256, label_shift=self.label_shift)

    def __repr__(self) -> str:
        state = "cache valid" if self.reused else "tokenised, not written"
        return f"PreparedTokens({self.num_tokens} tokens, {state}, cache_dir={os.fspath(self.cache_dir)!r})"


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
        source_sha256: str | None = None,
        label_shift: int | None = None,
    ) -> None:
        """Wrap a 1-D integer tensor of token ids (normally made by :meth:`build` or :meth:`from_text`).

        ``block_size`` is the context length the splits must serve; None means 1 (no minimum beyond 2 tokens).
        ``label_shift`` marks chat data whose tokens without loss are stored shifted by it (`moekit.train.chat`).
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
        self.source_sha256 = source_sha256
        """sha256 of the corpus text the tokens came from (None when the tensor was given directly)."""
        self.label_shift = label_shift
        """Chat data: tokens without loss are stored as id + label_shift (pass it to the samplers); else None."""
        self.split_sizes()  # fail now, with a clear message, if the corpus is too small

    def __len__(self) -> int:
        return self.tokens.numel()

    @classmethod
    def prepare(
        cls,
        source: str | os.PathLike[str] | None,
        tokenizer: Tokenizer,
        cache_dir: str | os.PathLike[str],
        *,
        val_fraction: float = 0.05,
        block_size: int | None = None,
        reuse: bool = True,
    ) -> PreparedTokens:
        """Everything of :meth:`build` that can fail on bad input, writing nothing; then call ``.write()``.

        Reads the corpus with :func:`load_corpus_text`, computes its sha256 (:attr:`PreparedTokens.source_sha256`),
        verifies the cache in ``cache_dir`` (size and sha256 of ``tokens.bin``) and, only when it is missing, stale
        or damaged (damaged: a warning), tokenises the text in memory; then checks that the corpus fills both splits
        at ``block_size``. ``reuse=False`` ignores an existing cache (the text is tokenised, ``write`` replaces the
        cache), for a caller that is about to delete ``cache_dir``. Raises FileNotFoundError (no such path) and
        ValueError (unreadable, undecodable or empty corpus, bad ``val_fraction`` / ``block_size``, corpus too small
        for the splits, a tokenizer producing ids outside its vocabulary).
        """
        _check_split_args(val_fraction, block_size)  # before reading a large corpus
        text = load_corpus_text(source)
        origin = "<embedded>" if source is None else os.fspath(source)
        return PreparedTokens(text, origin, tokenizer, cache_dir, val_fraction=val_fraction, block_size=block_size,
                              reuse=reuse)

    @classmethod
    def prepare_text(
        cls,
        text: str,
        tokenizer: Tokenizer,
        cache_dir: str | os.PathLike[str],
        *,
        val_fraction: float = 0.05,
        block_size: int | None = None,
        reuse: bool = True,
    ) -> PreparedTokens:
        """Like :meth:`prepare`, for text given as a string (e.g. the text a BPE tokenizer was trained on)."""
        return PreparedTokens(text, "<text>", tokenizer, cache_dir, val_fraction=val_fraction, block_size=block_size,
                              reuse=reuse)

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
        format and ``tokens.bin`` has the recorded size and sha256; otherwise it is rebuilt in place (with a warning
        when it was damaged). The same as ``prepare(...).write()``; use :meth:`from_text` for a string of text.
        """
        return cls.prepare(source, tokenizer, cache_dir, val_fraction=val_fraction, block_size=block_size).write()

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
        return cls.prepare_text(text, tokenizer, cache_dir, val_fraction=val_fraction, block_size=block_size).write()

    def split_sizes(self, block_size: int | None = None) -> tuple[int, int]:
        """``(train tokens, val tokens)`` for windows of ``block_size + 1`` tokens (default :attr:`block_size`)."""
        if block_size is None:
            block_size = self.block_size or 1
        return _split_sizes(len(self), self.val_fraction, block_size)


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


def _windows(data: torch.Tensor, starts: Sequence[int], block_size: int,
             label_shift: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(len(starts), block_size + 1, dtype=torch.int64)
    for row, start in enumerate(starts):
        out[row].copy_(data[start : start + block_size + 1])  # copy_ converts uint16/uint32 to int64
    return split_labels(out, label_shift)


class BatchSampler:
    """Random ``(inputs, targets)`` batches from a 1-D tensor of token ids, resumable exactly.

    Each batch takes ``batch_size`` windows of ``block_size + 1`` tokens at uniformly random starts; inputs are
    the first ``block_size`` tokens of each window and targets the last ``block_size`` (both ``int64`` on the CPU).
    Starts come from the sampler's own ``torch.Generator`` seeded with ``seed``, so the global RNG is untouched
    and :meth:`state_dict` / :meth:`load_state_dict` resume the exact same sequence of batches. With
    ``label_shift`` (chat data) targets are -100 where a token carries no loss (see `moekit.train.chat`).
    """

    def __init__(self, data: torch.Tensor, batch_size: int, block_size: int, seed: int = 0,
                 label_shift: int | None = None) -> None:
        _check_data(data, block_size, "the data")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.data = data
        self.batch_size = int(batch_size)
        self.block_size = int(block_size)
        self.seed = int(seed)
        self.label_shift = label_shift
        self.step = 0
        """Number of batches drawn so far."""
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(inputs, targets)``, each ``[batch_size, block_size]`` int64."""
        high = self.data.numel() - self.block_size  # last valid start is numel - (block_size + 1)
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator).tolist()
        self.step += 1
        return _windows(self.data, starts, self.block_size, self.label_shift)

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
    data: torch.Tensor, batch_size: int, block_size: int, max_batches: int | None = None,
    label_shift: int | None = None,
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
        yield _windows(data, starts[i : i + batch_size], block_size, label_shift)


def build_tokenizer(train_config: Any) -> Tokenizer:
    """The tokenizer a training config asks for (duck-typed on ``moekit.train.config.TrainConfig``).

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
