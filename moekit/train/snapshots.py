"""Weights-only snapshots of a run at fixed steps (`train.snapshot_interval`), for analyses across its history.

Layout of a run directory's snapshots:
    snapshots/step-00000100/model.safetensors   the weights (every tensor of the model, a tied one once)
    snapshots/step-00000100/meta.json           written last: step, tokens, config hash, size and sha256 of the
                                                weights (the record format of a checkpoint's meta.json)
A snapshot folder is a weights-only checkpoint: it is written and published the way `moekit.train.checkpoint`
writes checkpoints (a temporary folder, every file synced, one rename; an existing folder of the same step is set
aside until the new one is in place), and `verify_checkpoint(path, "weights")` and `load_weights(path, model)` read
it. Snapshots are never pruned: `train.keep_checkpoints` counts checkpoints only. The trainer writes a step's
snapshot before its checkpoint, so a crash between the two is followed by a resume from an earlier checkpoint that
writes the snapshot again (the same weights: a resume is exact).
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .._files import fsync_dir, storage_faults, temp_sibling
from .checkpoint import (
    _STEP_DIR,
    CHECKPOINT_META_FILE,
    WEIGHTS_FILE,
    CheckpointDamaged,
    _meta_bytes,
    _publish,
    _unique_tensors,
    _write_file,
    safetensors_bytes,
    step_dir_name,
    verify_checkpoint,
)

SNAPSHOTS_DIR = "snapshots"

__all__ = ["SNAPSHOTS_DIR", "Snapshot", "find_snapshots", "save_snapshot"]


@dataclass(frozen=True)
class Snapshot:
    """A complete snapshot folder of a run."""

    path: Path
    step: int
    tokens: int | None


def _remove_leftovers(root: Path) -> None:
    """Temporary and set-aside folders of an earlier writer (the run lock admits one trainer at a time)."""
    for entry in root.iterdir():
        if entry.name.startswith(".step-") and (".tmp-" in entry.name or ".replaced-" in entry.name):
            shutil.rmtree(entry, ignore_errors=True)


def save_snapshot(run_dir: Path, model: nn.Module, model_config: dict[str, Any], step: int, tokens: int) -> Path:
    """Write the weights of `model` as the snapshot of `step` atomically and return its folder.

    `model_config` is what the run's checkpoints hash (`Trainer._hashed_config`). A snapshot already there for
    `step` is replaced by one rename. Raises StorageError (one line: what, where, space needed) on a full or
    read-only disk; nothing of the new snapshot is left and every earlier one is kept.
    """
    root = Path(run_dir) / SNAPSHOTS_DIR
    final = root / step_dir_name(step)
    weights = safetensors_bytes(_unique_tensors(model))
    tmp = temp_sibling(final)
    try:
        with storage_faults("snapshot", final, len(weights)):
            root.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(root)
            tmp.mkdir()
            record = {WEIGHTS_FILE: _write_file(tmp / WEIGHTS_FILE, weights)}
            _write_file(tmp / CHECKPOINT_META_FILE, _meta_bytes({"step": step, "tokens": tokens}, model_config,
                                                                record))
            fsync_dir(tmp)
            _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def find_snapshots(run_dir: Path) -> list[Snapshot]:
    """The run's complete snapshots, oldest step first; an incomplete or damaged one is skipped with a warning."""
    root = Path(run_dir) / SNAPSHOTS_DIR
    if not root.is_dir():
        return []
    found: list[Snapshot] = []
    for entry in sorted(root.iterdir()):
        match = _STEP_DIR.match(entry.name)
        if match is None or not entry.is_dir():
            continue
        try:
            meta = verify_checkpoint(entry, need="weights")
        except CheckpointDamaged as error:
            warnings.warn(f"snapshot {entry} is skipped: {error}", stacklevel=2)
            continue
        if meta["step"] != int(match.group(1)):
            warnings.warn(f"snapshot {entry} is skipped: its meta.json records step {meta['step']}", stacklevel=2)
            continue
        tokens = meta.get("tokens")
        found.append(Snapshot(entry, meta["step"], tokens if isinstance(tokens, int) else None))
    return sorted(found, key=lambda s: s.step)
