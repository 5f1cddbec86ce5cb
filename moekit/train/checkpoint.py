"""Checkpoints that survive any crash: one folder per step, published by one rename, verified by checksums.

Layout of a run directory's checkpoints:
    checkpoints/step-00000100/model.safetensors   the weights
    checkpoints/step-00000100/state.pt            optimiser, scheduler, RNG states, sampler position, step
    checkpoints/step-00000100/meta.json           written last: step, tokens, config hash, and the size and
                                                  sha256 of every other file of the folder
A checkpoint is written into `checkpoints/.step-N.tmp-HOST-PID-X/`, made durable, and published with one rename,
so a crash at any moment leaves every published checkpoint as it was. Nothing older is deleted before the new one
is published; then only the newest `keep` (`train.keep_checkpoints`) stay. Saving a step that already has a
checkpoint (a resume that falls back to an older one and reaches the damaged step again) sets the old folder aside
as `.step-N.replaced-*` until the new one is in place, and a set-aside folder is itself a fallback for loading.

Loading (`find_checkpoint`) takes the newest checkpoint whose files match their checksums, and when the newest is
damaged falls back to the previous complete one with a warning naming both. Weights-only readers (eval, generate,
export) check only the weight files, so a damaged optimiser state does not stop them.

A run trained with expert parallelism (`--ep E` under torchrun) saves per rank into the same folder:
    model.safetensors                       every tensor but the routed experts' (rank 0)
    experts-0000j-of-0000E.safetensors      expert-parallel rank j's slice of every layer's experts
    state-rank0000r-of-0000W.pt             rank r's optimiser slice, RNG and the shared positions
    meta.json                               + "layout": {"world_size": W, "expert_parallel": E}
`read_model_state` joins the expert slices, so every single-process tool reads it, and `load_training_state`
re-slices weights and optimiser moments for any other layout (resharding on load).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .._files import StorageError, format_bytes, fsync_dir, storage_faults, temp_sibling

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_META_FILE = "meta.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_ASIDE_DIR = re.compile(r"^\.step-(\d+)\.replaced-")

Need = Literal["weights", "all"]


def expert_shard_name(ep_rank: int, ep_size: int) -> str:
    return f"experts-{ep_rank:05d}-of-{ep_size:05d}.safetensors"


def state_name(rank: int, world_size: int) -> str:
    return f"state-rank{rank:05d}-of-{world_size:05d}.pt"


def step_dir_name(step: int) -> str:
    """The folder name of the checkpoint of `step` (zero-padded, so names sort by step)."""
    return f"step-{step:08d}"


def config_hash(model_config: dict[str, Any]) -> str:
    """A short stable hash of the model config, to refuse resuming a changed model."""
    return hashlib.sha256(json.dumps(model_config, sort_keys=True).encode()).hexdigest()[:16]


class CheckpointDamaged(ValueError):
    """A checkpoint folder whose files are missing, cut short or do not match their checksums."""


# =============================================================================================== finding
@dataclass(frozen=True)
class Candidate:
    """A checkpoint folder that may be loadable: published, or set aside during a replace."""

    path: Path
    step: int
    kind: Literal["published", "set-aside"]


def checkpoint_candidates(run_dir: Path) -> list[Candidate]:
    """Every checkpoint folder of a run, newest step first (published before set-aside)."""
    run_dir = Path(run_dir)
    found: list[Candidate] = []
    root = run_dir / CHECKPOINTS_DIR
    if root.is_dir():
        for entry in root.iterdir():
            if not entry.is_dir():
                continue
            if match := _STEP_DIR.match(entry.name):
                found.append(Candidate(entry, int(match.group(1)), "published"))
            elif match := _ASIDE_DIR.match(entry.name):
                found.append(Candidate(entry, int(match.group(1)), "set-aside"))
    return sorted(found, key=lambda c: (-c.step, c.kind == "set-aside", c.path.name))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint folder's meta.json, checked to be a checkpoint record (else CheckpointDamaged)."""
    file = Path(path) / CHECKPOINT_META_FILE
    if not file.is_file():
        raise CheckpointDamaged(f"{file.name} is missing (the checkpoint was not completed)")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointDamaged(f"{file.name} is not valid JSON ({error})") from error
    if not isinstance(meta, dict):
        raise CheckpointDamaged(f"{file.name} holds a {type(meta).__name__}, not a checkpoint record")
    if not isinstance(meta.get("step"), int) or isinstance(meta.get("step"), bool) or meta["step"] < 0:
        raise CheckpointDamaged(f"{file.name} has no valid step")
    if not isinstance(meta.get("files"), dict):
        raise CheckpointDamaged(f"{file.name} has no valid file list")
    return meta


