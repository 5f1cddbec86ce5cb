"""Every file moekit writes goes through here: nothing is ever half-written, and storage faults read as one line.
Files it reads from a path a user names are opened here too, so that nothing can block.

- :func:`atomic_write` (and :func:`write_json` on top of it) writes a unique temporary file next to the target,
  flushes it to disk, renames it over the target and syncs the folder, so a crash at any moment leaves the old
  file or the new one, never a truncated one.
- :func:`append_line` adds one line to a log with a single ``write`` on an ``O_APPEND`` descriptor (a crash can
  cut only the last line; readers skip a cut last line).
- :func:`storage_error` turns a full disk, a file-size limit, a read-only or forbidden destination into a
  :class:`StorageError` whose message says what was being written, where, and how much space it needed;
  :func:`storage_faults` does that for a block of code.
- :func:`read_regular_file` reads a file only if it is a regular file (checked on the open descriptor, never
  blocking on a FIFO or device); :func:`file_kind` says in words what a path that is not one is.
- :func:`temp_sibling` / :func:`remove_stale_temps` name temporary folders after their writer (host and pid), so a
  later run can tell a dead writer's leftovers from a live writer's work and remove only the former.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_TOO_LARGE = (errno.EFBIG,)
_READ_ONLY = (errno.EROFS,)
_FORBIDDEN = (errno.EACCES, errno.EPERM)
# what safetensors (Rust), torch's C++ writer and others put in their messages instead of an errno
_MESSAGES = (("no space left", errno.ENOSPC), ("os error 28", errno.ENOSPC), ("disk quota", errno.EDQUOT),
             ("file too large", errno.EFBIG), ("os error 27", errno.EFBIG), ("read-only file system", errno.EROFS),
             ("os error 30", errno.EROFS), ("permission denied", errno.EACCES), ("os error 13", errno.EACCES))

_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class StorageError(OSError):
    """A write that the storage refused (full, size limit, read-only, no permission), explained in one line."""

    def __str__(self) -> str:
        return str(self.strerror)


def _errno_of(error: BaseException) -> int | None:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:  # the cause chain: wrappers keep the OSError inside
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno
        text = str(error).lower()
        for needle, number in _MESSAGES:
            if needle in text:
                return number
        error = error.__cause__ or error.__context__
    return None


def _free_bytes(where: Path) -> int | None:
    path = Path(where)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def format_bytes(n: int) -> str:
    """`n` bytes as a short human-readable size (decimal units)."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def storage_error(error: BaseException, what: str, where: str | os.PathLike[str],
                  needed: int | None = None) -> StorageError | None:
    """A :class:`StorageError` explaining `error` if it is a storage fault, else None.

    `what` names the thing being written ("checkpoint", "token cache"...), `where` the path, `needed` the bytes
    the whole write needs (when known).
    """
    if isinstance(error, StorageError):
        return error
    number = _errno_of(error)
    where = Path(where)
    need = f" (it needs {format_bytes(needed)})" if needed else ""
    if number in _NO_SPACE:
        free = _free_bytes(where)
        left = f"; {format_bytes(free)} free there" if free is not None else ""
        return StorageError(number, f"no space left on the device writing the {what} to {where}{need}{left}; "
                                    "free some space or choose another directory")
    if number in _TOO_LARGE:
        return StorageError(number, f"the file size limit was reached writing the {what} to {where}{need} "
                                    "(`ulimit -f` or the file system's largest file); raise the limit or choose "
                                    "another directory")
    if number in _READ_ONLY:
        return StorageError(number, f"cannot write the {what} to {where}: the file system is read-only; choose a "
                                    "writable directory")
    if number in _FORBIDDEN:
        return StorageError(number, f"cannot write the {what} to {where}: permission denied; choose a directory "
                                    "you can write to")
    return None


@contextlib.contextmanager
def storage_faults(what: str, where: str | os.PathLike[str], needed: int | None = None) -> Iterator[None]:
    """Re-raise a storage fault inside the block as a one-line :class:`StorageError`; other errors pass."""
    try:
        yield
    except Exception as error:
        explained = storage_error(error, what, where, needed)
        if explained is None:
            raise
        raise explained from error


# ------------------------------------------------------------------------------------------------------ reading


def file_kind(mode: int) -> str:
    """What a file of `stat` mode `mode` that is not a regular file is, in words ("a FIFO (named pipe)", ...)."""
    return next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")


class NotRegularFile(ValueError):
    """The path opened is not a regular file (a FIFO, a socket, a device); nothing was read from it."""

    def __init__(self, path: str | os.PathLike[str], mode: int) -> None:
        self.path = Path(path)
        self.mode = mode
        """The `stat` mode of what was opened."""
        super().__init__(f"{os.fspath(path)} is {file_kind(mode)}, not a regular file")


