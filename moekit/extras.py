"""What each command needs beyond torch, checked when it starts, so every missing package is named at once.

The message names the extra that brings them (`pip install "moekit[train]"`), before anything is read or written.
"""

from __future__ import annotations

import importlib.util
import sys

PIP_NAMES = {"yaml": "PyYAML", "numpy": "numpy", "safetensors": "safetensors", "tokenizers": "tokenizers",
             "transformers": "transformers", "gguf": "gguf", "matplotlib": "matplotlib", "tqdm": "tqdm",
             "starlette": "starlette", "uvicorn": "uvicorn", "httpx": "httpx"}

COMMAND_NEEDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": ("train", ("yaml", "numpy", "safetensors")),
    "generate": ("train", ("numpy", "safetensors")),
    "eval": ("train", ("numpy", "safetensors")),
    "export": ("hf", ("numpy", "safetensors")),
    "merge": ("merge", ("yaml", "numpy", "safetensors", "transformers")),
    "upcycle": ("merge", ("numpy", "safetensors", "transformers")),
    "analyze": ("train", ("numpy", "safetensors", "matplotlib")),
    "prune": ("train", ("numpy", "safetensors")),
    "serve": ("serve", ("numpy", "safetensors", "transformers", "starlette", "uvicorn")),
    "moa": ("serve", ("yaml", "httpx")),
}
"""command -> (the extra to install, the modules it imports)."""


def installed(module: str) -> bool:
    """True when `module` can be imported (without importing it)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(command: str, also: tuple[str, ...] = (), extra: str | None = None) -> None:
    """Raise ImportError naming every module `command` (plus `also`) needs that is not installed."""
    default_extra, modules = COMMAND_NEEDS.get(command, ("train", ()))
    missing = [m for m in (*modules, *also) if not installed(m)]
    if missing:
        names = ", ".join(PIP_NAMES.get(m, m) for m in missing)
        raise ImportError(f"moekit {command} needs {names}, which {'is' if len(missing) == 1 else 'are'} not "
                          f"installed: pip install \"moekit[{extra or default_extra}]\"")
