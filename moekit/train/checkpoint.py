"""Atomic checkpoints: safetensors weights, JSON config, optimiser/scheduler/RNG/data-position state.

Layout of a run directory:
    config.json               the RunConfig (model + train)
    checkpoint/model.safetensors
    checkpoint/state.pt       optimiser, scheduler, RNG states, sampler position, step
    checkpoint/meta.json      step, tokens seen, config hash
A checkpoint is written to `checkpoint.tmp/`, then swapped in with renames, so a crash at any
moment leaves either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import swap_in, write_json

CHECKPOINT_DIR = "checkpoint"


def config_hash(model_config: dict[str, Any]) -> str:
    """A short stable hash of the model config, to refuse resuming a changed model."""
    return hashlib.sha256(json.dumps(model_config, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(run_dir: Path, model: nn.Module, model_config: dict[str, Any], training_state: dict[str, Any],
                    meta: dict[str, Any]) -> Path:
    """Write `run_dir/checkpoint` atomically and return its path."""
    from safetensors.torch import save_model

    run_dir = Path(run_dir)
    final, tmp, old = run_dir / CHECKPOINT_DIR, run_dir / f"{CHECKPOINT_DIR}.tmp", run_dir / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(training_state, tmp / "state.pt")
    write_json(tmp / "meta.json", {**meta, "config_hash": config_hash(model_config)})
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    shutil.rmtree(old, ignore_errors=True)
    swap_in(tmp, final, old)
    return final


def find_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run (falls back to `checkpoint.old` after a crash mid-swap)."""
    run_dir = Path(run_dir)
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        path = run_dir / name
        if (path / "meta.json").is_file() and (path / "model.safetensors").is_file():
            return path
    raise FileNotFoundError(f"no checkpoint in {run_dir}: expected {run_dir / CHECKPOINT_DIR}/model.safetensors; "
                            "train first with `moekit train --out DIR`, or pass the run directory it wrote")


def load_weights(path: Path, model: nn.Module) -> None:
    """Load `model.safetensors` into `model`, with a clear error when shapes or names differ."""
    from safetensors.torch import load_model

    try:
        load_model(model, str(Path(path) / "model.safetensors"), strict=True)
    except Exception as error:  # safetensors raises several types for a mismatched or damaged file
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise ValueError(f"checkpoint {path} does not fit this model or is corrupt ({first}); "
                         "load it with the run's own config.json, or delete the damaged checkpoint") from error


def load_checkpoint(run_dir: Path, model: nn.Module, model_config: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """Load weights into `model`; return (training state, meta). Refuses a changed model config."""
    path = find_checkpoint(run_dir)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"checkpoint {path} is corrupt (meta.json: {error}); "
                         "delete it or resume another run") from error
    if meta.get("config_hash") != config_hash(model_config):
        raise ValueError(f"cannot resume {run_dir}: the model config differs from the one it was trained with (or "
                         "train.init_from does); resume without changing model fields or train.init_from (training "
                         "fields like max_steps may change)")
    load_weights(path, model)
    try:
        state = torch.load(path / "state.pt", weights_only=False)
    except Exception as error:  # torch raises several types for a damaged pickle
        raise ValueError(f"checkpoint {path} is corrupt (state.pt: {error}); "
                         "delete it or resume another run") from error
    return state, meta
