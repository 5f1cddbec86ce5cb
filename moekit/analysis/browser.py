"""Headless Chromium for the routing page: a screenshot (the README's picture) and the DOM after its script ran.

Debian's `chromium` package is used (found on PATH as `chromium`); it is started with no sandbox, no GPU, no
network services and a throw-away profile, bounded by a timeout, and its whole process group is killed afterwards,
so no browser process outlives the call.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

from .._files import fsync_dir

CHROMIUM_MISSING = "Debian's chromium is not installed (apt-get install chromium)"

__all__ = ["CHROMIUM_MISSING", "ChromiumError", "dump_dom", "find_chromium", "page_url", "screenshot_page"]


class ChromiumError(RuntimeError):
    """Chromium is absent, failed, or did not finish in time."""


def find_chromium() -> str | None:
    """The path of the `chromium` executable, or None when it is not installed."""
    return shutil.which("chromium")


def page_url(html: Path, layer: int | None = None) -> str:
    """The file:// URL of the page `html`, opening MoE layer `layer` when given."""
    return Path(html).resolve().as_uri() + (f"#layer={layer}" if layer is not None else "")


def _run_chromium(arguments: list[str], timeout: float) -> str:
    """Run headless Chromium with `arguments`; its stdout. The process group is killed when it ends."""
    executable = find_chromium()
    if executable is None:
        raise ChromiumError(CHROMIUM_MISSING)
    with tempfile.TemporaryDirectory(prefix="moekit-chromium-") as profile:
        command = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--disable-extensions", "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}",
                   *arguments]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True, env={**os.environ, "HOME": profile})
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise ChromiumError(f"chromium did not finish within {timeout:g} s: {' '.join(arguments)}") from None
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # its helpers (renderer, zygote), should any linger
    if process.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        raise ChromiumError(f"chromium failed (exit status {process.returncode}): {tail}")
    return stdout


def screenshot_page(html: Path, png: Path, width: int = 1100, height: int = 700, layer: int | None = None,
                    timeout: float = 60.0) -> Path:
    """Render the page `html` in headless Chromium and write a `width` x `height` PNG to `png`, atomically.

    `layer` opens that MoE layer (the page's ``#layer=N``). Raises :class:`ChromiumError` saying how to install
    Chromium when it is absent, or what went wrong when it fails.
    """
    png = Path(png)
    tmp = png.with_name(f".{png.name}.tmp-{uuid.uuid4().hex[:12]}.png")
    try:
        _run_chromium([f"--screenshot={tmp}", f"--window-size={width},{height}", "--virtual-time-budget=2000",
                       page_url(html, layer)], timeout)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise ChromiumError(f"chromium wrote no screenshot of {html}")
        os.replace(tmp, png)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(png.parent)
    return png


def dump_dom(html: Path, layer: int | None = None, timeout: float = 60.0) -> str:
    """The page's DOM as HTML after its script ran in headless Chromium (`layer` as in :func:`screenshot_page`)."""
    return _run_chromium(["--dump-dom", "--virtual-time-budget=2000", page_url(html, layer)], timeout)