def _weight_files(meta: dict[str, Any]) -> list[str]:
    names = [WEIGHTS_FILE]
    layout = meta.get("layout")
    if isinstance(layout, dict) and isinstance(layout.get("expert_parallel"), int):
        names += [expert_shard_name(j, layout["expert_parallel"]) for j in range(layout["expert_parallel"])]
    return names


def _state_files(meta: dict[str, Any]) -> list[str]:
    layout = meta.get("layout")
    if isinstance(layout, dict) and isinstance(layout.get("world_size"), int):
        return [state_name(r, layout["world_size"]) for r in range(layout["world_size"])]
    return [STATE_FILE]


def verify_checkpoint(path: Path, need: Need = "all") -> dict[str, Any]:
    """Check a checkpoint folder's files against meta.json; return the meta, or raise CheckpointDamaged.

    `need="weights"` checks only the weight files (what eval, generate and export read); `"all"` also the
    training state (what a resume reads).
    """
    path = Path(path)
    meta = read_meta(path)
    wanted = _weight_files(meta) + (_state_files(meta) if need == "all" else [])
    recorded = meta["files"]
    for name in wanted:
        file = path / name
        if not file.is_file():
            raise CheckpointDamaged(f"{name} is missing")
        entry = recorded.get(name)
        if not isinstance(entry, dict):
            raise CheckpointDamaged(f"{name} is not listed in {CHECKPOINT_META_FILE}")
        size = file.stat().st_size
        if size != entry.get("size"):
            raise CheckpointDamaged(f"{name} has {size} bytes, {CHECKPOINT_META_FILE} records {entry.get('size')}")
        if _sha256(file) != entry.get("sha256"):
            raise CheckpointDamaged(f"{name} does not match its sha256 checksum (the file is corrupt)")
    return meta


def find_checkpoint(run_dir: Path, need: Need = "weights") -> Path:
    """The newest complete checkpoint of a run (see `verify_checkpoint` for `need`).

    When the newest is damaged, the previous complete one is returned and a warning names both. Raises
    FileNotFoundError when the run has no checkpoint at all, and CheckpointDamaged (a ValueError) naming every
    candidate's problem when none is complete.
    """
    run_dir = Path(run_dir)
    candidates = checkpoint_candidates(run_dir)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: expected {run_dir / CHECKPOINTS_DIR}/step-N/; "
                                "train first with `moekit train --out DIR`, or pass the run directory it wrote")
    problems: list[str] = []
    for candidate in candidates:
        try:
            verify_checkpoint(candidate.path, need)
        except CheckpointDamaged as error:
            problems.append(f"{candidate.path}: {error}")
            continue
        if problems:
            warnings.warn(f"checkpoint {problems[0]}; loading the previous complete checkpoint {candidate.path} "
                          f"(step {candidate.step}) instead", stacklevel=2)
        return candidate.path
    raise CheckpointDamaged(f"no complete checkpoint in {run_dir}: " + "; ".join(problems)
                            + ". The run cannot be resumed from these files; start it again (--overwrite)")


# =============================================================================================== reading
def _damaged(path: Path, error: Exception) -> ValueError:
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return ValueError(f"checkpoint {path} does not fit this model or is corrupt ({first}); "
                      "load it with the run's own config.json, or delete the damaged checkpoint")


