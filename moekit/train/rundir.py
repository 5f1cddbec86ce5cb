"""What a training run's directory is, what `--overwrite` may replace, and the lock that admits one trainer.

A run directory holds only what `moekit train` writes (:data:`RUN_ENTRIES`). `--overwrite` replaces a folder
only when it is such a run and holds nothing else, never while another process trains in it, and only after the
new run's inputs were all checked; the old run is set aside until the new one's first files are written, so a
failure puts it back.

The lock is an `flock` on `RUN_DIR/train.lock` (which records the holder's pid, host and start time): the kernel
drops it when the process ends however it ends, so a stale lock never blocks a run, and a live one is refused
with "run in use by pid N". It is re-entrant within one process (a test, or a notebook, may hold two `Trainer`s
of one run).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from .._files import json_text, temp_sibling
from .errors import RunInUse

LOCK_FILE = "train.lock"
RUN_ENTRIES = frozenset({
    "config.json", "metrics.jsonl", "report.md", "plots", "tokenizer", "data", "checkpoints", "snapshots",
    "tensorboard", LOCK_FILE,
})
"""Every top-level name `moekit train` writes into a run directory (hidden `.NAME.tmp-*` files are its temps)."""


def read_run_config(run_dir: Path, what: str = "resume") -> dict[str, Any]:
    """A run directory's config.json as a dict; errors say which command could not go on (`what`) and why."""
    config_path = Path(run_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"cannot {what}: {config_path} not found; pass a run directory written by "
                                "`moekit train`")
    try:
        values = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot {what}: {config_path} is damaged ({error}); it is not a run config") from error
    if not isinstance(values, dict):
        raise ValueError(f"cannot {what}: {config_path} holds no run config")
    return values


def _is_moekit_temp(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name and name.split(".tmp-", 1)[0].lstrip(".") in RUN_ENTRIES


def is_run_config(path: Path) -> bool:
    """True when `path/config.json` is a run config moekit wrote (a JSON object with model and train sections)."""
    try:
        values = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(values, dict) and isinstance(values.get("model"), dict) and isinstance(values.get("train"),
                                                                                             dict)


def foreign_entries(path: Path) -> list[str]:
    """The top-level names in `path` that `moekit train` does not write."""
    return sorted(p.name for p in Path(path).iterdir() if p.name not in RUN_ENTRIES and not _is_moekit_temp(p.name))


def check_replaceable(path: Path) -> None:
    """Raise FileExistsError unless the non-empty folder `path` is a moekit run holding only a run's files."""
    path = Path(path)
    how = "delete it yourself if it is really not needed, or pass --out to choose another directory"
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; --overwrite replaces only a run directory; "
                              f"{how}")
    if not is_run_config(path):
        raise FileExistsError(f"--overwrite refuses to replace {path}: it is not a moekit training run (it has no "
                              f"run config.json); {how}")
    foreign = foreign_entries(path)
    if foreign:
        raise FileExistsError(f"--overwrite refuses to replace {path}: it holds {foreign[0]!r}"
                              f"{f' and {len(foreign) - 1} more entries' if len(foreign) > 1 else ''}, which "
                              f"moekit train did not write; move it out first, or {how}")
    holder = lock_holder(path)
    if holder is not None:
        raise FileExistsError(f"--overwrite refuses to replace {path}: run in use by {holder}")


def set_aside(path: Path) -> Path:
    """Rename `path` out of the way (next to it, hidden) and return where it went."""
    aside = temp_sibling(path, "old")
    os.replace(path, aside)
    return aside


def restore(aside: Path, path: Path) -> None:
    """Put a run set aside by :func:`set_aside` back, removing whatever now stands at `path`."""
    shutil.rmtree(path, ignore_errors=True)
    os.replace(aside, path)


# ================================================================================================ the lock
_HELD: dict[str, list[Any]] = {}  # resolved run dir -> [open lock file, holders in this process]


def _describe(info: dict[str, Any]) -> str:
    started = info.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started,
                                                                                             (int, float)) else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}{when} (wait for it to finish, or stop it)"


def lock_holder(run_dir: Path) -> str | None:
    """Who holds the run's lock (another process), or None when nobody does."""
    path = Path(run_dir) / LOCK_FILE
    key = str(Path(run_dir).resolve())
    if key in _HELD or not path.is_file():
        return None
    try:
        handle = open(path, "r+")
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(_read_info(handle))
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def _read_info(handle: Any) -> dict[str, Any]:
    handle.seek(0)
    try:
        info = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


class RunLock:
    """The exclusive right to train in one run directory (see the module docstring).

    Under torchrun rank 0 holds it for all ranks: the others pass `enabled=False`, and acquiring does nothing.
    """

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self._key = str(self.run_dir.resolve())
        self._held = False
        self.enabled = enabled

    def acquire(self) -> RunLock:
        """Take the lock, or raise RuntimeError naming the process that holds it."""
        if self._held or not self.enabled:
            return self
        entry = _HELD.get(self._key)
        if entry is not None:
            entry[1] += 1
            self._held = True
            return self
        handle = open(self.run_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_info(handle))
            handle.close()
            raise RunInUse(f"{self.run_dir}: run in use by {holder}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json_text({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}))
        handle.flush()
        _HELD[self._key] = [handle, 1]
        self._held = True
        return self

    def release(self) -> None:
        """Give the lock back (the last holder in this process unlocks the file)."""
        if not self._held:
            return
        self._held = False
        entry = _HELD.get(self._key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self._key]
            with contextlib.suppress(OSError):
                fcntl.flock(entry[0], fcntl.LOCK_UN)
            entry[0].close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


