"""What a Hugging Face folder written by moekit is, and what `overwrite=True` (CLI ``--overwrite``) may replace.

`export_hf`, `merge` and `upcycle` write a marker file, :data:`MARKER_NAME` (``moekit_output.json``), into every
output folder as its last file::

    {"written_by": "moekit", "command": "export" | "merge" | "upcycle", "files": [the folder's other files]}

transformers and `moekit.interop.load_hf` ignore it. The rule (:func:`check_output`) for an existing `out`:

- `out` is, contains or lies inside an input of the same command (the run being exported, a model being merged or
  upcycled): refused, with or without overwrite, since replacing it would destroy the input;
- an empty folder is used as it is;
- a moekit training run (a ``config.json`` with ``"model"`` and ``"train"`` sections) is never replaced;
- any other non-empty folder is replaced only with `overwrite=True`, and only if it holds a valid marker and
  nothing but the files the marker lists (plus the marker). Anything else is someone's data: the error names the
  first entry moekit did not write and says to delete it by hand or to choose another folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._files import overlapping_input, write_json
from ..train.rundir import is_run_config

__all__ = ["MARKER_NAME", "OUTPUT_COMMANDS", "check_not_input", "check_output", "is_training_run", "marker_content",
           "read_marker", "replace_refusal", "write_marker"]

MARKER_NAME = "moekit_output.json"
"""The file that marks a folder as an output moekit wrote (and lists that folder's files)."""

OUTPUT_COMMANDS = ("export", "merge", "upcycle")
"""The commands that write Hugging Face folders, as the marker's ``"command"`` names them."""

PathLike = str | os.PathLike[str]


def marker_content(command: str, files: Iterable[str]) -> dict[str, Any]:
    """The marker of a folder that `command` wrote holding `files` (sorted; the marker itself is left out)."""
    if command not in OUTPUT_COMMANDS:
        raise ValueError(f"command={command!r} is not allowed: one of {', '.join(OUTPUT_COMMANDS)}")
    return {"written_by": "moekit", "command": command, "files": sorted(set(files) - {MARKER_NAME})}


def write_marker(folder: PathLike, command: str) -> dict[str, Any]:
    """Write the marker into `folder`, listing every regular file there now; return what was written.

    Call it last, once every other file of the output is written.
    """
    folder = Path(folder)
    files = [entry.name for entry in folder.iterdir() if entry.is_file() and not entry.is_symlink()]
    content = marker_content(command, files)
    write_json(folder / MARKER_NAME, content, what=f"{command} output marker")
    return content


def read_marker(folder: PathLike) -> dict[str, Any] | None:
    """The marker of `folder` when it holds a valid one (written by moekit, listing file names), else None."""
    path = Path(folder) / MARKER_NAME
    if path.is_symlink() or not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(content, dict) or content.get("written_by") != "moekit":
        return None
    files = content.get("files")
    if content.get("command") not in OUTPUT_COMMANDS or not isinstance(files, list) \
            or not all(isinstance(name, str) for name in files):
        return None
    return content


def is_training_run(folder: PathLike) -> bool:
    """Whether `folder` is a moekit training run (the run directory's rule, `moekit.train.rundir`)."""
    return is_run_config(Path(folder))


def replace_refusal(folder: PathLike) -> str | None:
    """Why `overwrite=True` may not replace the existing folder `folder` (a clause), or None when it may.

    Only a folder that holds a valid marker and nothing but the files it lists (plus the marker) may be replaced.
    """
    folder = Path(folder)
    entries = sorted(folder.iterdir(), key=lambda entry: entry.name)
    if not entries:
        return None
    if is_training_run(folder):
        return "it is a moekit training run (its config.json has 'model' and 'train' sections)"
    marker = read_marker(folder)
    if marker is None:
        if (folder / MARKER_NAME).exists():
            return (f"its {MARKER_NAME} is not one moekit wrote (unreadable, or of another form): moekit did not "
                    "write it")
        return f"it holds {entries[0].name!r} and no {MARKER_NAME}: moekit did not write it"
    listed = set(marker["files"])
    for entry in entries:
        if entry.name == MARKER_NAME:
            continue
        if entry.name not in listed:
            return f"it holds {entry.name!r}, which its {MARKER_NAME} does not list: moekit did not write it"
        if entry.is_symlink() or not entry.is_file():
            return f"its {entry.name!r} is not the plain file moekit wrote there"
    return None


def _relation(out: Path, source: Path) -> str:
    target = out.expanduser().resolve()
    if target == source:
        return "is"
    return "lies inside" if source in target.parents else "contains"


def check_not_input(out: PathLike, inputs: Iterable[PathLike | None], *, caller: str, label: str = "out") -> None:
    """Raise `ValueError` when `out` is, contains or lies inside one of `inputs` (missing inputs are ignored).

    Checked with or without overwrite: a command must never write over, into or around what it reads.
    """
    present = [item for item in inputs if item is not None and Path(item).expanduser().exists()]
    source = overlapping_input(out, present)
    if source is None:
        return
    out = Path(out)
    raise ValueError(f"{caller}: {label} {str(out)!r} {_relation(out, source)} {str(source)!r}, which this command "
                     f"reads; writing the output there would destroy its input: choose another {label}")


def check_output(out: PathLike, *, overwrite: bool, caller: str, inputs: Iterable[PathLike | None] = (),
                 label: str = "out") -> Path:
    """Check that `caller` may write the folder `out` (see the module docstring); return it as an absolute path.

    Raises:
        ValueError: `out` is, contains or lies inside one of `inputs`.
        FileExistsError: `out` exists and is not a folder, is a training run, is not empty and `overwrite` is
            False, or is not a folder moekit wrote (the first foreign entry is named).
    """
    path = Path(out).expanduser().absolute()
    check_not_input(path, inputs, caller=caller, label=label)
    if not (path.exists() or path.is_symlink()):
        return path
    if not path.is_dir():
        raise FileExistsError(f"{caller}: {label} {str(path)!r} exists and is not a directory; choose another "
                              f"{label}")
    if not any(path.iterdir()):
        return path
    if is_training_run(path):
        raise FileExistsError(f"{caller}: {label} {str(path)!r} is a moekit training run (its config.json has "
                              f"'model' and 'train' sections), which export, merge and upcycle never replace, even "
                              f"with overwrite=True (CLI --overwrite): choose another {label}")
    refusal = replace_refusal(path)
    if not overwrite:
        if refusal is None:
            raise FileExistsError(f"{caller}: {label} {str(path)!r} already exists and is not empty; pass "
                                  f"overwrite=True (CLI --overwrite) to replace it, or choose another {label}")
        raise FileExistsError(f"{caller}: {label} {str(path)!r} already exists and is not empty, and overwrite=True "
                              f"(CLI --overwrite) would not replace it either: {refusal}; delete it by hand or "
                              f"choose another {label}")
    if refusal is not None:
        raise FileExistsError(f"{caller}: {label} {str(path)!r} cannot be replaced with overwrite=True (CLI "
                              f"--overwrite): {refusal}; delete it by hand or choose another {label}")
    return path
