"""A mixed three-domain corpus for `benchmarks/quality.py`, built offline and deterministically.

Domains (each about `domain_bytes` of UTF-8 text in the training file, plus `heldout_bytes` held out):

- ``plays``: the embedded Shakespeare corpus (`moekit/data/shakespeare.txt.gz`); training text from the first works
  in the corpus order, held-out text from the last work (a different play, so no passage is shared);
- ``python``: Python source of the standard library of the running interpreter: the public top-level modules
  (``*.py`` directly under ``sysconfig.get_paths()['stdlib']``, names not starting with ``_``) in sorted order,
  without their leading comment lines (licence banners that several files share), at most `file_cap` bytes from
  each; the held-out files are the ones after those used for training. The stdlib differs a little between
  Python versions, so the version is recorded in ``corpus.json``;
- ``arithmetic``: generated, seeded lines such as ``37 + 48 = 85``, ``12 * 7 = 84``, ``(3 + 4) * 5 = 35`` and
  worked multi-step ones (``6 * 7 + 5 = 42 + 5 = 47``); held-out lines come from another random stream and none of
  them occurs in the training text.

The training file interleaves the domains in chunks of about `chunk_bytes` (cut at line ends), ordered by their
relative position in their own domain, so every stretch of the file, and in particular its tail (the validation
split a run takes with ``train.val_fraction``), holds all three domains.

Layout written by :func:`build_corpus`::

    OUT/train.txt                     the training corpus (pass as train.data)
    OUT/domains/<domain>.txt          held-out text, one file per domain (pass as analyze's domains)
    OUT/corpus.json                   sizes, sha256s, the stdlib files used, the Python version, the parameters
"""

from __future__ import annotations

import hashlib
import platform
import random
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from moekit._files import atomic_write, write_json
from moekit.train.data import DOCUMENT_SEPARATOR, load_corpus_text

__all__ = ["DOMAINS", "CorpusInfo", "arithmetic_text", "build_corpus", "interleave", "plays_text", "python_text"]

DOMAINS = ("plays", "python", "arithmetic")
"""The domain names, in the order used everywhere (held-out file names are ``<name>.txt``)."""


@dataclass
class CorpusInfo:
    """What :func:`build_corpus` wrote."""

    train: Path
    domains_dir: Path
    train_bytes: dict[str, int]
    heldout_bytes: dict[str, int]
    python_version: str
    stdlib_files: dict[str, list[str]] = field(default_factory=dict)  # "train" / "heldout" -> file names
    sha256: dict[str, str] = field(default_factory=dict)  # output file (relative to OUT) -> sha256


def _cut(text: str, budget: int) -> str:
    """The longest prefix of `text` of at most `budget` UTF-8 bytes that ends at a line end (or all of it)."""
    data = text.encode("utf-8")
    if len(data) <= budget:
        return text
    head = data[:budget]
    end = head.rfind(b"\n")
    head = head[: end + 1] if end >= 0 else head
    return head.decode("utf-8", errors="ignore")


def _fill(parts: list[str], budget: int) -> tuple[str, int]:
    """Join `parts` (with a blank line between) up to `budget` bytes; also returns how many parts were used."""
    out: list[str] = []
    size = 0
    for used, part in enumerate(parts, 1):
        whole = part.rstrip("\n") + "\n\n"
        piece = _cut(whole, budget - size)
        out.append(piece)
        size += len(piece.encode("utf-8"))
        if size >= budget or piece != whole:
            return "".join(out), used
    return "".join(out), len(parts)


def plays_text(train_bytes: int, heldout_bytes: int) -> tuple[str, str]:
    """(training text, held-out text) from the embedded Shakespeare corpus: first works / the last work."""
    works = [w.strip("\n") for w in load_corpus_text(None).split(DOCUMENT_SEPARATOR)]
    train, used = _fill(works[:-1], train_bytes)
    heldout, _ = _fill(works[-1:], heldout_bytes)
    if used >= len(works) - 1 and len(train.encode("utf-8")) < train_bytes:
        raise ValueError(f"the embedded corpus is too small for {train_bytes} training bytes of plays")
    return train, heldout


