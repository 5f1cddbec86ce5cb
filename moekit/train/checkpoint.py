"""Atomic checkpoints: safetensors weights, JSON config, optimiser/scheduler/RNG/data-position state.

Layout of a run directory:
    config.json               the RunConfig (model + train)
    checkpoint/model.safetensors
    checkpoint/state.pt       optimiser, scheduler, RNG states, sampler position, step
    checkpoint/meta.json      step, tokens seen, config hash
A checkpoint is written to `checkpoint.tmp/`, then swapped in with renames, so a crash at any
moment leaves either the previous checkpoint or the new one, never a half-written one.

A run trained with expert parallelism (`--ep E` under torchrun) saves per rank into the same folder:
    checkpoint/model.safetensors                       every tensor but the routed experts' (rank 0)
    checkpoint/experts-0000j-of-0000E.safetensors      expert-parallel rank j's slice of every layer's experts
    checkpoint/state-rank0000r-of-0000W.pt             rank r's optimiser slice, RNG and the shared positions
    checkpoint/meta.json                               + "layout": {"world_size": W, "expert_parallel": E}
`read_model_state` joins the expert slices, so every single-process tool (generate, eval, export) reads it,
and `load_training_state` re-slices weights and optimiser moments for any other layout (resharding on load).
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


def expert_shard_name(ep_rank: int, ep_size: int) -> str:
    return f"experts-{ep_rank:05d}-of-{ep_size:05d}.safetensors"


def state_name(rank: int, world_size: int) -> str:
    return f"state-rank{rank:05d}-of-{world_size:05d}.pt"


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


def _damaged(path: Path, error: Exception) -> ValueError:
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return ValueError(f"checkpoint {path} does not fit this model or is corrupt ({first}); "
                      "load it with the run's own config.json, or delete the damaged checkpoint")


def read_model_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint as one state dict, the expert slices of a sharded checkpoint joined."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = load_file(str(path / "model.safetensors"))
        layout = _read_meta(path).get("layout")
        if layout is not None:
            ep = layout["expert_parallel"]
            slices = [load_file(str(path / expert_shard_name(j, ep))) for j in range(ep)]
            for name in slices[0]:
                state[name] = torch.cat([piece[name] for piece in slices])
    except ValueError:
        raise
    except Exception as error:  # safetensors and the file system raise several types for a damaged checkpoint
        raise _damaged(path, error) from error
    return state


def _tied_names(model: nn.Module) -> dict[str, list[str]]:
    """For each tensor stored under several names (tied embeddings), every name it goes by."""
    by_storage: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_storage.setdefault(tensor.data_ptr(), []).append(name)
    return {name: names for names in by_storage.values() if len(names) > 1 for name in names}


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise _damaged(path, error) from error
    tied = _tied_names(model)  # a tied tensor is saved once; loading it under one name fills the others
    missing = [name for name in result.missing_keys if not any(other in state for other in tied.get(name, []))]
    if missing or result.unexpected_keys:
        problem = (f"missing {missing[:3]}" if missing else "") + (
            f"{'; ' if missing else ''}unexpected {result.unexpected_keys[:3]}" if result.unexpected_keys else "")
        raise _damaged(path, RuntimeError(problem))


def load_weights(path: Path, model: nn.Module, expert_slices: dict[str, slice] | None = None) -> None:
    """Load a checkpoint into `model`, with a clear error when shapes or names differ.

    `expert_slices` maps the names of sharded expert tensors to the rows this rank holds (expert parallelism);
    the checkpoint may have been saved with any layout.
    """
    state = read_model_state(path)
    for name, rows in (expert_slices or {}).items():
        if name in state:
            state[name] = state[name][rows]
    _load_into(model, state, path)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "meta.json").read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"checkpoint {path} is corrupt (meta.json: {error}); "
                         "delete it or resume another run") from error


def _torch_load(file: Path) -> dict[str, Any]:
    try:
        return torch.load(file, weights_only=False, map_location="cpu")  # the optimiser moves state to its params
    except Exception as error:  # torch raises several types for a damaged or missing pickle
        raise ValueError(f"checkpoint {file.parent} is corrupt or incomplete ({file.name}: {error}); "
                         "delete it or resume another run") from error


def load_checkpoint(run_dir: Path, model: nn.Module, model_config: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """Load weights into `model`; return (training state, meta). Refuses a changed model config.

    A checkpoint saved with expert parallelism is joined into one model and one training state, so a single
    process resumes it (the optimiser's expert moments joined like the weights).
    """
    state, meta = load_training_state(run_dir, model, model_config, rank=0, world_size=1, expert_slices=None)
    return state, meta


def load_training_state(run_dir: Path, model: nn.Module, model_config: dict[str, Any], rank: int, world_size: int,
                        expert_slices: dict[str, slice] | None, param_names: list[str] | None = None,
                        ) -> tuple[dict[str, Any], dict]:
    """Load this rank's weights and training state from a checkpoint saved with any layout.

    With the layout it was saved with, rank r gets its own state file back (an exact resume). Otherwise the
    optimiser state is rebuilt: every tensor's moments from rank 0's file, the experts' joined over the saved
    expert-parallel ranks and cut to `expert_slices` (a single process: joined whole), and the RNG of rank 0.
    `param_names` names the optimiser's parameters in order (needed only to reshard a sharded optimiser).
    """
    path = find_checkpoint(run_dir)
    meta = _read_meta(path)
    if meta.get("config_hash") != config_hash(model_config):
        raise ValueError(f"cannot resume {run_dir}: the model config differs from the one it was trained with (or "
                         "train.init_from does); resume without changing model fields or train.init_from (training "
                         "fields like max_steps may change)")
    load_weights(path, model, expert_slices)
    layout = meta.get("layout")
    if layout is None:  # a single-process checkpoint: one state file, nothing sharded
        if not expert_slices:
            return _torch_load(path / "state.pt"), meta
        saved_world, saved_ep, files = 1, 1, [path / "state.pt"]
    else:
        saved_world, saved_ep = layout["world_size"], layout["expert_parallel"]
        files = [path / state_name(j, saved_world) for j in range(saved_ep)]
        if saved_world == world_size and expert_slices is not None and rank < saved_world:
            own = _torch_load(path / state_name(rank, saved_world))
            if _same_slices(own.get("expert_slices"), expert_slices):
                return own, meta  # the layout it was saved with: this rank's own state, exactly
    shards = [_torch_load(file) for file in files]
    state = shards[0]
    names = state.get("param_names") or param_names or []
    if param_names is not None and state.get("param_names") and param_names != state["param_names"]:
        raise ValueError(f"checkpoint {path} holds optimiser state for other parameters than this model's; "
                         "resume with the run's own config.json")
    saved_sharded, wanted = state.get("expert_slices") or {}, expert_slices or {}
    for index, name in enumerate(names):
        moments = state["optimizer"]["state"].get(index)
        if not moments or (name not in saved_sharded and name not in wanted):
            continue
        for key, value in moments.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                full = torch.cat([shard["optimizer"]["state"][index][key] for shard in shards]) \
                    if name in saved_sharded else value
                moments[key] = full[wanted[name]] if name in wanted else full
    state["expert_slices"] = {name: _slice_bounds(rows) for name, rows in wanted.items()}
    return state, meta


def _slice_bounds(rows: slice) -> tuple[int, int]:
    return (rows.start, rows.stop)


def _same_slices(saved: dict[str, tuple[int, int]] | None, wanted: dict[str, slice]) -> bool:
    return saved is not None and saved == {name: _slice_bounds(rows) for name, rows in wanted.items()}


def save_sharded_checkpoint(run_dir: Path, model: nn.Module, model_config: dict[str, Any],
                            training_state: dict[str, Any], meta: dict[str, Any], *, rank: int, world_size: int,
                            ep_rank: int, ep_size: int, dp_rank: int, expert_slices: dict[str, slice],
                            barrier) -> Path:
    """Every rank's part of one atomic checkpoint (call on all ranks at once; `barrier()` syncs them).

    Rank 0 writes the replicated tensors and meta.json; the first data-parallel replica of each expert slice
    writes that slice; every rank writes its own state file (its optimiser slice and RNG). The folder is
    swapped in by rank 0 after every rank has written and synced its files.
    """
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    final, tmp, old = run_dir / CHECKPOINT_DIR, run_dir / f"{CHECKPOINT_DIR}.tmp", run_dir / f"{CHECKPOINT_DIR}.old"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    written = []
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.numel() and tensor.data_ptr() in seen:  # a tied tensor is saved once, under its first name
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().contiguous().cpu()
    if rank == 0:
        dense = {name: t for name, t in tensors.items() if name not in expert_slices}
        save_file(dense, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        written.append(tmp / "model.safetensors")
    if dp_rank == 0:
        mine = {name: tensors[name] for name in expert_slices}
        shard = tmp / expert_shard_name(ep_rank, ep_size)
        save_file(mine, str(shard), metadata={"format": "pt"})
        written.append(shard)
    state = {**training_state, "expert_slices": {n: _slice_bounds(r) for n, r in expert_slices.items()}}
    torch.save(state, tmp / state_name(rank, world_size))
    written.append(tmp / state_name(rank, world_size))
    for f in written:  # make the bytes durable before the rename publishes them
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    barrier()
    if rank == 0:
        write_json(tmp / "meta.json", {**meta, "config_hash": config_hash(model_config),
                                       "layout": {"world_size": world_size, "expert_parallel": ep_size}})
        shutil.rmtree(old, ignore_errors=True)
        swap_in(tmp, final, old)
    barrier()
    return final