def read_model_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint as one state dict, the expert slices of a sharded checkpoint joined."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = load_file(str(path / WEIGHTS_FILE))
        layout = read_meta(path).get("layout")
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
    """Load a checkpoint folder into `model`, with a clear error when shapes or names differ.

    `expert_slices` maps the names of sharded expert tensors to the rows this rank holds (expert parallelism);
    the checkpoint may have been saved with any layout.
    """
    state = read_model_state(path)
    for name, rows in (expert_slices or {}).items():
        if name in state:
            state[name] = state[name][rows]
    _load_into(model, state, path)


def _torch_load(file: Path) -> dict[str, Any]:
    try:
        state = torch.load(file, weights_only=False, map_location="cpu")  # the optimiser moves state to its params
    except Exception as error:  # torch raises several types for a damaged or missing pickle
        raise ValueError(f"checkpoint {file.parent} is corrupt or incomplete ({file.name}: {error}); "
                         "delete it or resume another run") from error
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {file.parent} is corrupt ({file.name} holds no training state)")
    return state


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
    """Load this rank's weights and training state from the newest complete checkpoint, saved with any layout.

    With the layout it was saved with, rank r gets its own state file back (an exact resume). Otherwise the
    optimiser state is rebuilt: every tensor's moments from rank 0's file, the experts' joined over the saved
    expert-parallel ranks and cut to `expert_slices` (a single process: joined whole), and the RNG of rank 0.
    `param_names` names the optimiser's parameters in order (needed only to reshard a sharded optimiser).
    """
    path = find_checkpoint(run_dir, need="all")
    meta = read_meta(path)
    if meta.get("config_hash") != config_hash(model_config):
        raise ValueError(f"cannot resume {run_dir}: the model config differs from the one it was trained with (or "
                         "train.init_from does); resume without changing model fields or train.init_from")
    load_weights(path, model, expert_slices)
    layout = meta.get("layout")
    if layout is None:  # a single-process checkpoint: one state file, nothing sharded
        if not expert_slices:
            return _torch_load(path / STATE_FILE), meta
        saved_world, saved_ep, files = 1, 1, [path / STATE_FILE]
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