def stdlib_modules() -> list[Path]:
    """The public top-level modules of this interpreter's standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("_") and p.is_file())
    if not files:
        raise FileNotFoundError(f"no standard-library sources (*.py) under {root}; this Python has no stdlib "
                                "sources installed (some minimal images ship only .pyc): install the full Python")
    return files


def _drop_header(source: str) -> str:
    """`source` without its leading comment lines (shebangs, licence banners shared between files)."""
    lines = source.splitlines(keepends=True)
    start = 0
    while start < len(lines) and (lines[start].startswith("#") or not lines[start].strip()):
        start += 1
    return "".join(lines[start:])


def python_text(train_bytes: int, heldout_bytes: int, file_cap: int) -> tuple[str, str, list[str], list[str]]:
    """(training text, held-out text, training file names, held-out file names) of stdlib source.

    At most `file_cap` bytes (whole lines) of each file; the held-out files follow the training ones.
    """
    files = stdlib_modules()
    sources = [_cut(_drop_header(p.read_text(encoding="utf-8")), file_cap) for p in files]
    train, used = _fill(sources, train_bytes)
    heldout, used_h = _fill(sources[used:], heldout_bytes)
    if len(heldout.encode("utf-8")) < heldout_bytes // 2:
        raise ValueError(f"the standard library under {files[0].parent} is too small for {train_bytes} + "
                         f"{heldout_bytes} bytes of Python; lower the budgets")
    return train, heldout, [p.name for p in files[:used]], [p.name for p in files[used:used + used_h]]


def _arithmetic_line(rng: random.Random) -> str:
    kind = rng.randrange(8)
    a, b, c = rng.randrange(1000), rng.randrange(1000), rng.randrange(100)
    if kind == 0:
        return f"{a} + {b} = {a + b}"
    if kind == 1:
        return f"{a} - {b} = {a - b}"
    if kind == 2:
        x, y = rng.randrange(100), rng.randrange(100)
        return f"{x} * {y} = {x * y}"
    if kind == 3:
        d = rng.randrange(1, 50)
        return f"{a} // {d} = {a // d}, {a} % {d} = {a % d}"
    if kind == 4:
        x, y = rng.randrange(50), rng.randrange(50)
        return f"({x} + {y}) * {c} = {x + y} * {c} = {(x + y) * c}"
    if kind == 5:
        x, y = rng.randrange(100), rng.randrange(100)
        return f"{x} * {y} + {a} = {x * y} + {a} = {x * y + a}"
    if kind == 6:
        d = rng.randrange(1000)
        return f"{a} + {b} - {d} = {a + b} - {d} = {a + b - d}"
    x = rng.randrange(2, 20)
    return f"{x} * {x} = {x * x}, {x} ** 3 = {x ** 3}"


def arithmetic_text(train_bytes: int, heldout_bytes: int, seed: int = 0) -> tuple[str, str]:
    """(training text, held-out text) of generated arithmetic; no held-out line occurs in the training text."""
    rng = random.Random(seed)
    lines: list[str] = []
    seen: set[str] = set()
    size = 0
    while size < train_bytes:
        line = _arithmetic_line(rng) + "\n"
        if size + len(line) > train_bytes:
            break
        lines.append(line)
        seen.add(line)
        size += len(line)
    rng_h = random.Random(f"heldout-{seed}")
    held: list[str] = []
    size = 0
    while size < heldout_bytes:
        line = _arithmetic_line(rng_h) + "\n"
        if line in seen:
            continue
        if size + len(line) > heldout_bytes:
            break
        held.append(line)
        size += len(line)
    return "".join(lines), "".join(held)


def _chunks(text: str, chunk_bytes: int) -> list[str]:
    """`text` cut into pieces of about `chunk_bytes` each, ending at line ends (a longer line is cut as it is)."""
    out = []
    while text:
        piece = _cut(text, chunk_bytes)
        if not piece:  # a line longer than a chunk
            piece = text[:chunk_bytes]
        out.append(piece)
        text = text[len(piece):]
    return out


def interleave(texts: dict[str, str], chunk_bytes: int) -> str:
    """The texts cut into chunks and merged by relative position, so every stretch of the result mixes them.

    Chunk j of a text with n chunks is placed at (j + 1) / n; ties keep the order of `texts`.
    """
    keyed = []
    for order, text in enumerate(texts.values()):
        chunks = _chunks(text, chunk_bytes)
        keyed += [((j + 1) / len(chunks), order, chunk) for j, chunk in enumerate(chunks)]
    return "".join(chunk for _, _, chunk in sorted(keyed, key=lambda t: (t[0], t[1])))


def build_corpus(out: str | Path, domain_bytes: int = 350_000, heldout_bytes: int = 40_000,
                 chunk_bytes: int = 2_000, file_cap: int = 16_000, seed: int = 0) -> CorpusInfo:
    """Write the mixed training corpus and the held-out domain files under `out` (see the module docstring).

    Deterministic for a given Python standard library: the same arguments give the same bytes.
    """
    if min(domain_bytes, heldout_bytes, chunk_bytes, file_cap) <= 0:
        raise ValueError("domain_bytes, heldout_bytes, chunk_bytes and file_cap must be positive byte counts")
    out = Path(out)
    plays, plays_h = plays_text(domain_bytes, heldout_bytes)
    code, code_h, code_files, code_files_h = python_text(domain_bytes, heldout_bytes, file_cap)
    arith, arith_h = arithmetic_text(domain_bytes, heldout_bytes, seed)
    train = {"plays": plays, "python": code, "arithmetic": arith}
    heldout = {"plays": plays_h, "python": code_h, "arithmetic": arith_h}
    domains_dir = out / "domains"
    domains_dir.mkdir(parents=True, exist_ok=True)
    files = {"train.txt": interleave(train, chunk_bytes)}
    files.update({f"domains/{name}.txt": heldout[name] for name in DOMAINS})
    for rel, text in files.items():
        atomic_write(out / rel, text, what="quality corpus")
    info = CorpusInfo(
        train=out / "train.txt", domains_dir=domains_dir,
        train_bytes={k: len(v.encode("utf-8")) for k, v in train.items()},
        heldout_bytes={k: len(v.encode("utf-8")) for k, v in heldout.items()},
        python_version=f"{platform.python_implementation()} {sys.version.split()[0]}",
        stdlib_files={"train": code_files, "heldout": code_files_h},
        sha256={rel: hashlib.sha256(text.encode("utf-8")).hexdigest() for rel, text in files.items()})
    write_json(out / "corpus.json", {
        "train": "train.txt", "domains": {name: f"domains/{name}.txt" for name in DOMAINS},
        "train_bytes": info.train_bytes, "heldout_bytes": info.heldout_bytes,
        "python_version": info.python_version, "stdlib": sysconfig.get_paths()["stdlib"],
        "stdlib_files": info.stdlib_files, "sha256": info.sha256,
        "parameters": {"domain_bytes": domain_bytes, "heldout_bytes": heldout_bytes, "chunk_bytes": chunk_bytes,
                       "file_cap": file_cap, "seed": seed}}, what="quality corpus")
    return info