def read_regular_file(path: str | os.PathLike[str], max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file `path` (at most `max_bytes` of them), opened so that nothing can block.

    The file is opened with ``O_NONBLOCK`` and checked on the open descriptor, so a FIFO or device, even one swapped
    in after the caller's own ``stat``, raises :class:`NotRegularFile` without being read. The OSErrors of opening
    and reading pass to the caller, which words them for what it reads.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb", closefd=True) as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, mode)
        return handle.read() if max_bytes is None else handle.read(max_bytes)


# ------------------------------------------------------------------------------------------------------ writing


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in the folder `path` durable (a no-op where folders cannot be synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file that was written by another library to the disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, what: str | None = None) -> None:
    """Write `data` to `path` so that `path` holds either its old content or all of `data`, even after a crash.

    A unique temporary file in the same folder is written and flushed, renamed over `path`, and the folder is
    synced. A storage fault removes the temporary file and raises a :class:`StorageError` naming `what`
    (default: the file's name).
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        explained = storage_error(error, what or path.name, path, len(payload)) if isinstance(error, Exception) \
            else None
        if explained is not None:  # measured after the temp file is gone, so "free" is what is really free
            raise explained from error
        raise
    fsync_dir(path.parent)


def json_text(obj: Any) -> str:
    """`obj` as indented, key-sorted JSON text with a final newline (moekit's JSON style)."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json(path: str | os.PathLike[str], obj: Any, *, what: str | None = None) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically (see :func:`atomic_write`)."""
    atomic_write(path, json_text(obj), what=what)


def append_line(path: str | os.PathLike[str], line: str, *, what: str | None = None) -> None:
    """Append one line (a newline is added) with a single write, so concurrent or cut writes never interleave."""
    path = Path(path)
    payload = (line.rstrip("\n") + "\n").encode("utf-8")
    with storage_faults(what or path.name, path, len(payload)):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)


def read_json_lines(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; a last line cut by a crash is skipped, any other bad line is an error."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) or all(not rest.strip() for rest in lines[number:]):
                continue  # the last line, cut by a crash mid-write
            raise ValueError(f"{path} line {number} is not JSON ({error}); the log is damaged") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number} is not a JSON object; the log is damaged")
        records.append(record)
    return records


def write_json_lines(path: str | os.PathLike[str], records: list[dict[str, Any]], *, what: str | None = None) -> None:
    """Rewrite a JSON-lines log with `records`, atomically (a log cut back on resume)."""
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records), what=what)


# ------------------------------------------------------------------------------------------ temporary folders
def _writer_tag() -> str:
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}"


def temp_sibling(out: Path, kind: str = "tmp") -> Path:
    """A fresh name next to `out` for a folder being written (`.NAME.tmp-HOST-PID-RANDOM`)."""
    return out.parent / f".{out.name}.{kind}-{_writer_tag()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Clean up after writers of `out` on this host that are gone; return the folders removed.

    Their `.NAME.tmp-*` folders (never published) are removed. A `.NAME.old-*` folder is the previous `out` set
    aside during a swap: when `out` is missing (the writer died between the two renames), the newest one is put
    back as `out`, since it is the only complete copy; otherwise it is removed. Folders of a writer that is still
    running, or of another host (a shared file system), are left alone.
    """
    host = _writer_tag().rsplit("-", 1)[0]
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        prefix = f".{out.name}.{kind}-{host}-"
        dead = []
        for candidate in out.parent.glob(f".{out.name}.{kind}-*"):
            rest = candidate.name[len(prefix):] if candidate.name.startswith(prefix) else None
            pid_text = rest.split("-", 1)[0] if rest else ""
            if pid_text.isdigit() and not _alive(int(pid_text)):
                dead.append(candidate)
        if kind == "old" and dead and not (out.exists() or out.is_symlink()):
            newest = max(dead, key=lambda p: p.stat().st_mtime)
            os.replace(newest, out)  # the only complete copy goes back where it belongs
            dead.remove(newest)
        for candidate in dead:
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def swap_in(tmp: Path, out: Path, old: Path) -> None:
    """Make the complete directory `tmp` the new `out`.

    A previous `out` waits at `old` until the swap is done (and is put back if it fails), so a crash
    at any moment leaves a complete directory at `out` or at `old`.
    """
    if not out.exists():
        os.replace(tmp, out)
        fsync_dir(out.parent)
        return
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def overlapping_input(out: str | os.PathLike[str], inputs: list[str | os.PathLike[str] | None]) -> Path | None:
    """The first of `inputs` that `out` is, contains or lies inside (symlinks resolved), else None.

    A command must never replace or write into its own input: `moekit export RUN RUN --overwrite` would delete the
    run it is exporting.
    """
    target = Path(out).expanduser().resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).expanduser().resolve()
        if target == source or target in source.parents or source in target.parents:
            return source
    return None