# =============================================================================================== writing
def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as CPU tensors, a tied tensor once (under its first name)."""
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.numel() and tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """`tensors` serialised as one safetensors file."""
    from safetensors.torch import save

    return save(tensors, metadata={"format": "pt"})


def torch_bytes(obj: Any) -> bytes:
    """`obj` serialised with torch.save (in memory, so a failing disk write keeps its errno)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write_file(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _check_free_space(root: Path, needed: int) -> None:
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise StorageError(28, f"no space left for the checkpoint in {root}: it needs {format_bytes(needed)}, "
                               f"{format_bytes(free)} free; free some space (older checkpoints are kept until a "
                               "new one is complete) or lower train.keep_checkpoints")


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete folder `tmp` to `final`; an existing `final` waits aside until the rename is done."""
    if final.exists():
        aside = final.parent / f".{final.name}.replaced-{tmp.name.rsplit('-', 1)[-1]}"
        os.replace(final, aside)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
        fsync_dir(final.parent)


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` published checkpoints, set-aside folders older than those, and
    temporary folders of dead writers. Returns what was deleted."""
    candidates = checkpoint_candidates(run_dir)
    published = [c for c in candidates if c.kind == "published"]
    kept = published[:keep]
    oldest_kept = kept[-1].step if kept else -1
    doomed = [c.path for c in published[keep:]]
    doomed += [c.path for c in candidates if c.kind != "published" and len(kept) >= keep and c.step <= oldest_kept]
    root = Path(run_dir) / CHECKPOINTS_DIR
    if root.is_dir():  # a temporary folder here is never a live writer's: the run lock admits one trainer
        doomed += [p for p in root.iterdir() if p.name.startswith(".step-") and ".tmp-" in p.name]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _model_bytes_estimate(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_checkpoint(run_dir: Path, model: nn.Module, model_config: dict[str, Any], training_state: dict[str, Any],
                    meta: dict[str, Any], keep: int = 2) -> Path:
    """Write the checkpoint of step `meta["step"]` atomically, keep the newest `keep`, and return its folder.

    Raises StorageError (one line: what, where, space needed) on a full or read-only disk; the temporary folder is
    removed and every earlier checkpoint is left as it was.
    """
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    final = root / step_dir_name(int(meta["step"]))
    files = {WEIGHTS_FILE: safetensors_bytes(_unique_tensors(model)), STATE_FILE: torch_bytes(training_state)}
    needed = sum(len(data) for data in files.values())
    tmp = temp_sibling(final)
    try:
        with storage_faults("checkpoint", final, needed):
            root.mkdir(parents=True, exist_ok=True)
            _check_free_space(root, needed)
            tmp.mkdir()
            record = {name: _write_file(tmp / name, data) for name, data in files.items()}
            _write_file(tmp / CHECKPOINT_META_FILE, _meta_bytes(meta, model_config, record))
            fsync_dir(tmp)
            _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep)
    return final


def _meta_bytes(meta: dict[str, Any], model_config: dict[str, Any], files: dict[str, Any],
                layout: dict[str, int] | None = None) -> bytes:
    record = {**meta, "config_hash": config_hash(model_config), "files": files}
    if layout is not None:
        record["layout"] = layout
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8")


def save_sharded_checkpoint(run_dir: Path, model: nn.Module, model_config: dict[str, Any],
                            training_state: dict[str, Any], meta: dict[str, Any], *, rank: int, world_size: int,
                            ep_rank: int, ep_size: int, dp_rank: int, expert_slices: dict[str, slice],
                            all_ok: Callable[[bool], bool], keep: int = 2) -> Path:
    """Every rank's part of one atomic checkpoint (call on all ranks at once).

    `all_ok(flag)` is a collective that returns True only when every rank passed True; it stands in for a
    barrier, so a rank whose write failed makes every rank stop with an error instead of waiting. Rank 0 writes
    the replicated tensors, then, once all files are written and synced, meta.json with every file's checksum, and
    publishes the folder.
    """
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    final = root / step_dir_name(int(meta["step"]))
    tmp = root / f".{final.name}.tmp-sharded"  # one name every rank can compute; the run lock admits one job
    tensors = _unique_tensors(model)
    files: dict[str, bytes] = {}
    if rank == 0:
        files[WEIGHTS_FILE] = safetensors_bytes({n: t for n, t in tensors.items() if n not in expert_slices})
    if dp_rank == 0:
        files[expert_shard_name(ep_rank, ep_size)] = safetensors_bytes({n: tensors[n] for n in expert_slices})
    state = {**training_state, "expert_slices": {n: _slice_bounds(r) for n, r in expert_slices.items()}}
    files[state_name(rank, world_size)] = torch_bytes(state)
    needed = sum(len(data) for data in files.values())
    error: BaseException | None = None
    if rank == 0:
        try:
            with storage_faults("checkpoint", final, needed):
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
        except Exception as caught:
            error = caught
    if not all_ok(error is None):
        _raise_shard_error(error, final)
    try:
        with storage_faults("checkpoint", final, needed):
            for name, data in files.items():
                _write_file(tmp / name, data)
    except Exception as caught:
        error = caught
    if not all_ok(error is None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _raise_shard_error(error, final)
    if rank == 0:
        try:
            with storage_faults("checkpoint", final, needed):
                layout = {"world_size": world_size, "expert_parallel": ep_size}
                record = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
                _write_file(tmp / CHECKPOINT_META_FILE, _meta_bytes(meta, model_config, record, layout))
                fsync_dir(tmp)
                _publish(tmp, final)
                prune_checkpoints(run_dir, keep)
        except Exception as caught:
            shutil.rmtree(tmp, ignore_errors=True)
            error = caught
    if not all_ok(error is None):
        _raise_shard_error(error, final)
    return final


def _raise_shard_error(error: BaseException | None, final: Path) -> None:
    if error is not None:
        raise error
    raise RuntimeError(f"the checkpoint {final} was not written: another rank failed to write its part (its error "
                       "is in its own log); every earlier checkpoint is kept")
