"""Writing a Hugging Face checkpoint folder: tensors made one at a time, streamed into shards, published atomically.

Every command that writes an HF folder (`export_hf`, `merge`, `upcycle`) describes its weights as a list of
:class:`TensorEntry` (name, shape, dtype and a function that makes the tensor when it is written) and hands a
function that fills a folder to :func:`write_atomically`:

- :func:`split_shards` cuts the entries into files of at most `max_shard_bytes` (a bigger tensor gets a file alone);
- :func:`stream_safetensors` writes one safetensors file header first (every shape is known in advance), then each
  tensor in turn, so memory holds one tensor at a time whatever the shard size;
- :func:`write_weights` writes ``model.safetensors``, or numbered shards with ``model.safetensors.index.json``;
- :func:`write_atomically` runs the filling function on a temporary folder next to the destination, adds the
  ``moekit_output.json`` marker, syncs everything to disk and renames the folder into place, so the destination
  appears only once complete and a failure (a full disk included, as one `StorageError` line) leaves an existing
  destination untouched.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._files import (
    StorageError,
    fsync_dir,
    fsync_file,
    remove_stale_temps,
    storage_error,
    swap_in,
    temp_sibling,
    write_json,
)
from .dtypes import safetensors_dtype
from .outputs import check_output, write_marker

__all__ = ["COMMANDS", "DEFAULT_MAX_SHARD_BYTES", "TensorEntry", "check_destination",
           "split_shards", "stream_safetensors", "write_atomically", "write_weights"]

DEFAULT_MAX_SHARD_BYTES = 2_000_000_000
"""Largest safetensors file written by default (2 GB); bigger checkpoints are sharded with an index."""

#: the caller's function name -> the command name used in messages and in the output marker
COMMANDS = {"export_hf": "export", "merge": "merge", "upcycle": "upcycle"}
_WHAT = {"export": "Hugging Face export", "merge": "merged model", "upcycle": "upcycled model"}

@dataclass
class TensorEntry:
    """One tensor of the checkpoint, made only when its file is written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    def materialize(self) -> Tensor:
        """The tensor, on the CPU, contiguous, in `dtype`; a shape other than `shape` is an internal error."""
        tensor = self.make().detach().to(device="cpu", dtype=self.dtype, copy=True).contiguous()
        if tuple(tensor.shape) != self.shape:  # pragma: no cover - internal consistency
            raise RuntimeError(f"checkpoint writer: {self.name} has shape {tuple(tensor.shape)}, expected {self.shape}")
        return tensor


def split_shards(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """`entries` in order, cut into shards of at most `max_shard_bytes` (a bigger tensor gets a shard alone)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def stream_safetensors(entries: list[TensorEntry], path: Path, on_tensor: Callable[[], None] | None = None,
                       metadata: dict[str, str] | None = None) -> None:
    """Write `entries` as one safetensors file: the header first (shapes are known), then each tensor in turn.

    `metadata` (text to text) joins the header's ``__metadata__`` beside ``"format": "pt"``.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": safetensors_dtype(entry.dtype), "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for entry in entries:
            tensor = entry.materialize()
            if tensor.numel():
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor
            if on_tensor is not None:
                on_tensor()


def write_weights(directory: Path, entries: list[TensorEntry], max_shard_bytes: int,
                  on_tensor: Callable[[], None] | None = None) -> None:
    """Write `entries` into `directory` as ``model.safetensors``, or as shards with an index when they exceed
    `max_shard_bytes`. `on_tensor` is called after each tensor (a progress bar)."""
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):  # pragma: no cover - internal consistency
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise RuntimeError(f"checkpoint writer: tensor names repeat: {repeated}")
    shards = split_shards(entries, max_shard_bytes)
    if len(shards) == 1:
        _write_shard(shards[0], directory / "model.safetensors", on_tensor)
        return
    weight_map: dict[str, str] = {}
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(shard, directory / filename, on_tensor)
        weight_map.update(dict.fromkeys((e.name for e in shard), filename))
    total = sum(e.nbytes for e in entries)
    write_json(directory / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                              "weight_map": weight_map})


def _write_shard(entries: list[TensorEntry], path: Path, on_tensor: Callable[[], None] | None) -> None:
    stream_safetensors(entries, path, on_tensor)  # looked up at call time, so tests can inject a fault there


def check_destination(out: Path, overwrite: bool, caller: str = "export_hf",
                      inputs: Sequence[str | os.PathLike[str] | None] = ()) -> None:
    """Refuse an `out` that `caller` may not write (see `moekit.interop.outputs.check_output`)."""
    check_output(out, overwrite=overwrite, caller=caller, inputs=inputs,
                 label="out_dir" if caller == "export_hf" else "out")


@contextlib.contextmanager
def _output_faults(what: str, out: Path, needed: int | None) -> Iterator[None]:
    """Re-raise a storage fault in the block as one `StorageError` about the whole output `out`."""
    try:
        yield
    except Exception as error:
        # a StorageError from a helper names one file of the temporary folder: explain its cause for `out` instead
        cause = error.__cause__ if isinstance(error, StorageError) and error.__cause__ is not None else error
        explained = storage_error(cause, what, out, needed)
        if explained is None:
            raise
        raise explained from cause


def _sync_folder(folder: Path) -> None:
    """Flush every file of `folder`, then the folder itself, to the disk (before it is renamed into place)."""
    for entry in folder.iterdir():
        if entry.is_file() and not entry.is_symlink():
            fsync_file(entry)
    fsync_dir(folder)


def write_atomically(out_dir: str | os.PathLike[str], overwrite: bool, write: Callable[[Path], None],
                     caller: str = "export_hf", *, inputs: Sequence[str | os.PathLike[str] | None] = (),
                     needed: int | None = None) -> Path:
    """Run `write` on a fresh folder next to `out_dir`, add the output marker, then rename it into place.

    `out_dir` appears only once complete; when `write` fails, the folder is removed and an existing
    `out_dir` is left as it was. The destination is checked before and again just before the swap; a dead
    writer's temporary folders next to `out_dir` are removed first. A full disk, a file-size limit or a
    read-only or forbidden destination raises one `StorageError` naming `out_dir` and `needed` (the output's
    bytes). `caller` names the function in error messages (a key of `COMMANDS`).
    """
    out = Path(out_dir).expanduser().absolute()
    command = COMMANDS[caller]
    what = _WHAT[command]
    check_destination(out, overwrite, caller, inputs)
    tmp: Path | None = None
    try:
        with _output_faults(what, out, needed):
            remove_stale_temps(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_sibling(out)
            tmp.mkdir()
            write(tmp)
            write_marker(tmp, command)
            _sync_folder(tmp)
        check_destination(out, overwrite, caller, inputs)  # something may have appeared meanwhile
        with _output_faults(what, out, needed):
            swap_in(tmp, out, temp_sibling(out, "old"))
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
