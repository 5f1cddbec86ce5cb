"""Small file helpers shared by checkpoints, the token cache and export: nothing is ever half-written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write `obj` as indented, key-sorted JSON via a temp file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def swap_in(tmp: Path, out: Path, old: Path) -> None:
    """Make the complete directory `tmp` the new `out`.

    A previous `out` waits at `old` until the swap is done (and is put back if it fails), so a crash
    at any moment leaves a complete directory at `out` or at `old`.
    """
    if not out.exists():
        os.replace(tmp, out)
        return
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
